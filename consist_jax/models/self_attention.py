"""SCD's self-attention layer: backends by name, one ``AttentionConfig``, the reference cache.

``AttentionConfig`` is what a model says about its attention (the rule, the backend,
float32 scores); ``UNetConfig.attention`` builds it from the config tree, and it is
carried as one value down to every ``SelfAttention`` layer.

Backends (``attention_impl``, one table: ``_BACKENDS``), all computing the same numbers:
  * ``"xla"`` (default): the decomposed form (``attention.XLA_BACKEND``).
  * ``"xla_joint"``: the plain reference, one masked joint sequence.
  * ``"xla_chunked"``: the decomposed form in query chunks with a recomputing
    backward (``attention.XLA_CHUNKED_BACKEND``): no (Nq, Nk) scores kept for the
    backward pass; faster than ``xla`` on CPU at a thousand tokens (BENCHMARKS.md,
    "Train step").
  * ``"cudnn"``: the decomposed form on cuDNN flash attention (GPU).
  * ``"splash"``: the joint form on the Pallas splash kernel, masked blocks skipped
    (TPU only).
  * ``"pallas"``: a Pallas flash kernel for the decomposed form (GPU only, via Triton).
  * ``"splash_interpret"``, ``"pallas_interpret"``: the same kernels in the Pallas
    interpreter, on any device (slow: for tests). Interpret mode is never chosen
    for you: a kernel named for a platform the computation does not target raises
    ``KernelUnavailableError``.
  * ``"auto"``: by the platform the computation targets (``target_platform``):
    TPU -> splash, GPU -> cudnn (xla where cuDNN cannot take the dtype / head dim),
    otherwise xla; it logs once what it picked and why.
The kernels live in ``attention_kernels.py``, imported on first use (Pallas).

The reference cache (two-stage sampling) also lives here: ``SelfAttention`` writes
its reference keys and values to the ``"reference_cache"`` variable collection in
``extract`` mode and reads them in ``cached`` mode. See ``ReferenceLayout``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.models.attention import XLA_BACKEND, XLA_CHUNKED_BACKEND, XLA_JOINT_BACKEND, AttentionBackend
from consist_jax.models.attention_rule import check_choice, check_rule, has_reference_cache

Dtype = Any

CACHE_COLLECTION = "reference_cache"


def _kernels():
    from consist_jax.models import attention_kernels  # Pallas: import on first use.

    return attention_kernels


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "xla": lambda: XLA_BACKEND,
    "xla_joint": lambda: XLA_JOINT_BACKEND,
    "xla_chunked": lambda: XLA_CHUNKED_BACKEND,
    "cudnn": lambda: _kernels().CUDNN,
    "splash": lambda: _kernels().SPLASH,
    "pallas": lambda: _kernels().PALLAS,
    "splash_interpret": lambda: _kernels().SPLASH_INTERPRET,
    "pallas_interpret": lambda: _kernels().PALLAS_INTERPRET,
    "auto": lambda: _kernels().auto_backend(),
}
ATTENTION_IMPLS = tuple(_BACKENDS)


def attention_backend(impl: str) -> AttentionBackend:
    """The backend called ``impl`` (one of ``ATTENTION_IMPLS``); ``auto`` resolves by
    ``target_platform()`` when traced."""
    check_choice("attention_impl", impl, ATTENTION_IMPLS)
    return _BACKENDS[impl]()


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How a model's self-attention computes (static, hashable: a module attribute).

    rule: "causal" (SCD) or "full" (the bidirectional ablation); see attention_rule.py.
    impl: the backend, one of ``ATTENTION_IMPLS``.
    upcast: float32 scores for low-precision inputs (diffusers' ``upcast_attention``).
    """

    rule: str = "causal"
    impl: str = "xla"
    upcast: bool = False

    def __post_init__(self):
        check_rule(self.rule)
        check_choice("attention_impl", self.impl, ATTENTION_IMPLS)

    @property
    def backend(self) -> AttentionBackend:
        return attention_backend(self.impl)


