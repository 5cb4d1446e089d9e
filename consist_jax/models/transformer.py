"""The UNet's spatial transformer (diffusers' Transformer2DModel, SD-1.x flavour).

Only ``attn1`` (self-attention) lets the images of a batch interact, through the
SCD rule (attention_rule.py, applied by self_attention.py); cross-attention,
LayerNorm and the feed-forward act on each image alone. The attention settings
arrive as one ``AttentionConfig``. ``cross_attention=False`` builds the blocks without
cross-attention (diffusers' Transformer2DModel with ``cross_attention_dim=None``).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.models.attention import dot_product_attention
from consist_jax.models.self_attention import AttentionConfig, ReferenceLayout, SelfAttention
from consist_jax.models.layers import GroupNorm, conv1x1
from consist_jax.parallel.batch import constrain_leading

Dtype = Any


def layer_norm(name: str, dtype: Dtype, eps: float = 1e-5) -> nn.LayerNorm:
    """torch.nn.LayerNorm semantics (two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CrossAttention(nn.Module):
    """diffusers' ``Attention`` over a context: x (N, L, C), context (N, M, D) -> (N, L, C)."""

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        n, length, channels = x.shape
        inner = self.heads * self.head_dim

        # Pinned to the batch split under a mesh: else SPMD may keep the FSDP-split weight
        # and gather a whole batch of activations (parallel/batch.py).
        def project(name, source):
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(source)
            return constrain_leading(y.reshape(n, source.shape[1], self.heads, self.head_dim))

        out = dot_product_attention(
            project("to_q", x), project("to_k", context), project("to_v", context), upcast=self.upcast
        )
        out = constrain_leading(out.reshape(n, length, inner))
        return nn.Dense(channels, dtype=self.dtype, name="to_out.0")(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward: x (..., C) -> (..., C), inner width ``mult * C``."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        inner = self.mult * channels
        hidden, gate = jnp.split(
            nn.Dense(2 * inner, dtype=self.dtype, name="net.0.proj")(x), 2, axis=-1
        )
        x = hidden * nn.gelu(gate, approximate=False)
        return nn.Dense(channels, dtype=self.dtype, name="net.2")(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (SCD rule), cross-attention (unless ``cross_attention=False``: the
    context is then unused), GEGLU MLP; pre-LayerNorm residuals."""

    heads: int
    head_dim: int
    attention: AttentionConfig = AttentionConfig()
    cross_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, layout: ReferenceLayout, reference_mask=None):
        attn1 = SelfAttention(
            self.heads, self.head_dim, attention=self.attention, dtype=self.dtype, name="attn1"
        )
        x = x + attn1(layer_norm("norm1", self.dtype)(x), layout, reference_mask)
        if self.cross_attention:
            attn2 = CrossAttention(
                self.heads, self.head_dim, upcast=self.attention.upcast, dtype=self.dtype, name="attn2"
            )
            x = x + attn2(layer_norm("norm2", self.dtype)(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm("norm3", self.dtype)(x))


class Transformer2D(nn.Module):
    """x (N, h, w, C), context (N, M, D) -> (N, h, w, C)."""

    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    attention: AttentionConfig = AttentionConfig()
    cross_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, layout: ReferenceLayout, reference_mask: Optional[jax.Array] = None):
        n, h, w, channels = x.shape
        residual = x
        x = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(channels, dtype=self.dtype, name="proj_in")(x.reshape(n, h * w, channels))
        else:
            x = conv1x1(channels, "proj_in", self.dtype)(x).reshape(n, h * w, channels)
        for i in range(self.num_layers):
            block = BasicTransformerBlock(
                self.heads,
                channels // self.heads,
                attention=self.attention,
                cross_attention=self.cross_attention,
                dtype=self.dtype,
                name=f"transformer_blocks.{i}",
            )
            x = block(x, context, layout, reference_mask)
        if self.use_linear_projection:
            x = nn.Dense(channels, dtype=self.dtype, name="proj_out")(x).reshape(n, h, w, channels)
        else:
            x = conv1x1(channels, "proj_out", self.dtype)(x.reshape(n, h, w, channels))
        return x + residual
