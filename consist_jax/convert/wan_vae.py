"""diffusers ``AutoencoderKLWan`` folder -> (Flax AutoencoderKLWan module, params)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.convert.loading import config_from_file, load_params_from_folder, to_jax_params
from consist_jax.models.wan_vae import ENCODE_CHUNK_FRAMES, AutoencoderKLWan, WanVAEConfig


def wan_vae_param_shapes(config: WanVAEConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation).

    The example clip has two latent frames, so the temporal resamplers' convolutions
    (unused by a one-frame clip) are created too.
    """
    size = config.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1 + ENCODE_CHUNK_FRAMES, size, size, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda r, x: AutoencoderKLWan(config).init(r, x)["params"], jax.random.key(0), video)


def load_wan_vae(folder: str, dtype: Any = jnp.float32, **overrides) -> tuple[AutoencoderKLWan, dict]:
    """Reads a diffusers ``AutoencoderKLWan`` folder (config.json + diffusion_pytorch_model
    [.fp16].safetensors or a sharded index) into ``(AutoencoderKLWan module, params)``.

    Every tensor of the file must map onto a parameter and the reverse (errors name the
    key); ``dtype`` is the parameter and compute dtype (fp16 files are cast). ``overrides``
    set WanVAEConfig fields. Use with ``consist_jax.models.wan_vae.encode`` / ``decode``.
    """
    config = config_from_file(WanVAEConfig.from_diffusers, folder, dtype=dtype, **overrides)
    params = load_params_from_folder(
        folder, "diffusion_pytorch_model", wan_vae_param_shapes(config), dtype=np.dtype(jnp.dtype(dtype)))
    return AutoencoderKLWan(config), to_jax_params(params)
