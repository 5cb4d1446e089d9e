"""The CPU demo on the Wan DiT: configs/demo.py's task (synthetic people, 32x32 pixels
unshuffled by 2 to 16x16x12 "latents", x0 prediction, EMA, guidance 3) with a tiny Wan
transformer in place of the UNet, and lr 2e-3.

    python train.py --config=configs/demo_dit.py --workdir=runs/demo_dit
    python evaluate.py --checkpoint=runs/demo_dit --out=outputs/demo_dit --videos=20 --frames=8 --seed=0

The DiT: patch (1, 2, 2) -> 8x8 = 64 tokens a frame, width 128 (4 heads of 32), 4 blocks,
feed-forward 512, 1.24M parameters; ~0.26 s a step on 2 cores (2400 steps in ~10 min
on the shared machine). Each image-stage example is the reference's 64 tokens plus one target
frame's 64 under the causal rule. Pose: the pose images unshuffled by the codec's factor
(12 channels at 16x16) through the pose patch embedding. No text: a constant zero context.
"""
from configs.demo import get_config as demo_config
from consist_jax.factory import fresh_unet_option_defaults


def get_config():
    c = demo_config()
    c.model.backbone = "wan"
    c.model.unet.update(fresh_unet_option_defaults())  # the demo's are a fresh UNet's; the DiT refuses them
    c.model.wan.update(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=12,
        out_channels=12,
        text_dim=32,
        freq_dim=64,
        ffn_dim=512,
        num_layers=4,
        rope_max_seq_len=64,
        pose_hidden_channels=32,
    )
    # 2e-3 (the UNet's 1e-3 doubled): at 1e-3 the DiT stayed below copy-reference on frame
    # SSIM after 2400 steps (BENCHMARKS.md, "The demo").
    c.optim.update(lr=2e-3)
    # The recipe its BENCHMARKS.md rows were measured with (configs/demo.py's until 2026-12-03;
    # the UNet demo has since moved to batch 4, a shorter EMA, a figure-weighted loss and Adam
    # b2 0.99, not measured on the DiT).
    steps = 2400
    c.train.update(global_batch_size=8, num_steps=steps, figure_loss_weight=1.0)
    c.optim.update(b2=0.999, decay_steps=steps, ema_decay=0.998)
    c.checkpoint.update(every_steps=steps // 4)
    return c
