"""Accelerator kernels for SCD's causal reference/target attention.

``attention_rule.py`` owns the rule, ``attention.py`` the XLA forms and the backend
type, ``self_attention.py`` the dispatch by name; this module holds the backends that
need kernels (imported lazily there, because it pulls in Pallas). Each backend is an
``AttentionBackend`` of three entry points, all computing the numbers of the ``xla``
(decomposed) form:

  * ``plain(q, k, v, upcast)``: self-attention without a reference, (B, N, H, D).
  * ``target(q_t, k_t, v_t, k_r, v_r, reference_mask, upcast)``: each target frame
    reads ``[R ; T_f]`` (stage-2 sampling with the reference cache).
  * ``rule(ref, tgt, rule, reference_mask, upcast)``: one reference and F frames.

Backends:
  * ``CUDNN``: cuDNN flash attention (``jax.nn.dot_product_attention``) on the
    decomposed form. The frame's keys are laid out ``[T_f ; R]`` so that the
    reference-dropped CFG branch is a shorter key sequence (``key_value_seq_lengths``)
    instead of a mask. GPU only.
  * ``SPLASH``: the Pallas TPU splash-attention kernel over the joint sequence with a
    static block mask built from the segment layout (``SegmentLayoutMask``); blocks
    the rule masks out are skipped, the dropped branch rides on dynamic segment ids.
    TPU only.
  * ``PALLAS``: a small flash-attention kernel for the decomposed form: each query
    block streams its own K/V then the shared (reference) K/V with an online softmax,
    reading the reference once per example (never tiled over frames). GPU only
    (Triton). Forward kernel; its gradient is that of the ``xla`` form (recomputed),
    so it is an inference kernel first.
  * ``SPLASH_INTERPRET``, ``PALLAS_INTERPRET``: the same kernels in the Pallas
    interpreter on any device (slow; what the CPU tests run).

The platform is the one the computation targets (``attention.target_platform``: the
mesh set with ``jax.set_mesh``), never a guess from the host: a compiled kernel asked
for on another platform raises ``KernelUnavailableError``. Under a mesh of several
devices, compiled kernels run inside ``shard_map`` over the batch (and, where the
batch does not divide, head) axes: Mosaic kernels cannot be partitioned by XLA.

None of them materialises an (N x N) score matrix on its accelerator. Kernels always
compute scores and the softmax in float32, so ``upcast`` is satisfied by construction.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from consist_jax.models.attention import (
    XLA_BACKEND,
    AttentionBackend,
    KernelUnavailableError,
    decomposed_rule,
    dot_product_attention,
    flatten_frames,
    frames_appended,
    log_once,
    target_platform,
)
from consist_jax.models.attention_rule import PAD_SEGMENT, reference_reads_targets, segment_allows
from consist_jax.parallel.batch import leading_axes

# Finite, so a fully masked key block gives exp(MASK - m) = 0 rather than inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``x`` along ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _frames_to_batch(x: jax.Array) -> jax.Array:
    """(B, F, N, H, D) -> (B*F, N, H, D)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def require_platform(impl: str, platform: str, interpretable: bool = False) -> None:
    """Raises unless the traced computation targets ``platform`` (``impl`` names the kernel;
    ``interpretable``: a Pallas kernel, which ``{impl}_interpret`` runs anywhere)."""
    targeted = target_platform()
    if targeted != platform:
        hint = f" ('{impl}_interpret' runs the kernel in the Pallas interpreter, for tests)" if interpretable else ""
        raise KernelUnavailableError(
            f"attention_impl={impl!r} needs a {platform.upper()}, but this computation targets "
            f"{targeted!r}; use 'auto' or 'xla' there{hint}"
        )