def reference_target_attention(
    ref: tuple[jax.Array, jax.Array, jax.Array],
    tgt: tuple[jax.Array, jax.Array, jax.Array],
    *,
    rule: str = "causal",
    impl: str = "xla",
    reference_mask: Optional[jax.Array] = None,
    upcast: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Self-attention of one reference and F target frames under SCD's rule.

    Args:
      ref: (q, k, v) of the reference, each (B, N_r, H, D).
      tgt: (q, k, v) of the targets, each (B, F, N_t, H, D).
      rule: "causal" (SCD) or "full" (bidirectional ablation).
      impl: one of ``ATTENTION_IMPLS``: "xla" (decomposed), "xla_joint" (one masked
        joint sequence), "cudnn", "splash", "pallas" or "auto" (see the module doc).
      reference_mask: (B,) bool, False hides the reference from that example's targets.
      upcast: float32 scores for low-precision inputs.

    Returns:
      (out_ref (B, N_r, H, D), out_tgt (B, F, N_t, H, D)).
    """
    check_rule(rule)
    return attention_backend(impl).rule(ref, tgt, rule, reference_mask, upcast)



@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """How the images of a UNet batch relate; static, so ``jit`` specialises on it.

    mode:
      * ``"none"``: N = B * F images without a reference; self-attention sees each
        image alone (F = 1: diffusers' UNet exactly; F > 1: a video's frames, which
        meet only in the temporal layers).
      * ``"joint"``: N = B * (1 + F), grouped per example as [reference, target_1..F].
      * ``"extract"``: N = B references; every self-attention layer stores its
        reference keys/values in the ``"reference_cache"`` collection (stage 1).
      * ``"cached"``: N = B * F targets; every self-attention layer reads the
        reference keys/values from the ``"reference_cache"`` collection (stage 2).
    num_frames: F, target frames per example.
    """

    mode: str = "none"
    num_frames: int = 1

    def __post_init__(self):
        check_choice("reference layout mode", self.mode, ("none", "joint", "extract", "cached"))
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    @property
    def images_per_example(self) -> int:
        return {"joint": 1 + self.num_frames, "extract": 1}.get(self.mode, self.num_frames)


def write_reference_cache(layer: nn.Module, key: jax.Array, value: jax.Array) -> None:
    """Stores ``layer``'s reference keys and values, each (B, N_r, H, D), for cached mode."""
    layer.put_variable(CACHE_COLLECTION, "key", key)
    layer.put_variable(CACHE_COLLECTION, "value", value)


def read_reference_cache(layer: nn.Module, rule: str, dtype) -> tuple[jax.Array, jax.Array]:
    """``layer``'s cached reference (key, value), each (B, N_r, H, D) in ``dtype``; a one-line
    error when ``rule`` has no cache or no extract pass filled it."""
    if not has_reference_cache(rule):
        raise ValueError(
            f"the reference cache needs the causal rule: under attention_rule={rule!r} the "
            f"reference depends on the target, so it cannot be computed once"
        )
    if not layer.has_variable(CACHE_COLLECTION, "key"):
        raise ValueError(
            f"cached mode needs the {CACHE_COLLECTION!r} collection from an extract pass "
            f"(missing at {'/'.join(layer.scope.path)})"
        )
    return (layer.get_variable(CACHE_COLLECTION, "key").astype(dtype),
            layer.get_variable(CACHE_COLLECTION, "value").astype(dtype))


class SelfAttention(nn.Module):
    """diffusers' ``Attention`` as a self-attention (``attn1``), SCD-aware.

    x (N, L, C) -> (N, L, C). Projections: to_q/to_k/to_v (no bias), to_out.0.

    Reference cache entry (``extract`` writes, ``cached`` reads), per layer:
      ``{"key": (B, N_r, H, D), "value": (B, N_r, H, D)}``.
    """

    heads: int
    head_dim: int
    attention: AttentionConfig = AttentionConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layout: ReferenceLayout = ReferenceLayout(),
        reference_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        n, length, channels = x.shape
        inner = self.heads * self.head_dim

        def project(name):
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x)
            return y.reshape(n, length, self.heads, self.head_dim)

        q, k, v = project("to_q"), project("to_k"), project("to_v")
        if layout.mode in ("none", "extract"):
            if layout.mode == "extract":
                write_reference_cache(self, k, v)
            out = self.attention.backend.plain(q, k, v, upcast=self.attention.upcast)
        elif layout.mode == "joint":
            out = self._joint(q, k, v, layout, reference_mask)
        else:
            out = self._cached(q, k, v, layout, reference_mask)
        out = out.reshape(n, length, inner)
        return nn.Dense(channels, dtype=self.dtype, name="to_out.0")(out)

    def _joint(self, q, k, v, layout, reference_mask):
        groups = layout.images_per_example
        b = q.shape[0] // groups
        grouped = [a.reshape(b, groups, *a.shape[1:]) for a in (q, k, v)]
        config = self.attention
        out_ref, out_tgt = reference_target_attention(
            tuple(a[:, 0] for a in grouped),
            tuple(a[:, 1:] for a in grouped),
            rule=config.rule,
            impl=config.impl,
            reference_mask=reference_mask,
            upcast=config.upcast,
        )
        return jnp.concatenate([out_ref[:, None], out_tgt], axis=1).reshape(q.shape)

    def _cached(self, q, k, v, layout, reference_mask):
        k_ref, v_ref = read_reference_cache(self, self.attention.rule, k.dtype)
        b, f = k_ref.shape[0], layout.num_frames
        if q.shape[0] != b * f:
            raise ValueError(
                f"reference cache holds {b} examples but the target batch has {q.shape[0]} "
                f"images for {f} frame(s) each; tile the cache to the target batch first"
            )
        grouped = [a.reshape(b, f, *a.shape[1:]) for a in (q, k, v)]
        target = self.attention.backend.target
        out = target(*grouped, k_ref, v_ref, reference_mask, upcast=self.attention.upcast)
        return out.reshape(q.shape)
