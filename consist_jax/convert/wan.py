"""diffusers Wan transformer folder -> (WanTransformer module, params)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.convert.loading import config_from_file, load_params_from_folder, to_jax_params
from consist_jax.models.wan_transformer import WanTransformer, WanTransformerConfig

# diffusers' _keys_to_ignore_on_load_unexpected: early I2V files carry an unused query norm.
IGNORED_KEYS = (r"\.norm_added_q\.",)
# diffusers' _keep_in_fp32_modules (any dotted component of the key): these stay float32
# when the model is loaded in bf16 / fp16. ("rope" has no parameters.)
FLOAT32_KEYS = (r"(^|\.)(time_embedder|scale_shift_table|norm1|norm2|norm3)(\.|$)",)


def example_inputs(config: WanTransformerConfig) -> dict:
    """The smallest inputs that create every parameter: one patch, one text token."""
    inputs = {
        "sample": jnp.zeros((1, *config.patch_size, config.in_channels), config.dtype),
        "timesteps": jnp.zeros((1,), jnp.int32),
        "context": jnp.zeros((1, 1, config.text_dim), config.dtype),
    }
    if config.image_dim is not None:  # FLF2V: two images of pos_embed_seq_len / 2 tokens
        pairs, length = (2, config.pos_embed_seq_len // 2) if config.pos_embed_seq_len else (1, 1)
        inputs["image_context"] = jnp.zeros((pairs, length, config.image_dim), config.dtype)
    return inputs


def transformer_param_shapes(config: WanTransformerConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (nothing computed, nothing allocated)."""
    return jax.eval_shape(
        lambda r: WanTransformer(config).init(r, **example_inputs(config))["params"], jax.random.key(0))


def init_transformer_params(config: WanTransformerConfig, rng: jax.Array) -> dict:
    """Random initial parameters (float32): a plain pytree."""
    return jax.jit(lambda r: WanTransformer(config).init(r, **example_inputs(config))["params"])(rng)


def load_transformer(folder: str, dtype: Any = jnp.float32, **overrides):
    """Reads a diffusers ``WanTransformer3DModel`` folder (config.json +
    diffusion_pytorch_model[.fp16].safetensors or a sharded index) into
    ``(WanTransformer module, params)``.

    ``dtype`` is the compute dtype and the dtype of the parameters, except those diffusers
    keeps in float32 (``FLOAT32_KEYS``: the time embedder, modulation tables and block norms);
    norms, rotary and the modulation run in float32. fp32 / bf16 / fp16 files are cast. ``overrides``
    set our options (``remat``). Every tensor of the file is used and every parameter
    is read from it; a missing, unexpected or misshapen key is a CheckpointError
    naming it.
    """
    config = config_from_file(WanTransformerConfig.from_diffusers, folder, dtype=dtype, **overrides)
    params = load_params_from_folder(
        folder,
        "diffusion_pytorch_model",
        transformer_param_shapes(config),
        ignore_unexpected=IGNORED_KEYS,
        dtype=np.dtype(jnp.dtype(dtype)),
        float32_keys=FLOAT32_KEYS,
    )
    return WanTransformer(config), to_jax_params(params)
