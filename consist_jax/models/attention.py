"""The causal reference/target attention of SCD: the one home of the rule.

Reference tokens R and target tokens T share the projections of a self-attention
layer. Under the **causal** rule (docs/method.md, "The causal rule")

    out_R = softmax(Q_R K_R^T / sqrt(d)) V_R                    # reference sees itself
    out_T = softmax(Q_T [K_R ; K_T]^T / sqrt(d)) [V_R ; V_T]     # target sees R and itself

and for F target frames, frame f sees ``[K_R ; K_Tf]``; frames meet only in the
temporal (motion) layers. The **full** rule (an ablation) lets the reference see
every token as well: ``out_R = attend(Q_R, [K_R ; K_T1 ; ... ; K_TF])``.

A per-example ``reference_mask`` (B,) of booleans hides the reference from the
targets where it is False: that is classifier-free guidance's "reference dropped"
branch (the target then attends to itself only).

Implementations (``attention_impl``, one table: ``_BACKENDS``), all computing the
same numbers:
  * ``"xla"`` (default): decomposed. The reference block and each frame's
    ``[R ; T_f]`` block are separate attentions, so the masked (reference-query,
    target-key) block is never computed: N_r^2 + F N_t (N_r + N_t) scores instead
    of (N_r + F N_t)^2.
  * ``"xla_joint"``: the plain reference. One joint sequence ``[R ; T_1 ; ... ; T_F]``
    with a block mask built from segment ids.
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
The kernels live in ``attention_kernels.py``, imported on first use. A backend is
three entry points (``AttentionBackend``): plain self-attention (no reference), the
target half (the reference cache) and the whole rule.

The reference cache (two-stage sampling) also lives here: ``SelfAttention`` writes
its reference keys and values to the ``"reference_cache"`` variable collection in
``extract`` mode and reads them in ``cached`` mode. See ``ReferenceLayout``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

Dtype = Any

ATTENTION_RULES = ("causal", "full")
CACHE_COLLECTION = "reference_cache"


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


# --------------------------------------------------------------------------- primitive


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    upcast: bool = False,
) -> jax.Array:
    """Softmax attention. query (B, Nq, H, D), key/value (B, Nk, H, D) -> (B, Nq, H, D).

    mask: boolean, broadcastable to (B, H, Nq, Nk); True = may attend. Every query
    must see at least one key. ``upcast`` computes the scores in float32 even for
    bf16 inputs (diffusers' ``upcast_attention``); the softmax is always float32.
    """
    scale = query.shape[-1] ** -0.5
    if upcast:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query * jnp.asarray(scale, query.dtype), key)
    scores = scores.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


# --------------------------------------------------------------------------- the rule


def target_attention(
    q_tgt: jax.Array,
    k_tgt: jax.Array,
    v_tgt: jax.Array,
    k_ref: jax.Array,
    v_ref: jax.Array,
    reference_mask: Optional[jax.Array] = None,
    *,
    upcast: bool = False,
) -> jax.Array:
    """The target half of the causal rule: each frame attends to ``[R ; itself]``.

    q/k/v_tgt (B, F, N_t, H, D); k/v_ref (B, N_r, H, D) (fresh or from the cache);
    reference_mask (B,) bool or None -> (B, F, N_t, H, D).
    """
    b, f, n_t, h, d = q_tgt.shape
    n_r = k_ref.shape[1]
    keys = jnp.concatenate([jnp.broadcast_to(k_ref[:, None], (b, f, n_r, h, d)), k_tgt], axis=2)
    values = jnp.concatenate([jnp.broadcast_to(v_ref[:, None], (b, f, n_r, h, d)), v_tgt], axis=2)
    mask = None
    if reference_mask is not None:
        visible = jnp.concatenate(
            [jnp.broadcast_to(reference_mask[:, None], (b, n_r)), jnp.ones((b, n_t), bool)], axis=1
        )
        mask = jnp.repeat(visible, f, axis=0)[:, None, None, :]  # (B*F, 1, 1, N_r + N_t)
    out = dot_product_attention(
        q_tgt.reshape(b * f, n_t, h, d),
        keys.reshape(b * f, n_r + n_t, h, d),
        values.reshape(b * f, n_r + n_t, h, d),
        mask,
        upcast=upcast,
    )
    return out.reshape(b, f, n_t, h, d)


def _decomposed_attention(ref, tgt, rule, reference_mask, upcast):
    """The rule as separate attentions; the masked block is never computed."""
    (q_r, k_r, v_r), (q_t, k_t, v_t) = ref, tgt
    if rule == "causal":
        out_ref = dot_product_attention(q_r, k_r, v_r, upcast=upcast)
    else:  # full: the reference also reads every target frame.
        b, f, n_t, h, d = k_t.shape
        keys = jnp.concatenate([k_r, k_t.reshape(b, f * n_t, h, d)], axis=1)
        values = jnp.concatenate([v_r, v_t.reshape(b, f * n_t, h, d)], axis=1)
        out_ref = dot_product_attention(q_r, keys, values, upcast=upcast)
    out_tgt = target_attention(q_t, k_t, v_t, k_r, v_r, reference_mask, upcast=upcast)
    return out_ref, out_tgt


def segment_mask(
    n_ref: int, n_tgt: int, num_frames: int, rule: str, reference_mask: Optional[jax.Array]
) -> jax.Array:
    """Block mask of the joint sequence ``[R ; T_1 ; ... ; T_F]``: (B or 1, 1, N, N) bool.

    Segment 0 is the reference, segment f the f-th target frame. Query segment s may
    read key segment s, and key segment 0 (the reference); under the full rule the
    reference also reads everything.
    """
    seg = jnp.concatenate(
        [jnp.zeros((n_ref,), jnp.int32), jnp.repeat(jnp.arange(1, num_frames + 1), n_tgt)]
    )
    q_seg, k_seg = seg[:, None], seg[None, :]
    allowed = (q_seg == k_seg) | (k_seg == 0)
    if rule == "full":
        allowed = allowed | (q_seg == 0)
    allowed = allowed[None, None]
    if reference_mask is not None:  # a dropped reference is invisible to target queries.
        hidden = (~reference_mask)[:, None, None, None] & (k_seg == 0) & (q_seg != 0)
        allowed = allowed & ~hidden
    return allowed


def _joint_attention(ref, tgt, rule, reference_mask, upcast):
    """The rule as one masked attention over the joint sequence (the plain reference)."""
    (q_r, k_r, v_r), (q_t, k_t, v_t) = ref, tgt
    b, f, n_t, h, d = q_t.shape
    n_r = q_r.shape[1]
    joint = [jnp.concatenate([r, t.reshape(b, f * n_t, h, d)], axis=1) for r, t in zip(ref, tgt)]
    mask = segment_mask(n_r, n_t, f, rule, reference_mask)
    out = dot_product_attention(*joint, mask, upcast=upcast)
    return out[:, :n_r], out[:, n_r:].reshape(b, f, n_t, h, d)


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
    _check_choice("attention rule", rule, ATTENTION_RULES)
    return attention_backend(impl).rule(ref, tgt, rule, reference_mask, upcast)


# --------------------------------------------------------------------------- backends


class AttentionBackend(NamedTuple):
    """One implementation of the rule, as the three calls a self-attention layer makes.

    plain(q, k, v, *, upcast): (B, N, H, D) attention without a reference.
    target(q_t, k_t, v_t, k_r, v_r, reference_mask, *, upcast): ``target_attention``.
    rule(ref, tgt, rule, reference_mask, upcast): ``reference_target_attention``.
    """

    plain: Callable
    target: Callable
    rule: Callable


def _xla_plain(q, k, v, *, upcast=False):
    return dot_product_attention(q, k, v, upcast=upcast)


XLA_BACKEND = AttentionBackend(_xla_plain, target_attention, _decomposed_attention)
# With the reference cached there is no joint sequence left, so xla_joint's plain and
# target calls are xla's; only the whole rule differs.
XLA_JOINT_BACKEND = AttentionBackend(_xla_plain, target_attention, _joint_attention)


class KernelUnavailableError(ValueError):
    """An attention kernel named in the config cannot run on the targeted devices."""


def target_platform() -> str:
    """The platform ("tpu", "gpu", "cpu") of the devices the traced computation targets.

    That is the device of the mesh set with ``jax.set_mesh`` (the trainer and the
    compile tool set it, so an ahead-of-time compile for a TPU from a CPU host targets
    "tpu"); without one, jax's default backend, where an unsharded ``jit`` runs.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    """Logs ``message`` the first time only (backends are resolved at every trace)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.warning(message)


def _kernels():
    from consist_jax.models import attention_kernels  # Pallas: import on first use.

    return attention_kernels


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "xla": lambda: XLA_BACKEND,
    "xla_joint": lambda: XLA_JOINT_BACKEND,
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
    _check_choice("attention_impl", impl, ATTENTION_IMPLS)
    return _BACKENDS[impl]()


# --------------------------------------------------------------------------- the layer


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
        _check_choice("reference layout mode", self.mode, ("none", "joint", "extract", "cached"))
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    @property
    def images_per_example(self) -> int:
        return {"joint": 1 + self.num_frames, "extract": 1}.get(self.mode, self.num_frames)


class SelfAttention(nn.Module):
    """diffusers' ``Attention`` as a self-attention (``attn1``), SCD-aware.

    x (N, L, C) -> (N, L, C). Projections: to_q/to_k/to_v (no bias), to_out.0.

    Reference cache entry (``extract`` writes, ``cached`` reads), per layer:
      ``{"key": (B, N_r, H, D), "value": (B, N_r, H, D)}``.
    """

    heads: int
    head_dim: int
    rule: str = "causal"
    impl: str = "xla"
    upcast: bool = False
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
                self.put_variable(CACHE_COLLECTION, "key", k)
                self.put_variable(CACHE_COLLECTION, "value", v)
            out = attention_backend(self.impl).plain(q, k, v, upcast=self.upcast)
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
        out_ref, out_tgt = reference_target_attention(
            tuple(a[:, 0] for a in grouped),
            tuple(a[:, 1:] for a in grouped),
            rule=self.rule,
            impl=self.impl,
            reference_mask=reference_mask,
            upcast=self.upcast,
        )
        return jnp.concatenate([out_ref[:, None], out_tgt], axis=1).reshape(q.shape)

    def _cached(self, q, k, v, layout, reference_mask):
        if self.rule != "causal":
            raise ValueError(
                "the reference cache needs the causal rule: under the full rule the "
                "reference depends on the target, so it cannot be computed once"
            )
        if not self.has_variable(CACHE_COLLECTION, "key"):
            raise ValueError(
                f"cached mode needs the {CACHE_COLLECTION!r} collection from an extract pass "
                f"(missing at {'/'.join(self.scope.path)})"
            )
        k_ref = self.get_variable(CACHE_COLLECTION, "key").astype(k.dtype)
        v_ref = self.get_variable(CACHE_COLLECTION, "value").astype(v.dtype)
        b, f = k_ref.shape[0], layout.num_frames
        if q.shape[0] != b * f:
            raise ValueError(
                f"reference cache holds {b} examples but the target batch has {q.shape[0]} "
                f"images for {f} frame(s) each; tile the cache to the target batch first"
            )
        grouped = [a.reshape(b, f, *a.shape[1:]) for a in (q, k, v)]
        target = attention_backend(self.impl).target
        out = target(*grouped, k_ref, v_ref, reference_mask, upcast=self.upcast)
        return out.reshape(q.shape)
