"""The UMT5 text encoder (transformers' ``UMT5EncoderModel``) in Flax: Wan's text tower.

    input_ids (B, L) int, attention_mask (B, L) (1 = token, 0 = padding)
        -> last_hidden_state (B, L, d_model)

A T5 encoder with one difference that matters: every layer has its own relative
position bias table (T5 has one, in the first layer, shared by all). Per layer:
RMS layer norm (no mean, no bias), self-attention without the 1/sqrt(d) scaling plus the
layer's bucketed relative-position bias, residual; RMS norm, gated-GELU (tanh) feed
forward, residual. A final RMS norm. Padded keys are masked out; padded queries still
get an output (as transformers'), which callers drop by the mask.

Parameter names mirror transformers' (``encoder.block.3.layer.0.SelfAttention.q``), so
``model.safetensors`` maps onto them by ``consist_jax.convert.loading``; the token
embedding is ``shared`` (transformers ties ``encoder.embed_tokens`` to it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist_jax import checks
from consist_jax.models.attention import dot_product_attention
from consist_jax.models.clip_vision import ACTIVATIONS

# transformers maps feed_forward_proj "gated-gelu" to the tanh GELU ("gelu_new").
_GATED_GELU = "gated-gelu"


@dataclasses.dataclass(frozen=True)
class UMT5EncoderConfig:
    """Hyper-parameters of a UMT5 encoder (transformers' names; defaults: umt5-small).

    Wan2.1's encoder is umt5-xxl: d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads,
    vocab 256384, 32 buckets, max_distance 128.
    """

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = _GATED_GELU
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_max_distance"):
            checks.positive_int(name, getattr(self, name))
        # Bidirectional buckets: half per direction, half of those exact (so >= 4).
        checks.check_number("relative_attention_num_buckets", self.relative_attention_num_buckets, 4,
                            integer=True)
        checks.positive_number("layer_norm_epsilon", self.layer_norm_epsilon)
        self.activation_name  # noqa: B018  (validates feed_forward_proj)

    @property
    def wo_dtype(self) -> Any:
        """The feed-forward output projection's dtype: float32 when the rest is float16
        (transformers' _keep_in_fp32_modules: T5's wo overflows float16), else `dtype`."""
        return jnp.float32 if jnp.dtype(self.dtype) == jnp.float16 else self.dtype

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        """The transformers ACT2FN name of the feed-forward activation."""
        if self.feed_forward_proj == _GATED_GELU:
            return "gelu_new"
        name = self.feed_forward_proj.removeprefix("gated-")
        if name not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} not supported: "
                             f"'gated-gelu' or [gated-]one of {sorted(ACTIVATIONS)}")
        return name

    @classmethod
    def from_transformers(cls, config: dict, **overrides) -> "UMT5EncoderConfig":
        """From a transformers UMT5 config.json dict (missing keys: transformers' defaults)."""
        if config.get("model_type") != "umt5":
            name = (config.get("architectures") or [None])[0]
            hint = f" (config of {name})" if name else ""
            raise ValueError(f"not a UMT5 config: model_type={config.get('model_type')!r}{hint}; "
                             f"expected 'umt5' (T5 shares one position bias: not supported)")
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        kwargs.update(overrides)
        return cls(**kwargs)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """The bidirectional T5 bucket of every (query, key) pair, (Lq, Lk) int32, on the host.

    Half the buckets per direction (keys after the query in the upper half); distances
    below a quarter of the buckets get one bucket each, longer ones logarithmically
    spaced buckets up to max_distance, beyond it the last. Written in transformers'
    float32 operation order, so a distance whose log ratio rounds to just below an
    integer (16, 32 and 64 of Wan's 32 buckets / 128) lands in the bucket it gets there.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # distance 0: log 0, unused (is_small)
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    log_ratio = log_ratio / np.float32(math.log(max_distance / max_exact))
    log_ratio = log_ratio * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(np.isfinite(log_ratio), log_ratio, 0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * weight, statistics in float32. (..., D).

    The normalised x is rounded to `dtype` before the weight multiplies it (transformers'
    order for half-precision weights; a no-op in float32).
    """

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return weight.astype(self.dtype) * normed


def _dense(features: int, config: UMT5EncoderConfig, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=config.dtype, name=name)


class UMT5Attention(nn.Module):
    """Unscaled multi-head self-attention plus this layer's relative position bias.

    x (B, L, D), key_mask (B, L) bool (True = token), buckets (L, L) int32 (shared by
    the layers; each has its own bias per bucket and head) -> (B, L, D).
    """

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, buckets: jax.Array) -> jax.Array:
        c = self.config
        b, length, _ = x.shape
        inner = c.num_heads * c.d_kv

        def project(name):
            return _dense(inner, c, name)(x).reshape(b, length, c.num_heads, c.d_kv)

        q, k, v = project("q"), project("k"), project("v")
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=jnp.float32,
                         name="relative_attention_bias")
        bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # (1, H, L, L)
        out = dot_product_attention(q, k, v, key_mask[:, None, None, :], scale=1.0, bias=bias)
        out = out.reshape(b, length, inner)
        return _dense(c.d_model, c, "o")(out)


