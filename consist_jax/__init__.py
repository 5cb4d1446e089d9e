"""consist_jax: Spatially Conditioned Diffusion (SCD) in JAX/Flax."""
from consist_jax.convert.unet import init_unet_params, load_unet
from consist_jax.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "init_unet_params", "load_unet"]
