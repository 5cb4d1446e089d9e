"""Classifier-free guidance with both branches in one batched model call.

    guided = uncond + w * (cond - uncond)                   (Ho & Salimans 2022)
optionally followed by diffusers' `rescale_noise_cfg` (Lin et al. 2023, Sec. 3.4), which
matches the guided prediction's standard deviation to the conditional one's.

The unconditional and conditional branches are stacked along the batch axis as
[uncond; cond] (diffusers' order), run through the model once, and split again. In SCD
the unconditional branch drops the CLIP embedding and the reference together, so the
"condition" is any pytree (embeddings, reference caches, pose features); every leaf
must have the batch on axis 0.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# model_fn(x (2B, ...), t (2B,), condition pytree with (2B, ...) leaves) -> (2B, ...)
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def combine_guidance(uncond_output: jax.Array, cond_output: jax.Array, guidance_scale) -> jax.Array:
    """uncond + guidance_scale * (cond - uncond); arrays (B, ...), scale a float or ()."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


def rescale_noise_cfg(guided_output: jax.Array, cond_output: jax.Array, guidance_rescale) -> jax.Array:
    """diffusers' `rescale_noise_cfg`: mix the guided output with a copy rescaled to the
    conditional output's per-sample std (std over all non-batch axes, unbiased as torch).

    Args: guided_output, cond_output (B, ...); guidance_rescale in [0, 1] (0: no-op).
    Returns (B, ...).
    """
    axes = tuple(range(1, guided_output.ndim))
    std_cond = jnp.std(cond_output, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided_output, axis=axes, keepdims=True, ddof=1)
    rescaled = guided_output * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided_output


def batch_conditions(cond: Any, uncond: Any) -> Any:
    """Stack two condition pytrees of the same structure as [uncond; cond] on axis 0.

    Do this once, outside the denoising loop, and pass the result to `guided_prediction`.
    """
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def guided_prediction(model_fn: ModelFn, x: jax.Array, t: jax.Array, batched_condition: Any,
                      guidance_scale, guidance_rescale: float = 0.0) -> jax.Array:
    """Evaluate both branches in one model call and combine them.

    Args:
      model_fn: (x (2B, ...), t (2B,), condition) -> output (2B, ...).
      x: (B, ...) latents (already scaled by the sampler's scale_model_input).
      t: () or (B,) timestep(s).
      batched_condition: pytree from `batch_conditions(cond, uncond)`, leaves (2B, ...).
      guidance_scale: w (float or () array); guidance_rescale: diffusers' phi, a Python
        float (0: off).
    Returns the guided output (B, ...).
    """
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    outputs = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                       batched_condition)
    uncond_output, cond_output = outputs[:batch], outputs[batch:]
    guided = combine_guidance(uncond_output, cond_output, guidance_scale)
    if guidance_rescale:  # a Python float: 0 skips the extra reductions entirely
        guided = rescale_noise_cfg(guided, cond_output, guidance_rescale)
    return guided


def make_guided_model_fn(model_fn: ModelFn, cond: Any, uncond: Any, guidance_scale,
                         guidance_rescale: float = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A (x (B, ...), t) -> guided output (B, ...) function for `samplers.sample_loop`.

    The conditions are stacked once here, not at every step.
    """
    batched_condition = batch_conditions(cond, uncond)

    def guided_model_fn(x, t):
        return guided_prediction(model_fn, x, t, batched_condition, guidance_scale, guidance_rescale)

    return guided_model_fn
