"""SCD on Wan2.1-T2V-14B at 480p: configs/wan_1_3b_scd.py's run on the 14B transformer, for
a v5p-64 slice. What trains is the same: the whole DiT plus the pose embedding, flow
matching at shift 3.0 through Wan's VAE (frozen; vae_path "" is a random one, for compiles).

    python train.py --config=configs/wan_14b_scd.py --workdir=runs/wan_14b \\
        --config.model.pretrained_transformer=/path/to/Wan2.1-T2V-14B-Diffusers/transformer \\
        --config.model.codec.vae_path=/path/to/Wan2.1-T2V-14B-Diffusers/vae
"""
from configs.wan_1_3b_scd import WAN21_1_3B, wan_scd_config

# Wan2.1-T2V-14B's config.json (WanTransformerConfig.wan21_t2v_14b).
WAN21_14B = dict(WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def get_config():
    return wan_scd_config(WAN21_14B, global_batch_size=32)
