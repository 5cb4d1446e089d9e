"""Layers shared by the metric feature networks (inference only, NHWC / NDHWC).

Parameter leaves are named so that ``consist_jax.convert.loading`` maps the published
PyTorch state dicts onto them without a table:

* ``BatchNorm`` keeps torch's eval-mode statistics as parameters named ``running_mean``
  / ``running_var`` (next to ``scale`` <-> ``weight`` and ``bias``): these networks are
  never trained here, so the statistics are constants like any weight.
* ``Conv3d`` stores its kernel as ``weight`` in torch's own (O, I, kt, kh, kw) layout
  and convolves with that layout directly: the loader transposes 2-D/1-D ``kernel``s
  only, and XLA takes any kernel layout at no cost.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Feature networks are metric references: full float32 accuracy on every backend.
HIGHEST = jax.lax.Precision.HIGHEST

Padding = Sequence[tuple[int, int]]


def conv2d(features: int, kernel, name: str, stride=1, padding=0, use_bias=True) -> nn.Conv:
    """torch.nn.Conv2d(k, stride, padding) as flax: int or (h, w) kernel/stride/padding."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nn.Conv(
        features, (kh, kw), strides=(sh, sw), padding=((ph, ph), (pw, pw)),
        use_bias=use_bias, precision=HIGHEST, name=name,
    )


class BatchNorm(nn.Module):
    """torch BatchNorm{2,3}d in eval mode over the last axis: x (..., C) -> same."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("running_var", nn.initializers.ones, (c,), jnp.float32)
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


class Conv3d(nn.Module):
    """torch.nn.Conv3d with an explicit padding: x (N, T, H, W, C) -> (N, T', H', W', features)."""

    features: int
    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: Padding = ((0, 0), (0, 0), (0, 0))
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features, x.shape[-1], *self.kernel_size)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(1, 2, 3, 4), out_axis=0
        )
        weight = self.param("weight", init, shape, jnp.float32)
        y = jax.lax.conv_general_dilated(
            x, weight, self.strides, tuple(self.padding),
            dimension_numbers=("NDHWC", "OIDHW", "NDHWC"), precision=HIGHEST,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def max_pool(x: jax.Array, window, strides, padding: Padding | str = "VALID") -> jax.Array:
    """torch max_pool (floor mode): pads with -inf, like torch's ``padding=``."""
    return nn.max_pool(x, tuple(window), tuple(strides), padding)


def avg_pool_exclude_pad(x: jax.Array, window, padding: Padding) -> jax.Array:
    """torch avg_pool(stride 1, count_include_pad=False): each mean over real pixels only."""
    return nn.avg_pool(x, tuple(window), (1,) * len(window), padding, count_include_pad=False)


def tf_same_padding(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> list:
    """TensorFlow's 'SAME' padding (the extra pixel goes after), per spatial axis."""
    pads = []
    for size, k, s in zip(sizes, kernel, strides):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    return pads
