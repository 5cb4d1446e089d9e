"""SCD on Wan2.1-T2V-1.3B at 480p (480x832, 81 frames: 21 latent frames of 60x104 under
Wan's VAE), FSDP over every chip, bfloat16 compute, each block rematerialised.

    python train.py --config=configs/wan_1_3b_scd.py --workdir=runs/wan_1_3b \\
        --config.model.pretrained_transformer=/path/to/Wan2.1-T2V-1.3B-Diffusers/transformer \\
        --config.model.codec.vae_path=/path/to/Wan2.1-T2V-1.3B-Diffusers/vae \\
        --config.data.pipeline.text_embeddings_dir=DATA_text --config.data.pipeline.captions=captions.json

The text: ``model.context.kind = "text"``, each video's caption embedding precomputed once with
Wan's UMT5 (``python -m consist_jax.convert.caption_encoder``, docs/wan.md "Text conditioning")
and carried by the batch (B, 512, 4096); ``data.pipeline.default_caption`` gives one caption to
every video.

What trains: the DiT (every parameter) plus SCD's fresh pose embedding, with flow matching
as Wan trains (``diffusion.kind = "flow"``: x_t = (1 - sigma) x0 + sigma eps, the velocity
eps - x0 as target, the model at timestep sigma * 1000; sigmas uniform over the shift-3.0
table, Wan2.1's 480p shift) on the targets' tokens only, the reference clean at timestep 0.
The codec is Wan's causal video VAE (``model.codec.kind = "wan_vae"``, frozen): 81 frames ->
21 latent frames, the reference image a one-frame clip; the pose frames go onto the same
latent time grid (4 frames stacked per latent frame, frame 0 repeated) and are
pixel-unshuffled by 8 into the pose embedding. ``vae_path`` "" builds a RANDOM Wan VAE (the
ahead-of-time compile needs only shapes): set it for a real run. Sampling: flow_unipc (Wan's
scheduler), 50 steps, the whole 21-latent-frame clip as one window.

Parameters stay float32 (the optimiser's master copy); ``model.wan.dtype`` is the compute
dtype. mesh.param_rules: ``training/sharding.py: WAN_PARAM_RULES``. FSDP splits the weights
and the batch; ``model.wan.sequence_axis`` (off here) also splits each clip's tokens over a
mesh axis, for a global batch smaller than the chips (docs/wan.md, "Scale").
"""

from configs.common import base_config
from consist_jax.training.sharding import WAN_PARAM_RULES

RESOLUTION = (480, 832)
FRAMES = 81  # 21 latent frames under Wan's 4x temporal compression
LATENT_FRAMES = 21
FLOW_SHIFT_480P = 3.0  # Wan2.1's scheduler_config flow_shift for 480p (5.0 for 720p)


def use_wan_vae_and_flow(c, wan_vae=None, flow_shift: float = FLOW_SHIFT_480P):
    """Wan's training recipe on config ``c``: the Wan VAE codec (``wan_vae``: WanVAEConfig
    fields of a fresh VAE, {} = Wan2.1's; ignored once codec.vae_path is set), flow matching
    at ``flow_shift``, flow_unipc sampling. Shared with the tests' tiny variant."""
    c.model.codec = dict(kind="wan_vae", vae_path="", wan_vae=dict(wan_vae or {}), seed=0)
    c.diffusion.update(kind="flow", flow_shift=flow_shift, flow_density="uniform", prediction_type="flow_prediction")
    c.sample.update(sampler="flow_unipc")
    return c


def wan_scd_config(transformer: dict, global_batch_size: int):
    c = base_config()
    c.data.pipeline.update(resolution=RESOLUTION, clip_length=FRAMES, crop_scale=(1.0, 1.0), center_crop=True,
                           flip_probability=0.0)
    c.model.backbone = "wan"
    c.model.pretrained_transformer = ""  # a diffusers folder (the flag above); "" trains a fresh DiT
    c.model.wan.update(transformer, dtype="bfloat16", remat=True, attention_impl="auto")
    use_wan_vae_and_flow(c)
    c.model.context = dict(kind="text")  # precomputed UMT5 caption embeddings in the batch
    c.train.update(global_batch_size=global_batch_size, num_steps=10_000)
    c.optim.update(lr=1e-5, warmup_steps=500, decay_steps=10_000, weight_decay=0.0, ema_decay=0.0)
    c.mesh.update(axes=("data", "fsdp"), shape=(1, -1), param_sharding="fsdp", param_rules=WAN_PARAM_RULES)
    c.sample.update(steps=50, guidance=5.0, window=LATENT_FRAMES, overlap=0)
    return c


# Wan2.1-T2V-1.3B's config.json (architecture fields; WanTransformerConfig.wan21_t2v_1_3b).
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)


def get_config():
    return wan_scd_config(WAN21_1_3B, global_batch_size=8)
