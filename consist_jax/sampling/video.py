"""Videos of any length: overlapping temporal windows whose predictions are averaged.

At every denoising step the F frames are cut into windows of ``window`` frames
that overlap by ``overlap``; each window is one guided UNet call (its frames meet
in the motion module, and all of them read the same reference cache), and a frame
covered by several windows takes the mean of their predictions. The windows run in
a ``lax.scan``, so memory is bounded by one window, not by the video.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.diffusion.guidance import batch_conditions, guided_prediction
from consist_jax.diffusion.samplers import sample_loop
from consist_jax.sampling.two_stage import (
    GuidanceConfig, Reference, cached_model_fn, guidance_conditions, joint_model_fn)


def window_starts(num_frames: int, window: int, overlap: int) -> np.ndarray:
    """First frame of each window; the last window ends at the last frame. (num_windows,)."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap={overlap} must be in [0, window={window})")
    if num_frames <= window:
        return np.zeros((1,), np.int32)
    starts = list(range(0, num_frames - window + 1, window - overlap))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return np.asarray(starts, np.int32)


def denoise_video(
    model: Any,
    params: Any,
    reference: Reference,
    sampler: Any,
    noise: jax.Array,
    target_pose: Optional[jax.Array],
    guidance: GuidanceConfig = GuidanceConfig(),
    window: int = 24,
    overlap: int = 4,
    rng: Optional[jax.Array] = None,
    progress: Optional[Callable[[], None]] = None,
    *,
    joint: bool = False,
    reference_pose: Optional[jax.Array] = None,
    reference_timestep: int = 0,
) -> jax.Array:
    """noise (B, F, h, w, C) -> latents (B, F, h, w, C), in temporal windows against the cache.

    target_pose: (B, F, H, W, 3) in [0, 1] or None. With ``window >= F`` this is exactly
    ``two_stage.denoise``. ``progress`` (host, no arguments) is called after each window
    of each step: ``steps * len(window_starts(F, window, overlap))`` calls in all.
    ``joint=True`` recomputes the reference in every call instead of reading the cache
    (needs ``reference_pose``): the only way to sample a model trained with the full
    (bidirectional) attention rule, whose reference depends on the targets.
    """
    b, f = noise.shape[:2]
    length = min(window, f)
    starts = window_starts(f, window, overlap)
    conditions = batch_conditions(*guidance_conditions(reference.context))
    coverage = jnp.zeros((f,), jnp.float32)
    for start in starts:  # static: how many windows cover each frame
        coverage = coverage.at[int(start):int(start) + length].add(1.0)

    # Built once, outside the loops: the cache (or reference) is tiled for both branches here.
    base_fn = (joint_model_fn(model, params, reference, reference_pose, reference_timestep) if joint
               else cached_model_fn(model, params, reference))

    def window_prediction(x, t, start):
        x_w = jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)
        pose_w = None if target_pose is None else jax.lax.dynamic_slice_in_dim(target_pose, start, length, axis=1)
        model_fn = functools.partial(base_fn, target_pose=pose_w)
        return guided_prediction(model_fn, x_w, t, conditions, guidance.scale, guidance.rescale)

    def blended(x, t):
        def add_window(total, start):
            pred = window_prediction(x, t, start)
            if progress is not None:
                jax.debug.callback(progress)
            current = jax.lax.dynamic_slice_in_dim(total, start, length, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(total, current + pred, start, axis=1), None

        total, _ = jax.lax.scan(add_window, jnp.zeros_like(x, jnp.float32), jnp.asarray(starts))
        return total / coverage.reshape(1, f, *([1] * (x.ndim - 2)))

    return sample_loop(sampler, blended, noise, rng)