def _kernel_partition(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Mesh axes over which a kernel call is split: (batch axes, head axes).

    Each axis of size > 1 takes the batch while it divides (``leading_axes``, the
    batch's own split), else the heads; an axis that divides neither computes the call
    whole on each of its devices.
    """
    batch_axes = leading_axes(batch, mesh)
    head_axes = []
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in batch_axes and heads % size == 0:
            head_axes.append(axis)
            heads //= size
    return batch_axes, tuple(head_axes)


def per_device(kernel: Callable, *args):
    """``kernel(*args)`` under ``shard_map`` over the mesh set with ``jax.set_mesh``.

    args: arrays with a leading batch axis (or None); the (B, N, H, D) ones also split
    their heads. The output is (B, N, H, D). Without a multi-device mesh (or already
    inside ``shard_map``) the kernel is called as it is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh._any_axis_manual:
        return kernel(*args)
    arrays = [a for a in args if a is not None]
    batch = min(a.shape[0] for a in arrays)
    heads = next(a.shape[2] for a in arrays if a.ndim == 4)
    batch_axes, head_axes = _kernel_partition(mesh, batch, heads)
    batch_spec, head_spec = batch_axes or None, head_axes or None

    present = [i for i, a in enumerate(args) if a is not None]

    def on_shard(*shards):  # the absent (None) arguments stay None
        full = list(args)
        for i, shard in zip(present, shards):
            full[i] = shard
        return kernel(*full)

    def spec(a):
        return P(batch_spec, None, head_spec, None) if a.ndim == 4 else P(batch_spec)

    return jax.shard_map(
        on_shard,
        mesh=mesh,
        in_specs=tuple(spec(a) for a in arrays),
        out_specs=P(batch_spec, None, head_spec, None),
        check_vma=False,
    )(*arrays)


# --------------------------------------------------------------------------- cuDNN


def cudnn_backend(implementation: str = "cudnn") -> AttentionBackend:
    """The decomposed rule on ``jax.nn.dot_product_attention``; no mask is ever built.

    ``implementation="xla"`` runs the same decomposition (key layout, key lengths)
    through jax's XLA path: that is how the layout logic is tested without a GPU.
    """

    def attend(q, k, v, key_lengths=None):
        if implementation == "cudnn":
            require_platform("cudnn", "gpu")
        return jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=key_lengths, implementation=implementation
        )

    def plain(q, k, v, *, upcast=False):
        del upcast  # cuDNN accumulates scores in float32.
        return attend(q, k, v)

    def target(q_t, k_t, v_t, k_r, v_r, reference_mask=None, *, upcast=False):
        b, f, n_t, h, d = q_t.shape
        n_r = k_r.shape[1]

        # [T_f ; R]: the reference last, so hiding it is a key length of N_t.
        def frame_keys(tgt, ref):
            return jnp.concatenate([_frames_to_batch(tgt), jnp.repeat(ref, f, axis=0)], axis=1)

        key_lengths = None
        if reference_mask is not None:
            visible = jnp.repeat(reference_mask, f).astype(jnp.int32)
            key_lengths = (n_t + n_r * visible).astype(jnp.int32)
        out = attend(_frames_to_batch(q_t), frame_keys(k_t, k_r), frame_keys(v_t, v_r), key_lengths)
        return out.reshape(b, f, n_t, h, d)

    rule = decomposed_rule(frames_appended(plain), target)
    return AttentionBackend(plain=plain, target=target, rule=rule)


CUDNN = cudnn_backend("cudnn")

# cuDNN signals an unsupported dtype / head dim / GPU with NotImplementedError, and a
# missing cuDNN with RuntimeError, both while tracing: ``auto`` then takes ``xla``
# for that call and says so.
_CUDNN_UNAVAILABLE = (NotImplementedError, RuntimeError, KernelUnavailableError)


def _cudnn_or(fallback: Callable, kernel: Callable) -> Callable:
    def call(*args, **kwargs):
        try:
            return kernel(*args, **kwargs)
        except _CUDNN_UNAVAILABLE as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            log_once(f"attention_impl='auto': cuDNN cannot run this attention "
                     f"({type(error).__name__}: {reason}); 'xla' computes it")
            return fallback(*args, **kwargs)

    return call


CUDNN_OR_XLA = AttentionBackend(*(_cudnn_or(x, c) for x, c in zip(XLA_BACKEND, CUDNN)))


# --------------------------------------------------------------------------- splash


def _segment_ids(runs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """((segment id, length), ...) -> (sum of lengths,) int32."""
    return np.concatenate([np.full((n,), s, np.int32) for s, n in runs if n > 0])


class SegmentLayoutMask(splash.Mask):
    """Splash mask of the rule (``segment_allows``) over a segment layout, evaluated
    block by block.

    (Nq, Nk) but never stored: splash asks for one (block_q, block_kv) slice at a time
    to classify blocks as empty (skipped), full, or partial (only partial blocks are
    kept, deduplicated). With segment boundaries on block boundaries there are none.
    """

    def __init__(self, q_runs, kv_runs, rule: str):
        self.key = (tuple(q_runs), tuple(kv_runs), rule)
        self.q_ids, self.kv_ids = _segment_ids(q_runs), _segment_ids(kv_runs)
        self.rule = rule

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.q_ids), len(self.kv_ids))

    def __getitem__(self, idx) -> np.ndarray:
        q_slice, kv_slice = idx
        return segment_allows(self.q_ids[q_slice, None], self.kv_ids[None, kv_slice], self.rule)

    def __eq__(self, other) -> bool:
        return isinstance(other, SegmentLayoutMask) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _splash_block(length: int) -> int:
    """The largest of 512/256/128 dividing ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def _dropped_segment_ids(q_runs, kv_runs, dropped: jax.Array) -> splash.SegmentIds:
    """Per-example segment ids that hide the reference from targets where ``dropped``.

    Splash reads a token pair only if the static mask allows it AND the ids are equal.
    Kept: all ids 0 (no constraint). Dropped: the layout's ids, so each segment reads
    itself only; padding queries take id 0 so they still read the reference.
    dropped (B,) bool -> ids (B, Nq), (B, Nk).
    """
    q_ids = _segment_ids(q_runs)
    q_ids = np.where(q_ids == PAD_SEGMENT, 0, q_ids)
    kv_ids = _segment_ids(kv_runs)

    def per_example(ids):
        return jnp.where(dropped[:, None], jnp.asarray(ids)[None], 0).astype(jnp.int32)

    return splash.SegmentIds(q=per_example(q_ids), kv=per_example(kv_ids))


def _splash_attention(q, k, v, q_runs, kv_runs, rule, interpret, segment_ids=None):
    """Splash over a segment layout. q (B, Nq, H, D), k/v (B, Nk, H, D), lengths already
    padded to multiples of 128 and described by the runs; segment_ids (B, Nq), (B, Nk)
    -> (B, Nq, H, D)."""
    heads, head_dim = q.shape[2], q.shape[3]
    mask = SegmentLayoutMask(q_runs, kv_runs, rule)
    block_q, block_kv = _splash_block(q.shape[1]), _splash_block(k.shape[1])
    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)  # splash does not scale the scores.

    def attend(q, k, v, q_ids=None, kv_ids=None):  # one device's share
        heads_major = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]  # (B, H, N, D)
        if q_ids is None:
            out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_))(*heads_major)
        else:
            ids = splash.SegmentIds(q=q_ids, kv=kv_ids)
            out = jax.vmap(lambda q_, k_, v_, s: kernel(q_, k_, v_, segment_ids=s))(*heads_major, ids)
        return jnp.swapaxes(out, 1, 2)

    ids = (None, None) if segment_ids is None else (segment_ids.q, segment_ids.kv)
    return attend(q, k, v, *ids) if interpret else per_device(attend, q, k, v, *ids)


def _padded_runs(runs, multiple: int = 128):
    """Append a padding run so the layout's length is a multiple of ``multiple``."""
    n = sum(length for _, length in runs)
    return tuple(runs) + ((PAD_SEGMENT, _round_up(n, multiple) - n),)


