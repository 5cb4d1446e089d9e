"""Softmax attention in query chunks, with a backward pass that recomputes (flash-style, in XLA).

``dot_product_attention`` materialises the (B, H, Nq, Nk) scores, and its autodiff keeps
them (and the softmax) for the backward pass: at 1024 tokens, batch 4 and 4 heads that is
64 MB a tensor, read and written several times, which is what bounds a CPU step. Here the
queries go through in chunks of ``CHUNK``: each chunk's scores, softmax and output are
computed while they are small, and only the output and each row's log-sum-exp are kept.
The backward pass (``jax.custom_vjp``) recomputes a chunk's probabilities from the
log-sum-exp, p = exp(s - lse), and forms

    dV += P^T dO,   dS = P * (dO V^T - rowsum(dO * O)),   dQ = dS K / sqrt(d),   dK += dS^T Q / sqrt(d)

so residual memory is O(N D) instead of O(N^2). Same numbers as the dense form to float32
rounding (tests/test_chunked_attention.py). On the dev CPU (2 cores) one attention's
forward + backward at 1024 tokens (batch 4, 4 heads of 16) takes ~48 ms against the dense
form's ~145 ms, and the small UNet's train step 0.73 s against 1.00 s
(``bench/train_step.py``, BENCHMARKS.md "Train step").
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Query rows per chunk. 128 was the fastest of 64/128/256/1024 on the dev CPU (2 cores)
# at 1024 tokens, 4 heads of 16: a chunk's scores (B*H*128*Nk floats) then stay in cache.
CHUNK = 128


def chunked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_mask: Optional[jax.Array] = None,
    *,
    upcast: bool = False,
    chunk: int = CHUNK,
) -> jax.Array:
    """Softmax attention. query (B, Nq, H, D), key/value (B, Nk, H, D) -> (B, Nq, H, D).

    key_mask: (B, Nk) bool or None; True = may be attended (every query must see at
    least one key). ``upcast`` computes the scores in float32 for bf16 inputs, as in
    ``attention.dot_product_attention``; the softmax is always float32. ``chunk``: query
    rows per chunk (Nq is padded up to a multiple of it; padded rows are dropped).
    """
    if key_mask is not None and key_mask.shape != (key.shape[0], key.shape[1]):
        raise ValueError(f"key_mask has shape {key_mask.shape}; expected (B, Nk) = {key.shape[:2]}")
    n_q = query.shape[1]
    chunk = min(chunk, n_q)
    padded = -(-n_q // chunk) * chunk
    if padded != n_q:
        query = jnp.pad(query, ((0, 0), (0, padded - n_q), (0, 0), (0, 0)))
    return _attend(query, key, value, key_mask, upcast, chunk)[:, :n_q]


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(B, N, H, D) -> (N / chunk, B, H, chunk, D)."""
    b, n, h, d = x.shape
    return x.reshape(b, n // chunk, chunk, h, d).transpose(1, 0, 3, 2, 4)


def _from_chunks(x: jax.Array) -> jax.Array:
    """(N / chunk, B, H, chunk, D) -> (B, N, H, D)."""
    c, b, h, chunk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, c * chunk, h, d)


def _heads_first(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)  # (B, N, H, D) <-> (B, H, N, D)


def _scores(q_chunk, keys, key_mask, upcast, keys_first=False):
    """One chunk's float32 scores (B, H, chunk, Nk), or (B, H, Nk, chunk) with
    ``keys_first``; q_chunk is already scaled."""
    if upcast:
        q_chunk, keys = q_chunk.astype(jnp.float32), keys.astype(jnp.float32)
    if keys_first:
        scores = jnp.einsum("bhkd,bhqd->bhkq", keys, q_chunk).astype(jnp.float32)
        visible = None if key_mask is None else key_mask[:, None, :, None]
    else:
        scores = jnp.einsum("bhqd,bhkd->bhqk", q_chunk, keys).astype(jnp.float32)
        visible = None if key_mask is None else key_mask[:, None, None, :]
    if visible is not None:
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    return scores


