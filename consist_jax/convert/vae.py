"""diffusers VAE folder -> (AutoencoderKL module, params)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from consist_jax.convert.loading import config_from_file, load_params_from_folder, to_jax_params
from consist_jax.models.vae import AutoencoderKL, VAEConfig, vae_param_shapes

# Checkpoints saved before diffusers renamed the attention projections (still on the Hub).
LEGACY_ATTENTION_RENAMES = (
    (r"(mid_block\.attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(mid_block\.attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(mid_block\.attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(mid_block\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)


def load_vae(folder: str, dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict]:
    """Reads a diffusers VAE folder into ``(AutoencoderKL module, params)``.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the
    ``.fp16.safetensors`` variant, or a sharded index); fp16 files are cast to ``dtype``,
    which is both the parameter and the compute dtype. Pre-0.14 attention names
    (query/key/value/proj_attn) are renamed. Apply with ``{"params": params}``.
    """
    config = config_from_file(VAEConfig.from_diffusers, folder, dtype=dtype)
    params = load_params_from_folder(
        folder,
        "diffusion_pytorch_model",
        vae_param_shapes(config),
        rename_rules=LEGACY_ATTENTION_RENAMES,
        dtype=np.dtype(jnp.dtype(dtype)),
    )
    return AutoencoderKL(config), to_jax_params(params)
