"""A tiny SCD run for tests: 16x16 synthetic people, a two-level UNet, a few steps.

The data directory comes from the environment (CONSIST_TEST_DATA) so test processes
share one generated dataset.
"""
import os

from configs.demo import get_config as demo_config


def get_config():
    c = demo_config()
    c.data.synthetic = dict(generate=True, identities=12, frames=8, size=16, seed=0, workers=0)
    c.data.pipeline.update(data_dir=os.environ.get("CONSIST_TEST_DATA", "data_cache/tiny_16"), resolution=(16, 16))
    c.model.unet.update(
        in_channels=12,
        out_channels=12,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_heads=(2, 2),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=8,
        norm_num_groups=4,
        pose_block_out_channels=(4, 8),
    )
    c.mesh.cpu_devices = 0  # one device, as the tests' expectations assume (the demo's 2 where a test asks)
    c.mesh.flat_gradients = False  # the partitioner's reduction, which any mesh a test builds can run
    c.train.update(global_batch_size=8, num_steps=8)
    c.optim.update(lr=1e-3, warmup_steps=2, decay_steps=8, ema_decay=0.9)
    c.checkpoint.update(every_steps=2, keep=5, async_save=True)
    c.log.update(every_steps=1)
    return c