def _forward(query, key, value, key_mask, upcast, chunk):
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    q_chunks = _to_chunks(query * scale, chunk)
    keys, values = _heads_first(key), _heads_first(value)

    def one_chunk(q_chunk):
        scores = _scores(q_chunk, keys, key_mask, upcast)
        peak = scores.max(axis=-1, keepdims=True)
        unnormalised = jnp.exp(scores - peak)
        total = unnormalised.sum(axis=-1, keepdims=True)
        weights = (unnormalised / total).astype(value.dtype)  # the dense form's order of ops
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, values)
        return out, (peak + jnp.log(total))[..., 0]

    out, log_sum_exp = jax.lax.map(one_chunk, q_chunks)
    return out, (q_chunks, keys, values, key_mask, out, log_sum_exp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(query, key, value, key_mask, upcast, chunk):
    return _from_chunks(_forward(query, key, value, key_mask, upcast, chunk)[0])


def _attend_forward(query, key, value, key_mask, upcast, chunk):
    out, residuals = _forward(query, key, value, key_mask, upcast, chunk)
    return _from_chunks(out), residuals


def _attend_backward(upcast, chunk, residuals, d_out):
    q_chunks, keys, values, key_mask, out, log_sum_exp = residuals
    scale = q_chunks.shape[-1] ** -0.5
    f32 = jnp.float32
    d_out_chunks = _to_chunks(d_out, chunk)
    # rowsum(dO * O): the softmax's Jacobian term, one number per query row.
    row_terms = (d_out_chunks.astype(f32) * out.astype(f32)).sum(axis=-1)

    # Keys first, (B, H, Nk, chunk): then dV, dP and dK are plain matmuls over the chunk
    # and only dQ contracts the keys; 22% faster than the queries-first layout on CPU.
    # dQ = dS^T K would contract dS's major axis, a matmul XLA:CPU does not hand to
    # YNNPACK (its own emitter ran at about half the speed); as dQ^T = K^T dS, K^T copied
    # once (the barrier stops XLA folding the transpose back into the dot), it is a plain
    # one, and only the small (D, chunk) results are transposed: -14% of one attention's
    # forward + backward at 1024 tokens.
    keys_by_dim = jax.lax.optimization_barrier(jnp.swapaxes(keys, 2, 3))  # (B, H, D, Nk)

    def one_chunk(carry, chunk_inputs):
        d_keys, d_values = carry
        q_chunk, lse, d_o, row_term = chunk_inputs
        probs = jnp.exp(_scores(q_chunk, keys, key_mask, upcast, keys_first=True) - lse[:, :, None, :])
        d_values = d_values + jnp.einsum(
            "bhkq,bhqd->bhkd", probs.astype(d_o.dtype), d_o, preferred_element_type=f32
        )
        d_probs = jnp.einsum("bhkd,bhqd->bhkq", values, d_o, preferred_element_type=f32)
        d_scores = (probs * (d_probs - row_term[:, :, None, :])).astype(q_chunk.dtype)
        d_q = jnp.einsum("bhdk,bhkq->bhdq", keys_by_dim, d_scores, preferred_element_type=f32)
        d_keys = d_keys + jnp.einsum("bhkq,bhqd->bhkd", d_scores, q_chunk, preferred_element_type=f32)
        return (d_keys, d_values), d_q

    zeros = jnp.zeros_like(keys, f32)  # like keys: varying over the same axes under shard_map
    (d_keys, d_values), d_q = jax.lax.scan(
        one_chunk, (zeros, zeros), (q_chunks, log_sum_exp, d_out_chunks, row_terms)
    )
    # q_chunks hold Q / sqrt(d), so dK above is already dS^T Q / sqrt(d).
    d_query = (_from_chunks(jnp.swapaxes(d_q, 3, 4)) * scale).astype(q_chunks.dtype)
    d_key = _heads_first(d_keys).astype(keys.dtype)
    d_value = _heads_first(d_values).astype(values.dtype)
    return d_query, d_key, d_value, None


_attend.defvjp(_attend_forward, _attend_backward)
