"""LPIPS v0.1 (Zhang et al. 2018, the ``lpips`` package) in Flax: AlexNet or VGG16 features
and the learned linear heads.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )

with ``f_l`` five ReLU activations of an ImageNet backbone, each normalised to unit length
over channels (eps 1e-10 added to the norm), and ``w_l`` non-negative 1x1 conv weights.
Inputs are first shifted and scaled per channel (lpips' ``ScalingLayer``).

Parameter names are the published files' keys: the backbone is torchvision's
``features.<i>`` (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), the heads are
lpips' ``lin<l>.model.1`` (``weights/v0.1/alex.pth`` / ``vgg.pth``).

Inputs: NHWC in [-1, 1] (lpips' convention); ``lpips_distance(..., normalize=True)``
takes [0, 1] images, as ``lpips.LPIPS.forward(normalize=True)`` does.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.eval.layers import conv2d, max_pool

# lpips' ScalingLayer constants (ImageNet statistics re-expressed for [-1, 1] inputs).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# (torchvision index, out channels, kernel, stride, padding) per conv; "M" = max pool 3/2 or 2/2.
ALEX_LAYERS = (
    (0, 64, 11, 4, 2), "tap", "M", (3, 192, 5, 1, 2), "tap", "M", (6, 384, 3, 1, 1), "tap",
    (8, 256, 3, 1, 1), "tap", (10, 256, 3, 1, 1), "tap",
)
VGG_LAYERS = (
    (0, 64), (2, 64), "tap", "M", (5, 128), (7, 128), "tap", "M",
    (10, 256), (12, 256), (14, 256), "tap", "M", (17, 512), (19, 512), (21, 512), "tap", "M",
    (24, 512), (26, 512), (28, 512), "tap",
)
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class NetLinLayer(nn.Module):
    """lpips' head: Dropout (identity at eval) then a bias-free 1x1 conv to one channel."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(1, 1, "model.1", use_bias=False)(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance: x, y (N, H, W, 3) in [-1, 1] -> (N,).

    ``net`` is ``"alex"`` (lpips' default) or ``"vgg"``. AlexNet needs H, W >= 32 or so
    (its first conv has stride 4), VGG needs >= 16.
    """

    net: str = "alex"

    def setup(self):
        if self.net not in CHANNELS:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg'; got {self.net!r}")
        self.layers = ALEX_LAYERS if self.net == "alex" else VGG_LAYERS
        self.convs = [self._conv(layer) for layer in self.layers if isinstance(layer, tuple)]
        self.heads = [NetLinLayer(name=f"lin{i}") for i in range(5)]

    def _conv(self, layer: tuple) -> nn.Conv:
        if self.net == "alex":
            index, out, k, s, p = layer
            return conv2d(out, k, f"features.{index}", stride=s, padding=p)
        index, out = layer
        return conv2d(out, 3, f"features.{index}", padding=1)

    def scale_inputs(self, x: jax.Array) -> jax.Array:
        return (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five tapped ReLU activations of the (scaled) input: (N, H, W, 3) -> list of NHWC."""
        taps, convs = [], iter(self.convs)
        pool = ((3, 3), (2, 2)) if self.net == "alex" else ((2, 2), (2, 2))
        for layer in self.layers:
            if layer == "tap":
                taps.append(x)
            elif layer == "M":
                x = max_pool(x, *pool)
            else:
                x = nn.relu(next(convs)(x))
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        n = x.shape[0]
        # One backbone pass over both images: the two sides share every weight.
        taps = self.features(self.scale_inputs(jnp.concatenate([x, y], axis=0)))
        total = jnp.zeros((n,), jnp.float32)
        for head, feats in zip(self.heads, taps):
            unit = feats / (jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True)) + NORM_EPS)
            diff = jnp.square(unit[:n] - unit[n:])
            total = total + head(diff).mean(axis=(1, 2, 3))
        return total


def lpips_distance(
    module: LPIPS, params, x: jax.Array, y: jax.Array, normalize: bool = True
) -> jax.Array:
    """LPIPS per image pair: (..., H, W, 3) x2 -> (...).

    normalize=True: inputs in [0, 1] (mapped to [-1, 1]); False: inputs already in [-1, 1].
    (DisCo's evaluation passes [0, 1] images with normalize=False, a quirk its numbers carry.)
    """
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).astype(jnp.float32)
    y = y.reshape(-1, *y.shape[-3:]).astype(jnp.float32)
    if normalize:
        x, y = 2.0 * x - 1.0, 2.0 * y - 1.0
    return module.apply({"params": params}, x, y).reshape(lead)


@functools.cache
def init_shapes(net: str) -> dict:
    """The parameter tree (ShapeDtypeStructs) of ``LPIPS(net)``."""
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(LPIPS(net).init, jax.random.PRNGKey(0), dummy, dummy)["params"]


def backbone_shapes(net: str) -> dict:
    """The torchvision part (``features.<i>``) of ``init_shapes(net)``."""
    return {k: v for k, v in init_shapes(net).items() if k.startswith("features.")}


def head_shapes(net: str) -> dict:
    """The lpips part (``lin<l>``) of ``init_shapes(net)``."""
    return {k: v for k, v in init_shapes(net).items() if k.startswith("lin")}