def _splash_layout_attention(q, k, v, q_runs, kv_runs, rule, interpret, dropped=None):
    """Pad to the runs, run splash, cut the padding. dropped (B,) bool or None."""
    q_runs, kv_runs = _padded_runs(q_runs), _padded_runs(kv_runs)
    n_q = q.shape[1]
    q = _pad_to(q, 1, sum(n for _, n in q_runs))
    k, v = (_pad_to(x, 1, sum(n for _, n in kv_runs)) for x in (k, v))
    segment_ids = None if dropped is None else _dropped_segment_ids(q_runs, kv_runs, dropped)
    return _splash_attention(q, k, v, q_runs, kv_runs, rule, interpret, segment_ids)[:, :n_q]


def _splash_plain(q, k, v, *, upcast=False, interpret=False):
    del upcast  # one segment reading itself, under every rule
    return _splash_layout_attention(q, k, v, ((1, q.shape[1]),), ((1, k.shape[1]),), "causal", interpret)


def _splash_target(q_t, k_t, v_t, k_r, v_r, reference_mask=None, *, upcast=False, interpret=False):
    """Each frame's queries against its own ``[R ; T_f]`` (the cached-reference case,
    which exists under the causal rule only)."""
    b, f, n_t, h, d = q_t.shape
    n_r = k_r.shape[1]

    def frame_keys(tgt, ref):
        return jnp.concatenate([jnp.repeat(ref, f, axis=0), _frames_to_batch(tgt)], axis=1)

    dropped = None if reference_mask is None else jnp.repeat(~reference_mask, f)
    out = _splash_layout_attention(
        _frames_to_batch(q_t),
        frame_keys(k_t, k_r),
        frame_keys(v_t, v_r),
        ((1, n_t),),
        ((0, n_r), (1, n_t)),
        "causal",
        interpret,
        dropped,
    )
    return out.reshape(b, f, n_t, h, d)


