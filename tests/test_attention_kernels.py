"""Kernel backends of the causal rule (cudnn, splash, pallas, auto) and xla_chunked agree with ``xla``.

On CPU, splash and the Pallas flash kernel run in Pallas interpret mode (asked for by
name: ``*_interpret``), and the cuDNN backend's decomposition (key layout, key lengths)
runs through jax's XLA attention; the compiled kernels are checked only where their
accelerator is present (and for TPU, compiled ahead of time in test_compile_report.py).
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import relative_error

from consist_jax.models import attention
from consist_jax.models import attention_kernels as kernels
from consist_jax.models.attention import XLA_BACKEND, KernelUnavailableError, segment_mask
from consist_jax.models.self_attention import (
    ATTENTION_IMPLS,
    CACHE_COLLECTION,
    AttentionConfig,
    ReferenceLayout,
    SelfAttention,
    attention_backend,
    reference_target_attention,
)

HEADS, DIM = 2, 8
BF16_TOLERANCE = 3e-2
ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (cuDNN / Triton); this is CPU")
needs_tpu = pytest.mark.skipif(not ON_TPU, reason="needs a TPU (compiled splash kernel)")

# Backends testable here: on CPU "cudnn_layout" is the cuDNN decomposition on XLA.
CPU_BACKENDS = {
    "splash": kernels.SPLASH_INTERPRET,
    "pallas": kernels.PALLAS_INTERPRET,
    "cudnn_layout": kernels.cudnn_backend("xla"),
    "xla_chunked": attention_backend("xla_chunked"),
}


def _qkv(rng, *lead, dtype=jnp.float32, heads=HEADS, dim=DIM):
    return tuple(
        jnp.asarray(rng.standard_normal((*lead, heads, dim)), dtype) for _ in range(3)
    )


def _assert_close(actual, expected, tolerance):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert relative_error(a.astype(jnp.float32), e.astype(jnp.float32)) <= tolerance


# (rule, frames, n_ref, n_tgt): unequal lengths, several frames, the full-rule ablation.
RULE_CASES = [("causal", 2, 6, 9), ("full", 3, 7, 5)]


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
@pytest.mark.parametrize("rule, frames, n_ref, n_tgt", RULE_CASES)
def test_rule_matches_xla(rng, name, rule, frames, n_ref, n_tgt):
    """Both halves of the rule, with CFG's per-example reference drop ([kept, dropped])."""
    ref, tgt = _qkv(rng, 2, n_ref), _qkv(rng, 2, frames, n_tgt)
    mask = jnp.asarray([True, False])
    expected = XLA_BACKEND.rule(ref, tgt, rule, mask, False)
    fn = jax.jit(lambda r, t, m: CPU_BACKENDS[name].rule(r, t, rule, m, False))
    _assert_close(fn(ref, tgt, mask), expected, 1e-5)


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_rule_matches_xla_in_bfloat16(rng, name):
    ref, tgt = _qkv(rng, 1, 40, dtype=jnp.bfloat16), _qkv(rng, 1, 2, 24, dtype=jnp.bfloat16)
    ref32, tgt32 = jax.tree.map(lambda a: a.astype(jnp.float32), (ref, tgt))
    exact = XLA_BACKEND.rule(ref32, tgt32, "causal", None, False)
    out = jax.jit(lambda r, t: CPU_BACKENDS[name].rule(r, t, "causal", None, False))(ref, tgt)
    assert out[1].dtype == jnp.bfloat16
    _assert_close(out, exact, BF16_TOLERANCE)


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_cached_target_and_plain_match_xla(rng, name):
    """The reference-cache path (frames read [R ; T_f]) and reference-free attention."""
    (_, k_r, v_r), (q_t, k_t, v_t) = _qkv(rng, 2, 5), _qkv(rng, 2, 2, 7)
    mask = jnp.asarray([False, True])
    backend = CPU_BACKENDS[name]
    target = jax.jit(lambda *a: backend.target(*a, mask))(q_t, k_t, v_t, k_r, v_r)
    _assert_close(target, XLA_BACKEND.target(q_t, k_t, v_t, k_r, v_r, mask), 1e-5)
    q, k, v = _qkv(rng, 2, 11)
    _assert_close(jax.jit(backend.plain)(q, k, v), XLA_BACKEND.plain(q, k, v), 1e-5)


