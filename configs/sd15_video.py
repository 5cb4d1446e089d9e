"""Stage 2 (video) of SCD: AnimateDiff motion modules trained on 24-frame clips,
spatial weights frozen and taken from the image stage.

    python train.py --config=configs/sd15_video.py --workdir=runs/sd15_video \
        --config.model.init_from=runs/sd15_image \
        --config.model.pretrained_unet=$SD15/unet --config.model.codec.vae_path=$SD15/vae \
        --config.model.context.image_encoder_path=$IMAGE_ENCODER \
        [--config.model.motion_adapter=$ANIMATEDIFF/motion_adapter]

``pretrained_unet`` gives the architecture (its weights are replaced by the image
stage's checkpoint, ``init_from``); the motion modules start from an AnimateDiff
adapter when one is given, else fresh with zero output (the video model then starts
equal to the image model). Only parameters under ``motion_modules`` train; one
reference pass serves the whole clip (the reference is never seen by the temporal
layers).
"""
from configs.sd15_image import get_config as image_config


def get_config():
    c = image_config()
    c.model.motion.update(enabled=True, num_attention_heads=8, max_seq_length=32)
    c.data.pipeline.update(clip_length=24, frame_stride=4, reference_policy="any", worker_count=8)
    c.train.update(global_batch_size=8, num_steps=10_000)
    c.optim.update(lr=1e-5, trainable=(r"motion_modules",), ema_decay=0.0)
    c.sample.update(window=24, overlap=4)
    return c
