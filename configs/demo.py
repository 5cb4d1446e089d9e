"""The CPU demo: a small pixel-space SCD model on the synthetic people dataset.

    python train.py --config=configs/demo.py --workdir=runs/demo

Sized from measurements on 2 cores: 32x32 frames, pixel-unshuffled by 2 to 16x16x12
"latents", batch 4, 0.07-0.08 s a step on an AMD EPYC VM (XLA:CPU's freed memory reused:
scripts/demo.sh preloads mimalloc, else train.py sets glibc's malloc to keep it;
consist_jax/host_memory.py), 5600 steps in 7-7.5 minutes. Choices that the
measurements (BENCHMARKS.md, "The demo") showed matter at this budget:
  * x0 ("sample") prediction, which learns far faster than epsilon or v at this budget;
  * reference/target attention at 16x16 and 8x8 (not only at the coarse levels): the
    target copies the reference's background and clothes texture through it;
  * batch 4, not 8: at equal time the smaller batch scores higher (figure SSIM 0.47 vs 0.37
    at ~4.5 minutes of training, 0.60 vs 0.57 at 8-9), batch 8 costing 1.8x the step;
    batch 2 scores lower than either;
  * the step made cheap, as steps are what the figure needs (figure SSIM 0.61 at 3600
    steps, 0.63 at 4200, 0.64 at 4800): the gradients averaged as one vector
    (``mesh.flat_gradients``: one all-reduce a step, not 337) and the chunked attention
    (``xla_chunked``), together 0.74x the step;
  * the person's pixels weighted 3 times in the loss (``train.figure_loss_weight``): the
    model's capacity goes to the figure rather than the background it copies from the
    reference (figure SSIM 0.639 -> 0.664, figure PSNR 15.90 -> 16.83 at 4800 steps); 6 scores
    a higher figure PSNR (17.2) but leaves the backgrounds blurred (frame SSIM 0.52, figure
    SSIM 0.60);
  * each self-attention's keys starting as its queries (``self_attention_key_init="query"``):
    a target token's first scores are then highest on the reference tokens that look like
    it, and the copy of the background and clothes the target learns through them comes
    ~1200 steps earlier (one device, 4800 steps: figure SSIM 0.657 -> 0.689, figure PSNR
    16.78 -> 17.05, frame SSIM 0.700 -> 0.760);
  * lr 1e-3, constant (decaying it late did not help, nor a cosine decay to 2e-4), sampled
    with guidance 3 and 10 DDIM steps (25 score the same);
  * Adam's b2 0.99 rather than 0.999: a second moment over ~100 steps, not ~1000, follows
    gradients that shrink fast as the loss falls, and with the tied keys the copy comes ~800
    steps sooner (one device: figure SSIM 0.555 -> 0.616 at 2400 steps, 0.689 -> 0.696 at
    4800; BENCHMARKS.md "Adam's b2");
  * no cross-attention in the transformer blocks (``cross_attention=False``): with no image
    or caption context each one computed only a learned bias; leaving them out takes 7-9% off
    the step (same figure SSIM at 4800 steps: 0.695 against 0.696), spent on more steps;
  * 5600 steps: the held-out figure SSIM was 0.695 at 5200 and 0.701 at 5600 (one run each);
  * a short EMA of the weights (decay 0.99, the last ~100 steps): +0.01 figure SSIM over the
    raw weights; a long one (0.998, ~500 steps) lags a model that improves this fast and
    scores lower than the raw weights.
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
        attention_impl="xla_chunked",  # ~12% off the step here (same numbers to float32 rounding)
        self_attention_key_init="query",
        cross_attention=False,  # no context to attend to (context kind "none"); 7-9% off the step
    )
    c.model.codec = dict(kind="pixel", factor=2)
    c.model.context = dict(kind="none")
    c.diffusion.update(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, prediction_type="sample")
    c.mesh.cpu_devices = 2  # the 2 cores as 2 devices, 2 examples each (training/sharding.py)
    c.mesh.flat_gradients = True  # one all-reduce a step, not 337: XLA:CPU does not combine them
    steps = 5600
    c.train.update(global_batch_size=4, num_steps=steps, figure_loss_weight=3.0)
    c.optim.update(lr=1e-3, b2=0.99, warmup_steps=100, weight_decay=0.0, decay_steps=steps, ema_decay=0.99)
    c.checkpoint.update(every_steps=steps // 4, keep=4)  # four checkpoints: the metric curve's points
    c.log.update(every_steps=100)
    c.sample.update(steps=10, guidance=3.0, window=8, overlap=2)
    return c
