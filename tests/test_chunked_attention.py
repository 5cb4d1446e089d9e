"""Chunked attention (queries in chunks, recomputing backward) == the dense form: values,
gradients, the key mask, a last chunk that is padded, bfloat16; and its backward keeps no
(Nq, Nk) scores."""
import jax
import jax.numpy as jnp
import pytest
from parity import relative_error

from consist_jax.models.attention import key_masked_attention
from consist_jax.models.chunked_attention import chunked_attention

HEADS, DIM = 3, 8


def _inputs(rng, n_q, n_k, batch=2, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((batch, n_q, HEADS, DIM)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, n_k, HEADS, DIM)), dtype) for _ in range(2))
    mask = jnp.asarray(rng.uniform(size=(batch, n_k)) < 0.7).at[:, 0].set(True)  # one key always seen
    return q, k, v, mask


@pytest.mark.parametrize("n_q, n_k, chunk", [(10, 7, 4), (12, 12, 4), (5, 9, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_the_dense_form(rng, n_q, n_k, chunk, masked):
    """float32: one chunk computes exactly the dense form's operations, so values differ
    by the matmuls' summation order only (at most ~N_k roundings of each sum: <= 12 x 2^-24
    = 7e-7 here; 5e-7 the worst of 300 random cases); the gradients use the softmax
    Jacobian in its rowsum(dO * O) form, equal to autodiff's to a few roundings of each
    term (1.6e-6 the worst of 300)."""
    q, k, v, mask = _inputs(rng, n_q, n_k)
    mask = mask if masked else None
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(attend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask) * weights), (0, 1, 2)))

    ours = loss(lambda q, k, v, m: chunked_attention(q, k, v, m, chunk=chunk))
    dense = loss(key_masked_attention)
    out = jax.jit(lambda q, k, v: chunked_attention(q, k, v, mask, chunk=chunk))(q, k, v)
    assert relative_error(out, key_masked_attention(q, k, v, mask)) <= 2e-6
    (value, grads), (value_dense, grads_dense) = ours(q, k, v), dense(q, k, v)
    for name, g, g_dense in zip("qkv", grads, grads_dense):
        assert relative_error(g, g_dense) <= 1e-5, name


def test_masked_keys_get_no_weight_and_no_gradient(rng):
    q, k, v, mask = _inputs(rng, 6, 8)
    hidden = ~mask
    grads = jax.grad(lambda k, v: jnp.sum(chunked_attention(q, k, v, mask, chunk=4) ** 2), (0, 1))(k, v)
    for g in grads:
        assert float(jnp.abs(jnp.where(hidden[..., None, None], g, 0.0)).max()) == 0.0
    changed = v + jnp.where(hidden[..., None, None], 100.0, 0.0)
    assert relative_error(chunked_attention(q, k, changed, mask), chunked_attention(q, k, v, mask)) == 0.0


def test_bfloat16_stays_bfloat16_and_close(rng):
    q, k, v, mask = _inputs(rng, 20, 16, dtype=jnp.bfloat16)
    exact = key_masked_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    out = jax.jit(lambda *a: chunked_attention(*a, mask, upcast=True, chunk=8))(q, k, v)
    grads = jax.grad(lambda q: jnp.sum(chunked_attention(q, k, v, mask, chunk=8).astype(jnp.float32)))(q)
    assert out.dtype == jnp.bfloat16 and grads.dtype == jnp.bfloat16
    assert relative_error(out, exact) <= 3e-2


def test_backward_keeps_no_score_matrix():
    """Compiled forward + backward at 2048 tokens: the dense form's temporaries hold the
    (H, Nq, Nk) scores (and more); the chunked form's stay below one head's. Compile only."""
    n = 2048
    shape = jax.ShapeDtypeStruct((1, n, HEADS, DIM), jnp.float32)

    def temp_bytes(attend):
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, None)), (0, 1, 2)))
        return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    one_head_scores = n * n * 4
    assert temp_bytes(key_masked_attention) > HEADS * one_head_scores
    assert temp_bytes(chunked_attention) < one_head_scores


def test_bad_key_mask_is_named(rng):
    q, k, v, _ = _inputs(rng, 4, 5)
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\); expected \(B, Nk\) = \(2, 5\)"):
        chunked_attention(q, k, v, jnp.ones((2, 4), bool))
