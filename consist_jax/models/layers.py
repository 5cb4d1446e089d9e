"""Building blocks shared by the UNet and the VAE (NHWC, diffusers parameter names).

Every module here treats each image of the batch on its own: SCD relies on that
(reference and target images only meet in self-attention, see attention.py).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv3x3(features: int, name: str, dtype: Dtype, stride: int = 1, padding: int = 1) -> nn.Conv:
    """A 3x3 convolution laid out like torch's Conv2d(k=3, padding=padding)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dtype=dtype,
        name=name,
    )


def conv1x1(features: int, name: str, dtype: Dtype) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over all axes but batch and channels: x (N, ..., C) -> same.

    Statistics are taken in float32 with the two-pass variance (as PyTorch does),
    whatever the compute dtype.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        grouped = x.astype(jnp.float32).reshape(
            x.shape[0], -1, self.num_groups, channels // self.num_groups
        )
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale + bias).astype(self.dtype)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time-embedding norm, SiLU).

    x (N, h, w, C_in), temb (N, T) or None -> (N, h, w, out_channels).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x)
        h = conv3x3(self.out_channels, "conv1", self.dtype)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h)
        h = conv3x3(self.out_channels, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, "conv_shortcut", self.dtype)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Strided 3x3 conv. ``padding=0`` pads right/bottom by one first, like the VAE encoder.

    x (N, h, w, C) -> (N, ceil(h/2), ceil(w/2), out_channels).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv3x3(self.out_channels, "conv", self.dtype, stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv. x (N, h, w, C) -> (N, 2h, 2w, out)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.out_channels, "conv", self.dtype)(x)
