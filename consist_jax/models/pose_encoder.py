"""Pose encoder ("pose guider"): rendered pose image -> features added after conv_in.

Animate Anyone's design, used by SCD for both the reference and the target pose
(shared weights): a 3x3 conv, then per stage a 3x3 conv and a stride-2 3x3 conv,
then a zero-initialised 3x3 projection to the UNet's first width, so an untrained
encoder leaves the pretrained UNet unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.models.layers import conv3x3


class PoseEncoder(nn.Module):
    """pose (N, H, W, 3) in [0, 1] -> (N, H / 2^(S-1), W / 2^(S-1), out_channels).

    S = len(block_out_channels); SD's (16, 32, 64, 128) downsamples by 8, the VAE's
    factor, so the output lines up with the latents.
    """

    out_channels: int = 320
    block_out_channels: Sequence[int] = (16, 32, 64, 128)
    dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @nn.compact
    def __call__(self, pose: jax.Array) -> jax.Array:
        if pose.ndim != 4 or pose.shape[-1] != 3:
            raise ValueError(f"pose images must be (N, H, W, 3), got {pose.shape}")
        channels = self.block_out_channels
        x = nn.silu(conv3x3(channels[0], "conv_in", self.dtype)(pose.astype(self.dtype)))
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            x = nn.silu(conv3x3(c_in, f"blocks.{2 * i}", self.dtype)(x))
            x = nn.silu(conv3x3(c_out, f"blocks.{2 * i + 1}", self.dtype, stride=2)(x))
        return nn.Conv(
            self.out_channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="conv_out",
        )(x)
