"""Stage 1 (image) of SCD on Stable Diffusion 1.5, as the peers train it.

    python train.py --config=configs/sd15_image.py --workdir=runs/sd15_image \
        --config.model.pretrained_unet=/models/sd-image-variations/unet \
        --config.model.codec.vae_path=/models/sd-image-variations/vae \
        --config.model.context.image_encoder_path=/models/sd-image-variations/image_encoder \
        --config.data.pipeline.data_dir=/data/tiktok_array_record

UNet initialised from SD image-variations (CLIP image embedding as context), the
pose encoder from scratch; 512x512 frames, bf16 compute with fp32 master weights,
rematerialisation, FSDP over every device.
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.data.pipeline.update(resolution=(512, 512), clip_length=1, reference_policy="any", worker_count=8)
    c.model.unet.update(dtype="bfloat16", remat=True, attention_impl="auto")
    c.model.codec.update(kind="vae", chunk_size=8)
    c.model.context.update(kind="embedding")
    c.train.update(global_batch_size=64, num_steps=30_000, min_snr_gamma=5.0, noise_offset=0.05)
    c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=1e-2, ema_decay=0.9999)
    c.mesh.update(shape=(1, -1), param_sharding="fsdp")
    c.checkpoint.update(every_steps=1000, keep=3)
    c.log.update(every_steps=50)
    c.sample.update(sampler="ddim", steps=25, guidance=3.5)
    return c
