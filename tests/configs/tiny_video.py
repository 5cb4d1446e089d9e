"""The tiny run's video stage: motion modules on 2-frame clips, spatial weights from an
image-stage run given with --config.model.init_from."""
from tests.configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.motion.update(enabled=True, num_attention_heads=2, norm_num_groups=4, max_seq_length=8)
    c.data.pipeline.update(clip_length=2, frame_stride=1)
    c.train.update(global_batch_size=4, num_steps=2)
    c.optim.update(trainable=(r"motion_modules",), warmup_steps=0, ema_decay=0.0)
    c.checkpoint.update(every_steps=2)
    return c
