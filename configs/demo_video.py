"""The CPU video demo: motion modules trained on top of the image demo's model.

    python train.py --config=configs/demo.py --workdir=runs/demo            # image stage first
    python train.py --config=configs/demo_video.py --workdir=runs/demo_video

The spatial weights (UNet and pose encoder) come from runs/demo's checkpoint and stay
frozen; only the motion modules train, on 4-frame clips (frame stride 2) with one
reference pass per clip. 4 clips x (1 reference + 4 targets) = 20 images a step,
about the image demo's cost, with no weight gradients outside the motion modules.
"""
from configs.demo import get_config as image_config


def get_config():
    c = image_config()
    c.model.init_from = "runs/demo"
    c.model.motion.update(
        enabled=True,
        num_attention_heads=2,
        transformer_layers_per_block=1,
        use_mid_block=True,
        max_seq_length=16,
        norm_num_groups=8,
    )
    c.data.pipeline.update(clip_length=4, frame_stride=2)
    c.train.update(global_batch_size=4, num_steps=300)
    c.optim.update(lr=1e-3, warmup_steps=30, decay_steps=300, ema_decay=0.0, trainable=(r"motion_modules",))
    c.checkpoint.update(every_steps=100, keep=2)
    c.log.update(every_steps=25)
    c.sample.update(window=8, overlap=2)
    return c