def _splash_rule(ref, tgt, rule, reference_mask, upcast, interpret=False):
    """The rule as one block-sparse attention over ``[R ; T_1 ; ... ; T_F]``."""
    (q_r, _, _), (q_t, _, _) = ref, tgt
    b, f, n_t, h, d = q_t.shape
    n_r = q_r.shape[1]
    joint = [jnp.concatenate([r, flatten_frames(t)], axis=1) for r, t in zip(ref, tgt)]
    runs = ((0, n_r),) + tuple((frame, n_t) for frame in range(1, f + 1))
    dropped = None if reference_mask is None else ~reference_mask
    out = _splash_layout_attention(*joint, runs, runs, rule, interpret, dropped)
    out_ref = out[:, :n_r]
    if reference_reads_targets(rule) and dropped is not None:
        # Equal-id segments cannot say "the reference reads the targets that do not
        # read it", so the reference rows of the full rule come from a second pass.
        out_ref = _splash_layout_attention(q_r, *joint[1:], runs[:1], runs, rule, interpret)
    return out_ref, out[:, n_r:].reshape(b, f, n_t, h, d)


def _kernel_backend(impl: str, platform: str, plain, target, rule, interpret: bool) -> AttentionBackend:
    """The three entry points of a Pallas kernel, compiled (checked to target
    ``platform``) or in the interpreter."""

    def checked(fn):
        def call(*args, **kwargs):
            if not interpret:
                require_platform(impl, platform, interpretable=True)
            return fn(*args, **kwargs, interpret=interpret)

        return call

    return AttentionBackend(plain=checked(plain), target=checked(target), rule=checked(rule))


SPLASH = _kernel_backend("splash", "tpu", _splash_plain, _splash_target, _splash_rule, False)
SPLASH_INTERPRET = _kernel_backend("splash", "tpu", _splash_plain, _splash_target, _splash_rule, True)


# --------------------------------------------------------------------------- Pallas flash

_NT = (((1,), (1,)), ((), ()))  # contract the head dim of (Nq, D) and (Nk, D)
_NN = (((1,), (0,)), ((), ()))  # (Nq, Nk) @ (Nk, D)


def _online_softmax_step(q, k, v, key_bias, scale, state):
    """Fold one key block into the running (acc, max, sum) of a query block.

    q (bq, D), k/v (bk, D), key_bias (bk,) float32 (0 or MASK_VALUE) -> new state.
    """
    acc, running_max, running_sum = state
    scores = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    scores = scores + key_bias[None, :]
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    probs = jnp.exp(scores - new_max[:, None])
    rescale = jnp.exp(running_max - new_max)  # exp(-inf) = 0 on the first block.
    running_sum = running_sum * rescale + probs.sum(axis=1)
    acc = acc * rescale[:, None] + lax.dot_general(
        probs.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32
    )
    return acc, new_max, running_sum


