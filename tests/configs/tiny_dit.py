"""tests/configs/tiny.py's run on a tiny Wan DiT (model.backbone "wan")."""
from consist_jax.factory import fresh_unet_option_defaults
from tests.configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.backbone = "wan"
    c.model.unet.update(fresh_unet_option_defaults())  # the demo's are a fresh UNet's; the DiT refuses them
    c.model.wan.update(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
                       out_channels=12, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=16,
                       pose_hidden_channels=8)
    return c
