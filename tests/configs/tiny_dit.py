"""tests/configs/tiny.py's run on a tiny Wan DiT (model.backbone "wan")."""
from tests.configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.backbone = "wan"
    # tiny.py's (the demo's) "query" and cross_attention=False are UNet options
    c.model.unet.update(self_attention_key_init="random", cross_attention=True)
    c.model.wan.update(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
                       out_channels=12, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=16,
                       pose_hidden_channels=8)
    return c
