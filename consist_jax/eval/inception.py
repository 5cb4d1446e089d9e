"""The FID Inception-v3 of pytorch-fid in Flax: 2048-d pool features.

pytorch-fid ports TensorFlow's 2015-12-05 Inception graph (the network the original FID
used) onto torchvision's ``Inception3`` layout, with four blocks changed to follow the
TF graph: in Mixed_5b/5c/5d (block A), Mixed_6b-6e (block C) and Mixed_7b (block E_1)
the pool branch averages over real pixels only (``count_include_pad=False``), and
Mixed_7c (block E_2) max-pools instead. Every conv is bias-free, followed by BatchNorm
(eps 1e-3) and ReLU.

Parameter names are the keys of ``pt_inception-2015-12-05-6726825d.pth``
(``Mixed_6b.branch7x7dbl_3.conv.weight``, ``...bn.running_var``); its 1008-way ``fc``
is unused for pool features.

Preprocessing (``fid_preprocess``) is pytorch-fid's: [0, 1] images resized to 299x299
bilinearly (no antialias, ``align_corners=False``), then mapped to [-1, 1].
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.eval.layers import BatchNorm, avg_pool_exclude_pad, conv2d, max_pool
from consist_jax.eval.resize import resize_bilinear

FID_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; torch names ``conv`` and ``bn``."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv2d(self.features, self.kernel, "conv", self.stride, self.padding, use_bias=False)(x)
        return nn.relu(BatchNorm(BN_EPS, name="bn")(x))


def _pool_3x3_avg(x):
    return avg_pool_exclude_pad(x, (3, 3), ((1, 1), (1, 1)))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: (N, H, W, C) -> (N, H, W, 224 + pool_features)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_pool_3x3_avg(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): (N, H, W, C) -> (N, (H-3)//2+1, ..., 480 + C)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        bp = max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e (factorised 7x7): (N, H, W, 768) -> (N, H, W, 768)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_pool_3x3_avg(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): (N, H, W, 768) -> (N, (H-3)//2+1, ..., 1280)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        bp = max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, FID's E_1) / Mixed_7c (``pool="max"``, E_2): -> (N, H, W, 2048)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [BasicConv2d(384, **row, name="branch3x3_2a")(b3),
             BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
             BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _pool_3x3_avg(x)
        else:  # The TF graph max-pools here; torch pads max pools with -inf.
            pooled = max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """x (N, H, W, 3) in [-1, 1], H, W >= 75 (299 in FID) -> pool features (N, 2048)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool(x, (3, 3), (2, 2))
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool(x, (3, 3), (2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def fid_preprocess(images: jax.Array) -> jax.Array:
    """pytorch-fid's input: (N, H, W, 3) in [0, 1] -> (N, 299, 299, 3) in [-1, 1]."""
    return 2.0 * resize_bilinear(images, (FID_SIZE, FID_SIZE)) - 1.0


def fid_features(module: FIDInceptionV3, params, images: jax.Array) -> jax.Array:
    """(N, H, W, 3) in [0, 1] -> (N, 2048), as pytorch-fid's ``InceptionV3([3])``."""
    return module.apply({"params": params}, fid_preprocess(images))


@functools.cache
def init_shapes():
    """The parameter tree (ShapeDtypeStructs) of ``FIDInceptionV3``."""
    dummy = jnp.zeros((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), dummy)["params"]