@pytest.mark.parametrize("name", ["splash", "pallas", "xla_chunked"])
def test_gradients_match_xla(rng, name):
    """Training through a kernel: splash has its own backward kernels, pallas
    differentiates the xla form, xla_chunked recomputes its chunks."""
    ref, tgt = _qkv(rng, 2, 6), _qkv(rng, 2, 2, 5)
    mask = jnp.asarray([True, False])
    weights = jnp.asarray(rng.standard_normal((2, 2, 5, HEADS, DIM)), jnp.float32)

    def loss(backend):
        def value(ref, tgt):
            out_ref, out_tgt = backend.rule(ref, tgt, "causal", mask, False)
            return jnp.sum(out_tgt * weights) + jnp.sum(out_ref**2)

        return jax.jit(jax.grad(value, argnums=(0, 1)))

    _assert_close(loss(CPU_BACKENDS[name])(ref, tgt), loss(XLA_BACKEND)(ref, tgt), 1e-4)


@pytest.mark.parametrize("rule", ["causal", "full"])
def test_splash_mask_is_the_segment_mask(rule):
    """The splash mask's real-token block is ``segment_mask`` (the joint reference)."""
    n_ref, n_tgt, frames = 5, 3, 3
    runs = kernels._padded_runs(((0, n_ref),) + tuple((f, n_tgt) for f in range(1, frames + 1)))
    mask = kernels.SegmentLayoutMask(runs, runs, rule)
    n = n_ref + frames * n_tgt
    expected = np.asarray(segment_mask(n_ref, n_tgt, frames, rule, None))[0, 0]
    np.testing.assert_array_equal(mask[:n, :n], expected)
    full = mask[:, :]
    assert full.any(axis=1).all(), "every row, padding included, must read some key"
    assert not full[:n, n:].any(), "real queries never read padding"


def test_splash_skips_the_masked_blocks():
    """Block-aligned layout, 2 frames: 5 of the 9 (128 x 128) blocks run, none partial."""
    runs = ((0, 128), (1, 128), (2, 128))
    mask = kernels.SegmentLayoutMask(runs, runs, "causal")
    kernel = kernels.splash.make_splash_mha(
        kernels.splash.MultiHeadMask([mask]),
        block_sizes=kernels.splash.BlockSizes(128, 128, 128),
        head_shards=1,
        q_seq_shards=1,
        interpret=True,
    )
    info = kernel.fwd_mask_info  # per query block, the kv blocks that run (grid shrunk)
    block_kind, kv_block = np.asarray(info.block_mask)[0], np.asarray(info.data_next)[0]
    runs = [sorted(kv_block[i][block_kind[i] > 0].tolist()) for i in range(3)]
    assert runs == [[0], [0, 1], [0, 2]]  # reference; frame 1 + reference; frame 2 + reference
    assert set(block_kind[block_kind > 0].tolist()) == {2}  # all full: no partial blocks


def test_kernels_never_materialise_the_score_matrix():
    """Compiled temporaries stay far below one (N x N) float32 score matrix per head.

    The Pallas kernels (interpret mode on CPU) hold one score tile at a time; the xla
    forms hold every head's scores. Compile only, nothing runs.
    """
    n, heads, dim = 4096, 4, 32
    ref = tuple(jax.ShapeDtypeStruct((1, n, heads, dim), jnp.bfloat16) for _ in range(3))
    tgt = tuple(jax.ShapeDtypeStruct((1, 1, n, heads, dim), jnp.bfloat16) for _ in range(3))

    def temp_bytes(impl):
        fn = jax.jit(lambda r, t: reference_target_attention(r, t, impl=impl))
        return fn.lower(ref, tgt).compile().memory_analysis().temp_size_in_bytes

    one_head_scores = n * (2 * n) * 4  # the target block of one head, float32
    assert temp_bytes("xla") > heads * one_head_scores
    for impl in ("pallas_interpret", "splash_interpret"):
        assert temp_bytes(impl) < one_head_scores / 8, impl


def test_impls_and_auto(caplog):
    assert set(ATTENTION_IMPLS) == {
        "xla", "xla_joint", "xla_chunked", "cudnn", "splash", "pallas", "splash_interpret",
        "pallas_interpret", "auto",
    }
    with caplog.at_level(logging.WARNING):
        assert kernels.auto_backend("tpu") is kernels.SPLASH
        assert kernels.auto_backend("gpu") is kernels.CUDNN_OR_XLA
        assert kernels.auto_backend("cpu") is XLA_BACKEND
        assert kernels.auto_backend("tpu") is kernels.SPLASH
    with pytest.raises(ValueError, match="attention_impl"):
        attention_backend("flash")


