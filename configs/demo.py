"""The CPU demo: a small pixel-space SCD model on the synthetic people dataset.

    python train.py --config=configs/demo.py --workdir=runs/demo

Sized from measurements on 2 cores: 32x32 frames, pixel-unshuffled by 2 to 16x16x12
"latents", batch 8, 0.18-0.25 s a step (AMD / Intel 2-core VMs), 2400 steps in 7.5-10 minutes. Choices that
the measurements (BENCHMARKS.md, "The demo") showed matter at this budget:
  * x0 ("sample") prediction, which learns far faster than epsilon or v at this budget;
  * reference/target attention at 16x16 and 8x8 (not only at the coarse levels): the
    target copies the reference's background and clothes texture through it;
  * lr 1e-3, constant, sampled with guidance 3 and 10 DDIM steps (25 score the same);
  * no EMA of the weights: at this budget the model improves faster than an EMA can
    follow (decay 0.998 averages the last ~500 steps), and the raw weights score higher
    at every checkpoint measured (figure SSIM 0.37 vs 0.25 at step 1200, 0.57 vs 0.53 at 2400).
"""
import os

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.synthetic = dict(generate=True, identities=200, frames=48, size=32, seed=0, workers=0)
    c.data.pipeline.update(
        data_dir=os.path.join("data_cache", "synthetic_32"),
        resolution=(32, 32),
        crop_scale=(1.0, 1.0),
        flip_probability=0.5,
    )
    c.model.unet.update(  # a fresh UNet; SCD's options keep configs/common.py's defaults
        in_channels=12,
        out_channels=12,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_heads=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=32,
        norm_num_groups=8,
        pose_block_out_channels=(16, 32),  # downsamples by 2, the pixel-unshuffle factor
    )
    c.model.codec = dict(kind="pixel", factor=2)
    c.model.context = dict(kind="none")
    c.diffusion.update(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, prediction_type="sample")
    c.mesh.cpu_devices = 2  # the 2 cores as 2 devices, 4 examples each (training/sharding.py)
    c.train.update(global_batch_size=8, num_steps=2400)
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.0, decay_steps=2400, ema_decay=0.0)
    c.checkpoint.update(every_steps=600, keep=4)
    c.log.update(every_steps=100)
    c.sample.update(steps=10, guidance=3.0, window=8, overlap=2)
    return c
