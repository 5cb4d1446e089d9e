"""SCD's two-stage inference: extract the reference once, then denoise the targets.

Stage 1 (``extract_reference``) runs the UNet once over the clean reference latent
at the reference timestep and keeps every self-attention layer's reference keys and
values: the **reference cache**, a pytree mirroring the UNet's module tree,

    {"down_blocks.0": {"attentions.0": {"transformer_blocks.0": {"attn1":
        {"key": (B, N_r, H, D), "value": (B, N_r, H, D)}}}}, ..., "mid_block": ..., "up_blocks.k": ...}

with N_r the reference's tokens at that layer's resolution. Because the causal rule
never lets the target into the reference and the reference's timestep is fixed,
the cache is exact for every denoising step, both guidance branches and all frames.

Stage 2 (``denoise``) runs the whole sampler loop (one compiled program) over the
target latents with classifier-free guidance batched as [unconditional; conditional]:
the unconditional branch drops the reference (the targets attend only to
themselves) and the image-encoder context (zeros), as in training.

``denoise_joint`` is the same loop recomputing the reference at every step through
the joint forward: the plain reference the cached loop must equal (tests, benchmark).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from consist_jax.diffusion.guidance import make_guided_model_fn
from consist_jax.diffusion.samplers import sample_loop
from consist_jax.models.attention import CACHE_COLLECTION
from consist_jax.models.scd import SCDModel
from consist_jax.models.unet import UNet


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
) -> Reference:
    """Stage 1. reference_image (B, H, W, 3) in [-1, 1], reference_pose (B, H, W, 3) in [0, 1]."""
    latents = model.encode(frozen, reference_image)
    context = model.embed_reference(frozen, reference_image)
    t_ref = jnp.full((latents.shape[0],), reference_timestep, jnp.int32)
    _, variables = model.unet.apply(
        {"params": params},
        latents,
        t_ref,
        context,
        reference_pose,
        method=UNet.extract_reference,
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


def guidance_conditions(context: jax.Array):
    """(cond, uncond): the unconditional branch drops the reference and zeroes the context."""
    b = context.shape[0]
    cond = {"context": context, "reference_mask": jnp.ones((b,), bool)}
    uncond = {"context": jnp.zeros_like(context), "reference_mask": jnp.zeros((b,), bool)}
    return cond, uncond


def guided(model_fn, context: jax.Array, guidance: GuidanceConfig):
    """(x, t) -> guided prediction, both branches in one batched call."""
    cond, uncond = guidance_conditions(context)
    return make_guided_model_fn(model_fn, cond, uncond, guidance.scale, guidance.rescale)


def denoise(
    model: SCDModel,
    params: Any,
    reference: Reference,
    sampler: Any,
    noise: jax.Array,
    target_pose: Optional[jax.Array],
    guidance: GuidanceConfig = GuidanceConfig(),
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Stage 2: noise (B, F, h, w, C) -> target latents (B, F, h, w, C) against the cache.

    target_pose: (B, F, H, W, 3) in [0, 1] or None.
    """
    model_fn = functools.partial(cached_model_fn(model, params, reference), target_pose=target_pose)
    return sample_loop(sampler, guided(model_fn, reference.context, guidance), noise, rng)


def denoise_joint(
    model: SCDModel,
    params: Any,
    reference: Reference,
    sampler: Any,
    noise: jax.Array,
    reference_pose: Optional[jax.Array],
    target_pose: Optional[jax.Array],
    guidance: GuidanceConfig = GuidanceConfig(),
    rng: Optional[jax.Array] = None,
    reference_timestep: int = 0,
) -> jax.Array:
    """The loop of ``denoise`` with the reference recomputed at every step (joint forward)."""
    model_fn = functools.partial(joint_model_fn(model, params, reference, reference_pose, reference_timestep),
                                 target_pose=target_pose)
    return sample_loop(sampler, guided(model_fn, reference.context, guidance), noise, rng)
