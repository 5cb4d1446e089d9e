"""consist_jax: Spatially Conditioned Diffusion (SCD) in JAX/Flax.

The top-level names load lazily, so ``import consist_jax.data`` (grain workers, the
synthetic-data generator) does not pay for importing JAX and Flax.
"""
import importlib

_EXPORTS = {
    "UNet": "consist_jax.models.unet",
    "UNetConfig": "consist_jax.models.unet",
    "init_unet_params": "consist_jax.convert.unet",
    "load_unet": "consist_jax.convert.unet",
    "load_vae": "consist_jax.convert.vae",
    "load_wan_vae": "consist_jax.convert.wan_vae",
    "load_image_encoder": "consist_jax.convert.clip_vision",
    "load_transformer": "consist_jax.convert.wan",
    "load_text_encoder": "consist_jax.convert.umt5",
    "UMT5Encoder": "consist_jax.models.umt5",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'consist_jax' has no attribute {name!r}")
