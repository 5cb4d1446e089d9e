"""SCD's two-stage inference: extract the reference once, then denoise the targets.

Stage 1 (``extract_reference``) runs the UNet once over the clean reference latent
at the reference timestep and keeps every self-attention layer's reference keys and
values: the **reference cache**, a pytree mirroring the UNet's module tree,

    {"down_blocks.0": {"attentions.0": {"transformer_blocks.0": {"attn1":
        {"key": (B, N_r, H, D), "value": (B, N_r, H, D)}}}}, ..., "mid_block": ..., "up_blocks.k": ...}

with N_r the reference's tokens at that layer's resolution. Because the causal rule
never lets the target into the reference and the reference's timestep is fixed,
the cache is exact for every denoising step, both guidance branches and all frames.

Stage 2 (``denoise``, the one denoiser) runs the whole sampler loop (one compiled
program) over the target latents with classifier-free guidance batched as
[unconditional; conditional]: the unconditional branch drops the reference (the
targets attend only to themselves) and the image-encoder context (zeros), as in
training. Its arguments choose

* ``window`` / ``overlap``: videos of any length. At every step the F frames are cut
  into windows of ``window`` frames overlapping by ``overlap``; each window is one
  guided UNet call (its frames meet in the motion module, all of them read the same
  reference cache), and a frame covered by several windows takes the mean of their
  predictions. The windows run in a ``lax.scan``, so memory is bounded by one window,
  not by the video. ``window=None``: the whole clip in one call per step.
* ``joint``: recompute the reference at every call through the joint forward instead
  of reading the cache: the plain reference the cached loop must equal (tests,
  benchmark), and the only way to sample a model whose rule has no reference cache
  (``attention_rule.has_reference_cache``: the full-rule ablation).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.diffusion.guidance import batch_conditions, guided_prediction, make_guided_model_fn
from consist_jax.diffusion.samplers import sample_loop
from consist_jax.models.self_attention import CACHE_COLLECTION
from consist_jax.models.scd import SCDModel


@dataclasses.dataclass(frozen=True)
class Reference:
    """What stage 1 produces for B references (a pytree).

    cache: the reference cache (see module docstring).
    context: (B, L, D) cross-attention context from the reference image.
    latents: (B, h, w, C) the reference latent (kept for the joint path and baselines).
    """

    cache: Any
    context: jax.Array
    latents: jax.Array


jax.tree_util.register_dataclass(Reference, data_fields=["cache", "context", "latents"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    scale: float = 3.5  # 1.0: the conditional prediction (both branches still run)
    rescale: float = 0.0  # diffusers' guidance_rescale


def extract_reference(
    model: SCDModel,
    params: Any,
    frozen: Any,
    reference_image: jax.Array,
    reference_pose: Optional[jax.Array],
    reference_timestep: int = 0,
    context: Optional[jax.Array] = None,
) -> Reference:
    """Stage 1. reference_image (B, H, W, 3) in [-1, 1], reference_pose (B, H, W, 3) in [0, 1].

    context: (B, L, D) a caption embedding (model.context.kind "text"); None: the model's
    context computed from the reference image."""
    latents = model.encode(frozen, reference_image)
    context = model.embed_reference(frozen, reference_image) if context is None else context
    t_ref = jnp.full((latents.shape[0],), reference_timestep, jnp.int32)
    _, variables = model.unet.apply(
        {"params": params},
        latents,
        t_ref,
        context,
        reference_pose,
        method="extract_reference",  # UNet's or any model's with its contract (WanSCD)
        mutable=[CACHE_COLLECTION],
    )
    return Reference(variables[CACHE_COLLECTION], context, latents)


def _tile(tree: Any, times: int) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * times, axis=0), tree)


def _both_branches(poses: Optional[jax.Array]) -> Optional[jax.Array]:
    return None if poses is None else _tile(poses, 2)


def cached_model_fn(model: SCDModel, params: Any, reference: Reference):
    """(x (2B, F, h, w, C), t (2B,), condition, target_pose (B, F, H, W, 3) | None) -> prediction:
    the UNet against the cache.

    condition = {"context": (2B, L, D), "reference_mask": (2B,)}. The cache is the same
    for both guidance branches and every call, so it is tiled here once; the poses,
    which change between temporal windows, are tiled per call.
    """
    cache = _tile(reference.cache, 2)

    def model_fn(x, t, condition, target_pose=None):
        return model.unet.apply(
            {"params": params, CACHE_COLLECTION: cache},
            x,
            t,
            condition["context"],
            target_pose=_both_branches(target_pose),
            reference_mask=condition["reference_mask"],
            use_reference_cache=True,
        )

    return model_fn


def joint_model_fn(model: SCDModel, params: Any, reference: Reference, reference_pose,
                   reference_timestep: int = 0):
    """The same contract as ``cached_model_fn``, recomputing the reference at every call."""
    ref_latents = _tile(reference.latents, 2)
    ref_pose = _both_branches(reference_pose)

    def model_fn(x, t, condition, target_pose=None):
        b = x.shape[0]
        return model.unet.apply(
            {"params": params},
            x,
            t,
            condition["context"],
            reference=ref_latents,
            reference_timesteps=jnp.full((b,), reference_timestep, jnp.int32),
            reference_pose=ref_pose,
            target_pose=_both_branches(target_pose),
            reference_mask=condition["reference_mask"],
        )

    return model_fn


def guidance_conditions(context: jax.Array, negative_context: Optional[jax.Array] = None):
    """(cond, uncond): the unconditional branch drops the reference and zeroes the context, as
    training drops them; ``negative_context`` (the context's shape (B, L, D)) replaces the zeros
    (e.g. a negative caption's embedding)."""
    b = context.shape[0]
    cond = {"context": context, "reference_mask": jnp.ones((b,), bool)}
    negative = jnp.zeros_like(context) if negative_context is None else negative_context.astype(context.dtype)
    if negative.shape != context.shape:  # both branches run as one batch: one context length
        raise ValueError(f"negative context {negative.shape} must have the context's shape {context.shape}")
    uncond = {"context": negative, "reference_mask": jnp.zeros((b,), bool)}
    return cond, uncond


def guided(model_fn, context: jax.Array, guidance: GuidanceConfig, negative_context: Optional[jax.Array] = None):
    """(x, t) -> guided prediction, both branches in one batched call."""
    cond, uncond = guidance_conditions(context, negative_context)
    return make_guided_model_fn(model_fn, cond, uncond, guidance.scale, guidance.rescale)


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


def _windowed(prediction: Callable, num_frames: int, window: int, overlap: int,
              progress: Optional[Callable[[], None]]) -> Callable:
    """(x, t) -> the mean over the temporal windows covering each frame of
    ``prediction(x, t, start, length)``; x (B, F, ...)."""
    length = min(window, num_frames)
    starts = window_starts(num_frames, window, overlap)
    coverage = jnp.zeros((num_frames,), jnp.float32)
    for start in starts:  # static: how many windows cover each frame
        coverage = coverage.at[int(start):int(start) + length].add(1.0)

    def blended(x, t):
        def add_window(total, start):
            pred = prediction(x, t, start, length)
            if progress is not None:
                jax.debug.callback(progress)
            current = jax.lax.dynamic_slice_in_dim(total, start, length, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(total, current + pred, start, axis=1), None

        total, _ = jax.lax.scan(add_window, jnp.zeros_like(x, jnp.float32), jnp.asarray(starts))
        return total / coverage.reshape(1, num_frames, *([1] * (x.ndim - 2)))

    return blended


def denoise(
    model: SCDModel,
    params: Any,
    reference: Reference,
    sampler: Any,
    noise: jax.Array,
    target_pose: Optional[jax.Array],
    guidance: GuidanceConfig = GuidanceConfig(),
    rng: Optional[jax.Array] = None,
    *,
    window: Optional[int] = None,
    overlap: int = 0,
    joint: bool = False,
    reference_pose: Optional[jax.Array] = None,
    reference_timestep: int = 0,
    progress: Optional[Callable[[], None]] = None,
    negative_context: Optional[jax.Array] = None,
) -> jax.Array:
    """Stage 2: noise (B, F, h, w, C) -> target latents (B, F, h, w, C).

    target_pose: (B, F, H, W, 3) in [0, 1] or None.
    window, overlap: temporal windows (module docstring); ``window=None`` runs the whole
      clip in one call per step, which ``window >= F`` equals to float rounding.
    joint: recompute the reference in every call (``reference_pose`` (B, H, W, 3) in
      [0, 1] and ``reference_timestep`` as in ``extract_reference``) instead of reading
      ``reference.cache``.
    progress: a host function (no arguments) called after each window of each step
      (``steps * len(window_starts(F, window, overlap))`` calls), or after each step
      without windows.
    negative_context: (B, L, D) the unconditional branch's context (``guidance_conditions``);
      None: zeros.
    """
    # Built once, outside the loops: the cache (or reference) is tiled for both branches here.
    model_fn = (joint_model_fn(model, params, reference, reference_pose, reference_timestep) if joint
                else cached_model_fn(model, params, reference))
    if window is None:
        prediction = guided(functools.partial(model_fn, target_pose=target_pose), reference.context, guidance,
                            negative_context)
        return sample_loop(sampler, prediction, noise, rng, progress)

    conditions = batch_conditions(*guidance_conditions(reference.context, negative_context))

    def window_prediction(x, t, start, length):
        x_w = jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)
        pose_w = None if target_pose is None else jax.lax.dynamic_slice_in_dim(target_pose, start, length, axis=1)
        fn = functools.partial(model_fn, target_pose=pose_w)
        return guided_prediction(fn, x_w, t, conditions, guidance.scale, guidance.rescale)

    blended = _windowed(window_prediction, noise.shape[1], window, overlap, progress)
    return sample_loop(sampler, blended, noise, rng)
