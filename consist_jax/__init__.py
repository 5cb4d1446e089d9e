"""consist_jax: Spatially Conditioned Diffusion (SCD) in JAX/Flax."""