def test_auto_logs_its_pick_once(rng, caplog):
    """``auto`` says what it picked for the targeted platform, once per process."""
    attention._LOGGED.clear()
    q, k, v = _qkv(rng, 1, 5)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            jax.jit(lambda *a: attention_backend("auto").plain(*a))(q, k, v)
            jax.jit(lambda *a: attention_backend("auto").plain(*a) * 2)(q, k, v)
    picks = [r.getMessage() for r in caplog.records if "attention_impl='auto'" in r.getMessage()]
    platform = jax.default_backend()
    assert len(picks) == 1 and repr(platform) in picks[0], picks


@pytest.mark.parametrize("impl, needs", [("splash", "TPU"), ("pallas", "GPU"), ("cudnn", "GPU")])
def test_named_kernel_that_cannot_run_is_an_error(rng, impl, needs):
    """No silent interpreter or XLA: the error names the kernel and the platforms."""
    if needs.lower() == jax.default_backend():
        pytest.skip(f"{impl} runs here")  # only on the accelerator it is for
    ref, tgt = _qkv(rng, 1, 6), _qkv(rng, 1, 2, 5)
    platform = jax.default_backend()
    message = f"attention_impl='{impl}' needs a {needs}, but this computation targets '{platform}'"
    layer = SelfAttention(HEADS, DIM, AttentionConfig(impl=impl))
    x = jnp.zeros((3, 6, HEADS * DIM))
    with pytest.raises(KernelUnavailableError, match=message) as error:
        jax.jit(lambda r, t: reference_target_attention(r, t, impl=impl))(ref, tgt)
    with pytest.raises(KernelUnavailableError, match=message):
        layer.init(jax.random.PRNGKey(0), x, ReferenceLayout("joint", 2))
    # The interpreter is suggested only where there is one (the Pallas kernels, not cuDNN).
    suggested = f"'{impl}_interpret'" in str(error.value)
    assert suggested == (f"{impl}_interpret" in ATTENTION_IMPLS), str(error.value)


def test_the_targeted_devices_choose_not_the_host(caplog):
    """An ahead-of-time compile for a TPU from this CPU host: under a mesh of TPU devices
    (libtpu describes them; nothing runs) ``auto`` picks splash, and a GPU kernel asked
    for by name is refused naming the TPU it would have been compiled for."""
    from consist_jax.training.compile_report import tpu_devices

    mesh = jax.sharding.Mesh(np.array(tpu_devices("v5e-4")).reshape(1, -1), ("data", "fsdp"))
    ref = (jax.ShapeDtypeStruct((1, 6, HEADS, DIM), jnp.float32),) * 3  # traced only, never run
    tgt = (jax.ShapeDtypeStruct((1, 2, 5, HEADS, DIM), jnp.float32),) * 3
    attention._LOGGED.clear()
    with jax.set_mesh(mesh), caplog.at_level(logging.WARNING):
        assert attention.target_platform() == "tpu" and jax.default_backend() == "cpu"
        assert kernels.auto_backend() is kernels.SPLASH
        for impl in ("pallas", "cudnn"):
            with pytest.raises(KernelUnavailableError, match=f"attention_impl='{impl}' needs a GPU, but this "
                                                             f"computation targets 'tpu'; use 'auto' or 'xla'"):
                jax.jit(lambda r, t: reference_target_attention(r, t, impl=impl)).trace(ref, tgt)
    assert "attention_impl='auto' on 'tpu' targets: 'splash'" in caplog.text


def test_kernel_partition_over_mesh_axes():
    """Batch first, heads where the batch does not divide, else computed whole."""

    class Mesh:
        def __init__(self, **shape):
            self.shape = shape

    assert kernels._kernel_partition(Mesh(data=2, fsdp=4), 16, 8) == (("data", "fsdp"), ())
    assert kernels._kernel_partition(Mesh(data=1, fsdp=8), 2, 8) == ((), ("fsdp",))
    assert kernels._kernel_partition(Mesh(data=2, fsdp=4), 2, 8) == (("data",), ("fsdp",))
    assert kernels._kernel_partition(Mesh(data=2, fsdp=3), 1, 8) == ((), ("data",))