def _flash_kernel(q_ref, k_ref, v_ref, *refs, own_length, block_k, scale, has_shared):
    """One (query block, batch row, head): own K/V first, then the shared K/V.

    Own keys come first because the query's own segment always has a real key, so the
    running max is finite before any (possibly all-masked) shared block arrives.
    """
    if has_shared:
        k_shared_ref, v_shared_ref, bias_ref, out_ref = refs
    else:
        (out_ref,) = refs
    q = q_ref[...]
    block_q, head_dim = q.shape
    state = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )

    def own_block(j, state):
        keys = pl.ds(j * block_k, block_k)
        positions = j * block_k + jnp.arange(block_k)
        bias = jnp.where(positions < own_length, 0.0, MASK_VALUE).astype(jnp.float32)
        return _online_softmax_step(q, k_ref[keys, :], v_ref[keys, :], bias, scale, state)

    state = lax.fori_loop(0, k_ref.shape[0] // block_k, own_block, state)
    if has_shared:

        def shared_block(j, state):
            keys = pl.ds(j * block_k, block_k)
            return _online_softmax_step(
                q, k_shared_ref[keys, :], v_shared_ref[keys, :], bias_ref[keys], scale, state
            )

        state = lax.fori_loop(0, k_shared_ref.shape[0] // block_k, shared_block, state)
    acc, _, running_sum = state
    out_ref[...] = (acc / running_sum[:, None]).astype(out_ref.dtype)


def _flash_blocks(n_q: int, n_k: int) -> tuple[int, int]:
    """Power-of-two blocks (Triton needs them): up to 128 queries x 64 keys."""
    block_q = min(128, max(16, pl.next_power_of_2(n_q)))
    block_k = min(64, max(16, pl.next_power_of_2(n_k)))
    return block_q, block_k


def _flash_forward(q, k, v, k_shared, v_shared, shared_visible, group, interpret):
    """The kernel on each device's share (compiled) or whole (interpreted)."""
    if interpret:
        return _flash_call(q, k, v, k_shared, v_shared, shared_visible, group, interpret)
    call = functools.partial(_flash_call, group=group, interpret=interpret)
    return per_device(call, q, k, v, k_shared, v_shared, shared_visible)


def _flash_call(q, k, v, k_shared, v_shared, shared_visible, group, interpret):
    """Pad, run the kernel, cut. Shapes as in ``flash_attention``."""
    g, n_q, heads, head_dim = q.shape
    n_own = k.shape[1]
    has_shared = k_shared is not None
    block_q, block_k = _flash_blocks(n_q, max(n_own, k_shared.shape[1] if has_shared else 0))
    on_gpu = not interpret  # compiled means Triton: ``PALLAS`` runs on GPUs only
    # Triton tensors need power-of-two extents; interpret mode does not.
    padded_dim = pl.next_power_of_2(head_dim) if on_gpu else head_dim

    def pad(x, block):  # sequence to a multiple of the block, head dim to padded_dim
        return _pad_to(_pad_to(x, 1, _round_up(x.shape[1], block)), 3, padded_dim)

    operands = [pad(q, block_q), pad(k, block_k), pad(v, block_k)]
    n_q_padded, n_own_padded = operands[0].shape[1], operands[1].shape[1]
    in_specs = [
        pl.BlockSpec((None, block_q, None, padded_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, n_own_padded, None, padded_dim), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, n_own_padded, None, padded_dim), lambda i, b, h: (b, 0, h, 0)),
    ]
    if has_shared:
        n_shared = k_shared.shape[1]
        k_shared, v_shared = pad(k_shared, block_k), pad(v_shared, block_k)
        n_shared_padded = k_shared.shape[1]
        real = jnp.arange(n_shared_padded) < n_shared
        visible = real[None] if shared_visible is None else real[None] & shared_visible[:, None]
        bias = jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)
        bias = jnp.broadcast_to(bias, (k_shared.shape[0], n_shared_padded))
        shared_spec = pl.BlockSpec(
            (None, n_shared_padded, None, padded_dim), lambda i, b, h: (b // group, 0, h, 0)
        )
        bias_spec = pl.BlockSpec((None, n_shared_padded), lambda i, b, h: (b // group, 0))
        operands += [k_shared, v_shared, bias]
        in_specs += [shared_spec, shared_spec, bias_spec]
    kernel = functools.partial(
        _flash_kernel,
        own_length=n_own,
        block_k=block_k,
        scale=head_dim**-0.5,
        has_shared=has_shared,
    )
    extra = {}
    if on_gpu:
        from jax.experimental.pallas import triton as pl_triton

        extra["compiler_params"] = pl_triton.CompilerParams(
            num_warps=4 if padded_dim <= 64 else 8, num_stages=2
        )
    out = pl.pallas_call(
        kernel,
        grid=(n_q_padded // block_q, g, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, None, padded_dim), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((g, n_q_padded, heads, padded_dim), q.dtype),
        interpret=interpret,
        name="reference_target_flash_attention",
        **extra,
    )(*operands)
    return out[:, :n_q, :, :head_dim]


def _two_source_reference(q, k, v, k_shared, v_shared, shared_visible, group):
    """The same attention in XLA (materialised scores): the kernel's gradient."""
    if k_shared is None:
        return dot_product_attention(q, k, v, upcast=True)
    keys = jnp.concatenate([k, jnp.repeat(k_shared, group, axis=0)], axis=1)
    values = jnp.concatenate([v, jnp.repeat(v_shared, group, axis=0)], axis=1)
    mask = None
    if shared_visible is not None:
        own = jnp.ones((q.shape[0], k.shape[1]), bool)
        shared = jnp.broadcast_to(
            jnp.repeat(shared_visible, group)[:, None], (q.shape[0], k_shared.shape[1])
        )
        mask = jnp.concatenate([own, shared], axis=1)[:, None, None, :]
    return dot_product_attention(q, keys, values, mask, upcast=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash_with_reference_gradient(q, k, v, k_shared, v_shared, shared_visible, group, interpret):
    return _flash_forward(q, k, v, k_shared, v_shared, shared_visible, group, interpret)


def _flash_fwd(q, k, v, k_shared, v_shared, shared_visible, group, interpret):
    out = _flash_forward(q, k, v, k_shared, v_shared, shared_visible, group, interpret)
    return out, (q, k, v, k_shared, v_shared, shared_visible)


def _flash_bwd(group, interpret, residuals, cotangent):
    q, k, v, k_shared, v_shared, shared_visible = residuals
    differentiable = (q, k, v, k_shared, v_shared)
    _, pullback = jax.vjp(
        lambda *a: _two_source_reference(*a, shared_visible, group), *differentiable
    )
    return (*pullback(cotangent), None)


_flash_with_reference_gradient.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("group", "interpret"))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_shared: Optional[jax.Array] = None,
    v_shared: Optional[jax.Array] = None,
    shared_visible: Optional[jax.Array] = None,
    *,
    group: int = 1,
    interpret: bool = False,
) -> jax.Array:
    """Attention of each row over its own keys and, optionally, shared keys.

    q (G, Nq, H, D); k/v (G, N, H, D), the row's own keys; k/v_shared (G // group, Ns,
    H, D), row g reads shared row g // group (the one reference of a video's frames,
    read in place, never tiled); shared_visible (G // group,) bool hides the shared
    keys where False (CFG's dropped reference) -> (G, Nq, H, D).
    Scores never exceed one (block_q, block_k) tile; softmax in float32. Compiled
    (GPU, Triton) unless ``interpret``.
    """
    return _flash_with_reference_gradient(
        q, k, v, k_shared, v_shared, shared_visible, group, interpret
    )


def _pallas_plain(q, k, v, *, upcast=False, interpret=False):
    del upcast
    return flash_attention(q, k, v, interpret=interpret)


def _pallas_target(q_t, k_t, v_t, k_r, v_r, reference_mask=None, *, upcast=False, interpret=False):
    b, f, n_t, h, d = q_t.shape
    frames = (_frames_to_batch(x) for x in (q_t, k_t, v_t))
    out = flash_attention(*frames, k_r, v_r, reference_mask, group=f, interpret=interpret)
    return out.reshape(b, f, n_t, h, d)


def _pallas_rule(ref, tgt, rule, reference_mask, upcast, interpret=False):
    def attend_reference(q_r, k_r, v_r, frames, upcast):
        # Frames the reference reads (full rule) are its shared keys.
        return flash_attention(q_r, k_r, v_r, *(frames or ()), interpret=interpret)

    target = functools.partial(_pallas_target, interpret=interpret)
    return decomposed_rule(attend_reference, target)(ref, tgt, rule, reference_mask, upcast)


PALLAS = _kernel_backend("pallas", "gpu", _pallas_plain, _pallas_target, _pallas_rule, False)
PALLAS_INTERPRET = _kernel_backend("pallas", "gpu", _pallas_plain, _pallas_target, _pallas_rule, True)

# What ``auto`` picks per targeted platform, and why (logged once).
_AUTO = {
    "tpu": ("splash", "the Pallas TPU kernel, masked blocks skipped"),
    "gpu": ("cudnn", "cuDNN flash attention; 'xla' where cuDNN cannot take the dtype / head dim"),
}


def auto_backend(platform: Optional[str] = None) -> AttentionBackend:
    """TPU -> splash, GPU -> cuDNN (XLA where cuDNN cannot), anything else -> XLA.

    platform: default ``target_platform()``, the platform the traced computation targets.
    """
    platform = platform or target_platform()
    name, why = _AUTO.get(platform, ("xla", "no attention kernel for this platform"))
    log_once(f"attention_impl='auto' on {platform!r} targets: {name!r} ({why})")
    return {"tpu": SPLASH, "gpu": CUDNN_OR_XLA}.get(platform, XLA_BACKEND)
