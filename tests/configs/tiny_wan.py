"""tests/configs/tiny_dit.py's run with Wan's training recipe (configs/wan_1_3b_scd.py:
use_wan_vae_and_flow): a fresh tiny Wan VAE (4x in time, 4x in space, 4 latent channels)
as the codec, flow matching, flow_unipc sampling; 5-frame clips -> 2 latent frames."""
from configs.wan_1_3b_scd import use_wan_vae_and_flow
from tests.configs.tiny_dit import get_config as tiny_dit_config

TINY_WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
                    latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.8, 1.2, 2.0))


def get_config():
    c = use_wan_vae_and_flow(tiny_dit_config(), TINY_WAN_VAE)
    c.model.wan.update(in_channels=4, out_channels=4)
    c.data.pipeline.update(clip_length=5, frame_stride=1)
    c.train.update(global_batch_size=2, num_steps=2)
    c.optim.update(warmup_steps=0, decay_steps=2, ema_decay=0.0)
    c.checkpoint.update(every_steps=2)
    c.sample.update(window=2, overlap=0)
    return c