def test_cudnn_falls_back_to_xla_where_cudnn_cannot(rng, caplog):
    """float32 (cuDNN takes fp16/bf16 only), or no GPU at all as on this CPU: ``auto``'s
    cuDNN computes with XLA and says why."""
    ref, tgt = _qkv(rng, 2, 6), _qkv(rng, 2, 2, 5)
    mask = jnp.asarray([True, False])
    attention._LOGGED.clear()
    with caplog.at_level(logging.WARNING):
        out = jax.jit(lambda r, t: kernels.CUDNN_OR_XLA.rule(r, t, "causal", mask, False))(ref, tgt)
    _assert_close(out, XLA_BACKEND.rule(ref, tgt, "causal", mask, False), 1e-6)
    assert any("cuDNN cannot run this attention" in r.getMessage() for r in caplog.records)


def _layer_outputs(rng, impl):
    """SelfAttention in joint, extract and cached modes: (joint out, cached out)."""
    b, frames, length, channels = 2, 2, 6, HEADS * DIM
    layer = SelfAttention(HEADS, DIM, AttentionConfig(impl=impl))
    x = jnp.asarray(rng.standard_normal((b * (1 + frames), length, channels)), jnp.float32)
    mask = jnp.asarray([True, False])
    params = layer.init(jax.random.PRNGKey(0), x, ReferenceLayout("joint", frames), mask)
    joint = layer.apply(params, x, ReferenceLayout("joint", frames), mask)
    grouped = x.reshape(b, 1 + frames, length, channels)
    _, cache = layer.apply(
        params, grouped[:, 0], ReferenceLayout("extract"), mutable=[CACHE_COLLECTION]
    )
    targets = grouped[:, 1:].reshape(b * frames, length, channels)
    cached = layer.apply({**params, **cache}, targets, ReferenceLayout("cached", frames), mask)
    return joint, cached


def test_self_attention_layer_selects_the_kernel(rng):
    """``AttentionConfig.impl`` (UNetConfig.attention_impl) reaches every mode."""
    seed = int(rng.integers(2**31))
    expected = _layer_outputs(np.random.default_rng(seed), "xla")
    _assert_close(_layer_outputs(np.random.default_rng(seed), "pallas_interpret"), expected, 1e-5)


@needs_gpu
@pytest.mark.parametrize("head_dim", [40, 80, 160])
def test_cudnn_on_gpu_matches_xla(rng, head_dim):
    ref = _qkv(rng, 2, 256, dtype=jnp.bfloat16, heads=8, dim=head_dim)
    tgt = _qkv(rng, 2, 2, 256, dtype=jnp.bfloat16, heads=8, dim=head_dim)
    mask = jnp.asarray([True, False])
    try:
        out = jax.jit(lambda r, t: kernels.CUDNN.rule(r, t, "causal", mask, False))(ref, tgt)
    except NotImplementedError as error:  # e.g. head dim 160 before Hopper; auto -> xla
        pytest.skip(f"cuDNN on this GPU refuses head dim {head_dim}: {error}")
    _assert_close(out, XLA_BACKEND.rule(ref, tgt, "causal", mask, True), BF16_TOLERANCE)


@needs_gpu
def test_pallas_compiled_on_gpu_matches_xla(rng):
    ref = _qkv(rng, 1, 300, dtype=jnp.bfloat16, heads=4, dim=40)
    tgt = _qkv(rng, 1, 2, 200, dtype=jnp.bfloat16, heads=4, dim=40)
    mask = jnp.asarray([False])
    out = jax.jit(lambda r, t: kernels.PALLAS.rule(r, t, "causal", mask, False))(ref, tgt)
    _assert_close(out, XLA_BACKEND.rule(ref, tgt, "causal", mask, True), BF16_TOLERANCE)


@needs_tpu
def test_splash_compiled_on_tpu_matches_xla(rng):
    ref = _qkv(rng, 1, 512, dtype=jnp.bfloat16, heads=4, dim=128)
    tgt = _qkv(rng, 1, 2, 256, dtype=jnp.bfloat16, heads=4, dim=128)
    mask = jnp.asarray([False])
    out = jax.jit(lambda r, t: kernels.SPLASH.rule(r, t, "causal", mask, False))(ref, tgt)
    _assert_close(out, XLA_BACKEND.rule(ref, tgt, "causal", mask, True), BF16_TOLERANCE)
