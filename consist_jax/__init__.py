"""consist_jax: Spatially Conditioned Diffusion (SCD) in JAX/Flax."""
from consist_jax.convert.unet import init_unet_params, load_unet
from consist_jax.models.clip_vision import load_image_encoder
from consist_jax.models.unet import UNet, UNetConfig
from consist_jax.models.vae import load_vae

__all__ = ["UNet", "UNetConfig", "init_unet_params", "load_image_encoder", "load_unet", "load_vae"]
