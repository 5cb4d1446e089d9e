"""The attention maths of SCD's self-attention: the primitive and the rule's XLA forms.

Reference tokens R and target tokens T share the projections of a self-attention
layer. Under the **causal** rule (docs/method.md, "The causal rule"; its one
predicate is ``attention_rule.segment_allows``)

    out_R = softmax(Q_R K_R^T / sqrt(d)) V_R                    # reference sees itself
    out_T = softmax(Q_T [K_R ; K_T]^T / sqrt(d)) [V_R ; V_T]     # target sees R and itself

and for F target frames, frame f sees ``[K_R ; K_Tf]``; frames meet only in the
temporal (motion) layers. The **full** rule (an ablation) lets the reference see
every token as well: ``out_R = attend(Q_R, [K_R ; K_T1 ; ... ; K_TF])``.

A per-example ``reference_mask`` (B,) of booleans hides the reference from the
targets where it is False: that is classifier-free guidance's "reference dropped"
branch (the target then attends to itself only).

A backend (``AttentionBackend``) is the three entry points a self-attention layer
calls: plain self-attention (no reference), the target half (the reference cache)
and the whole rule. This module holds the three XLA backends, which compute the same
numbers:
  * ``XLA_BACKEND`` (``attention_impl="xla"``): decomposed. The reference block and
    each frame's ``[R ; T_f]`` block are separate attentions (``decomposed_rule``), so
    the masked (reference-query, target-key) block is never computed: N_r^2 +
    F N_t (N_r + N_t) scores instead of (N_r + F N_t)^2.
  * ``XLA_JOINT_BACKEND`` (``"xla_joint"``): the plain reference. One joint sequence
    ``[R ; T_1 ; ... ; T_F]`` with a block mask built from segment ids.
  * ``XLA_CHUNKED_BACKEND`` (``"xla_chunked"``): the decomposed form with each
    attention in query chunks and a recomputing backward (``chunked_attention.py``):
    no (Nq, Nk) scores kept for the backward pass; faster than ``xla`` on CPU at a
    thousand tokens and in the demo's train step at 256 (BENCHMARKS.md, "Train step").
The accelerator kernels (cuDNN, splash, Pallas) live in ``attention_kernels.py``; the
backends by name (``attention_impl``), the layer and the reference cache in
``self_attention.py``.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging

from consist_jax.models.attention_rule import REFERENCE_SEGMENT, reference_reads_targets, segment_allows
from consist_jax.models.chunked_attention import chunked_attention

# --------------------------------------------------------------------------- primitive


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    upcast: bool = False,
    scale: Optional[float] = None,
    bias: Optional[jax.Array] = None,
) -> jax.Array:
    """Softmax attention. query (B, Nq, H, D), key/value (B, Nk, H, D) -> (B, Nq, H, D).

    mask: boolean, broadcastable to (B, H, Nq, Nk); True = may attend. Every query
    must see at least one key. ``upcast`` computes the scores in float32 even for
    bf16 inputs (diffusers' ``upcast_attention``); the softmax is always float32.
    scale: the query's factor (None: 1 / sqrt(D); T5 uses 1); bias: float32 added to
    the scores, broadcastable to (B, H, Nq, Nk) (T5's relative positions).
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if upcast:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query * jnp.asarray(scale, query.dtype), key)
    scores = scores.astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def key_masked_attention(query, key, value, key_mask=None, *, upcast=False):
    """``dot_product_attention`` with a per-key mask: key_mask (B, Nk) bool or None."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return dot_product_attention(query, key, value, mask, upcast=upcast)


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
    attend: Optional[Callable] = None,
) -> jax.Array:
    """The target half of the causal rule: each frame attends to ``[R ; itself]``.

    q/k/v_tgt (B, F, N_t, H, D); k/v_ref (B, N_r, H, D) (fresh or from the cache);
    reference_mask (B,) bool or None -> (B, F, N_t, H, D). attend(q, k, v, key_mask,
    *, upcast): the attention over each frame's keys, key_mask (B*F, N_r + N_t) or None
    (default ``key_masked_attention``, the dense form).
    """
    attend = attend or key_masked_attention
    b, f, n_t, h, d = q_tgt.shape
    n_r = k_ref.shape[1]
    keys = jnp.concatenate([jnp.broadcast_to(k_ref[:, None], (b, f, n_r, h, d)), k_tgt], axis=2)
    values = jnp.concatenate([jnp.broadcast_to(v_ref[:, None], (b, f, n_r, h, d)), v_tgt], axis=2)
    key_mask = None
    if reference_mask is not None:
        visible = jnp.concatenate(
            [jnp.broadcast_to(reference_mask[:, None], (b, n_r)), jnp.ones((b, n_t), bool)], axis=1
        )
        key_mask = jnp.repeat(visible, f, axis=0)  # (B*F, N_r + N_t)
    out = attend(
        q_tgt.reshape(b * f, n_t, h, d),
        keys.reshape(b * f, n_r + n_t, h, d),
        values.reshape(b * f, n_r + n_t, h, d),
        key_mask,
        upcast=upcast,
    )
    return out.reshape(b, f, n_t, h, d)


def flatten_frames(x: jax.Array) -> jax.Array:
    """(B, F, N, H, D) -> (B, F*N, H, D): the frames as one key sequence."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def decomposed_rule(attend_reference: Callable, target: Callable) -> Callable:
    """The whole rule as separate attentions, from a backend's two halves; the masked
    (reference-query, target-key) block is never computed.

    attend_reference(q_r, k_r, v_r, frames, upcast) -> (B, N_r, H, D): the reference's
      queries over its own keys and, where the rule lets the reference read the
      targets, ``frames`` = (keys, values) of every frame, each (B, F*N_t, H, D); None
      otherwise.
    target: the backend's target half (``target_attention``'s contract).
    Returns ``rule(ref, tgt, rule, reference_mask, upcast)`` (``AttentionBackend.rule``).
    """

    def rule_form(ref, tgt, rule, reference_mask, upcast):
        (q_r, k_r, v_r), (q_t, k_t, v_t) = ref, tgt
        frames = (flatten_frames(k_t), flatten_frames(v_t)) if reference_reads_targets(rule) else None
        out_ref = attend_reference(q_r, k_r, v_r, frames, upcast)
        return out_ref, target(q_t, k_t, v_t, k_r, v_r, reference_mask, upcast=upcast)

    return rule_form


def frames_appended(plain: Callable) -> Callable:
    """``decomposed_rule``'s ``attend_reference`` from a plain attention
    ``plain(q, k, v, *, upcast)``: the frames' keys/values appended to the reference's."""

    def attend_reference(q_r, k_r, v_r, frames, upcast):
        if frames is not None:
            k_r, v_r = (jnp.concatenate([own, other], axis=1) for own, other in zip((k_r, v_r), frames))
        return plain(q_r, k_r, v_r, upcast=upcast)

    return attend_reference


def segment_mask(
    n_ref: int, n_tgt: int, num_frames: int, rule: str, reference_mask: Optional[jax.Array]
) -> jax.Array:
    """Block mask of the joint sequence ``[R ; T_1 ; ... ; T_F]``: (B or 1, 1, N, N) bool.

    Segment 0 is the reference, segment f the f-th target frame; which segment reads
    which is ``segment_allows``. reference_mask (B,) bool or None: False hides the
    reference from that example's targets.
    """
    seg = jnp.concatenate(
        [jnp.full((n_ref,), REFERENCE_SEGMENT, jnp.int32), jnp.repeat(jnp.arange(1, num_frames + 1), n_tgt)]
    )
    visible = True if reference_mask is None else reference_mask[:, None, None, None]
    allowed = segment_allows(seg[:, None], seg[None, :], rule, visible)
    return allowed if reference_mask is not None else allowed[None, None]


def _joint_attention(ref, tgt, rule, reference_mask, upcast):
    """The rule as one masked attention over the joint sequence (the plain reference)."""
    (q_r, k_r, v_r), (q_t, k_t, v_t) = ref, tgt
    b, f, n_t, h, d = q_t.shape
    n_r = q_r.shape[1]
    joint = [jnp.concatenate([r, flatten_frames(t)], axis=1) for r, t in zip(ref, tgt)]
    mask = segment_mask(n_r, n_t, f, rule, reference_mask)
    out = dot_product_attention(*joint, mask, upcast=upcast)
    return out[:, :n_r], out[:, n_r:].reshape(b, f, n_t, h, d)


# --------------------------------------------------------------------------- backends


class AttentionBackend(NamedTuple):
    """One implementation of the rule, as the three calls a self-attention layer makes.

    plain(q, k, v, *, upcast): (B, N, H, D) attention without a reference.
    target(q_t, k_t, v_t, k_r, v_r, reference_mask, *, upcast): ``target_attention``.
    rule(ref, tgt, rule, reference_mask, upcast): one reference and F frames
      (``self_attention.reference_target_attention``).
    """

    plain: Callable
    target: Callable
    rule: Callable


# --------------------------------------------------------------------------- the XLA backends


def _xla_plain(q, k, v, *, upcast=False):
    return dot_product_attention(q, k, v, upcast=upcast)


XLA_BACKEND = AttentionBackend(
    _xla_plain, target_attention, decomposed_rule(frames_appended(_xla_plain), target_attention)
)
# With the reference cached there is no joint sequence left, so xla_joint's plain and
# target calls are xla's; only the whole rule differs.
XLA_JOINT_BACKEND = AttentionBackend(_xla_plain, target_attention, _joint_attention)


def _chunked_plain(q, k, v, *, upcast=False):
    return chunked_attention(q, k, v, upcast=upcast)


_chunked_target = functools.partial(target_attention, attend=chunked_attention)
XLA_CHUNKED_BACKEND = AttentionBackend(
    _chunked_plain, _chunked_target, decomposed_rule(frames_appended(_chunked_plain), _chunked_target)
)


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