class UMT5FeedForward(nn.Module):
    """act(x wi_0) * (x wi_1) wo (gated) or act(x wi) wo: (B, L, D) -> (B, L, D).

    `wo` computes in `config.wo_dtype` (float32 for a float16 model, as transformers),
    so with float16 its output, and the residual stream after it, are float32 as there.
    """

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = ACTIVATIONS[c.activation_name]
        if c.is_gated:
            hidden = act(_dense(c.d_ff, c, "wi_0")(x)) * _dense(c.d_ff, c, "wi_1")(x)
        else:
            hidden = act(_dense(c.d_ff, c, "wi")(x))
        return nn.Dense(c.d_model, use_bias=False, dtype=c.wo_dtype, name="wo")(hidden.astype(c.wo_dtype))


class UMT5AttentionLayer(nn.Module):
    """x + SelfAttention(layer_norm(x)). (B, L, D) -> (B, L, D)."""

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, buckets: jax.Array) -> jax.Array:
        c = self.config
        normed = RMSNorm(c.layer_norm_epsilon, c.dtype, name="layer_norm")(x)
        return x + UMT5Attention(c, name="SelfAttention")(normed, key_mask, buckets)


class UMT5FeedForwardLayer(nn.Module):
    """x + DenseReluDense(layer_norm(x)). (B, L, D) -> (B, L, D)."""

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        normed = RMSNorm(c.layer_norm_epsilon, c.dtype, name="layer_norm")(x)
        return x + UMT5FeedForward(c, name="DenseReluDense")(normed)


class UMT5Stack(nn.Module):
    """The encoder blocks and the final norm: embeddings (B, L, D) -> (B, L, D)."""

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        length = x.shape[1]
        buckets = jnp.asarray(relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                                        c.relative_attention_max_distance))
        for i in range(c.num_layers):
            x = UMT5AttentionLayer(c, name=f"block.{i}.layer.0")(x, key_mask, buckets)
            x = UMT5FeedForwardLayer(c, name=f"block.{i}.layer.1")(x)
        return RMSNorm(c.layer_norm_epsilon, c.dtype, name="final_layer_norm")(x)


class UMT5Encoder(nn.Module):
    """transformers' UMT5EncoderModel: token ids -> last_hidden_state (see the module doc)."""

    config: UMT5EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids (B, L) int; attention_mask (B, L), nonzero = token (None: all tokens).

        Returns last_hidden_state (B, L, d_model) in the config's dtype (the final norm's).
        """
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, name="shared")(input_ids)
        key_mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None
                    else jnp.asarray(attention_mask) != 0)
        return UMT5Stack(c, name="encoder")(x, key_mask)
