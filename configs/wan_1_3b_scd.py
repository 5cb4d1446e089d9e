"""SCD on Wan2.1-T2V-1.3B at 480p (480x832, 81 frames: 21 latent frames of 60x104 under
Wan's VAE), FSDP over every chip, bfloat16 compute, each block rematerialised.

    python train.py --config=configs/wan_1_3b_scd.py --workdir=runs/wan_1_3b \\
        --config.model.pretrained_transformer=/path/to/Wan2.1-T2V-1.3B-Diffusers/transformer

Parameters stay float32 (the optimiser's master copy); ``model.wan.dtype`` is the compute
dtype. mesh.param_rules: ``training/sharding.py: WAN_PARAM_RULES``. FSDP splits the weights
and the batch; ``model.wan.sequence_axis`` (off here) also splits each clip's tokens over a
mesh axis, for a global batch smaller than the chips (docs/wan.md, "Scale").

Not wired yet (so this config declares the model and the mesh but does not train end to
end): a Wan-VAE codec in SCDModel (4x temporal compression; the codec here is the per-frame
SD VAE slot, whose 4 channels the factory refuses against the DiT's 16) and the flow-matching
loss in the train step (diffusion/flow.py exists; training/step.py takes the DDPM schedule).
"""
import ml_collections

from configs.common import base_config
from consist_jax.training.sharding import WAN_PARAM_RULES

RESOLUTION = (480, 832)
FRAMES = 81  # 21 latent frames under Wan's 4x temporal compression


def wan_scd_config(transformer: dict, global_batch_size: int):
    c = base_config()
    c.data.pipeline.update(resolution=RESOLUTION, clip_length=FRAMES, crop_scale=(1.0, 1.0), center_crop=True,
                           flip_probability=0.0)
    c.model.backbone = "wan"
    c.model.pretrained_transformer = ""  # a diffusers folder (the flag above); "" trains a fresh DiT
    c.model.wan.update(transformer, dtype="bfloat16", remat=True, attention_impl="auto")
    c.model.codec = dict(kind="vae", vae_path="", factor=8, chunk_size=4)
    c.model.context = dict(kind="none")  # the text: precomputed UMT5 embeddings in the batch
    c.train.update(global_batch_size=global_batch_size, num_steps=10_000)
    c.optim.update(lr=1e-5, warmup_steps=500, decay_steps=10_000, weight_decay=0.0, ema_decay=0.0)
    c.mesh.update(axes=("data", "fsdp"), shape=(1, -1), param_sharding="fsdp", param_rules=WAN_PARAM_RULES)
    # The sequence axis (docs/wan.md, "Scale"): a mesh axis each clip's tokens are split over,
    # e.g. --config.mesh.axes='("data","fsdp","sequence")' --config.mesh.shape='(1,-1,2)'
    # --config.model.wan.sequence_axis=sequence. None: a clip's tokens stay on one device. A
    # typed placeholder, so the command line can set it.
    c.model.wan.sequence_axis = ml_collections.config_dict.placeholder(str)
    c.sample.update(steps=50, guidance=5.0, window=FRAMES, overlap=0)
    return c


# Wan2.1-T2V-1.3B's config.json (architecture fields; WanTransformerConfig.wan21_t2v_1_3b).
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)


def get_config():
    return wan_scd_config(WAN21_1_3B, global_batch_size=8)
