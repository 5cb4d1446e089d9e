"""The Kinetics-400 I3D (Carreira & Zisserman 2017) used for FVD, in Flax.

We accept the layout of ``i3d_pretrained_400.pt``, the PyTorch port of DeepMind's
Kinetics-400 RGB I3D (piergiaj's ``pytorch_i3d.InceptionI3d``), which is the file DisCo's
evaluation (``FVD-3DInception``), MCVD and their followers load. Keys read
``Mixed_4b.b1b.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ``logits.conv3d.bias``.
(StyleGAN-V's ``i3d_torchscript.pt`` is a TorchScript archive: code, not a state dict.)

The port reproduces that module exactly: every ``Unit3D`` pads its input the TensorFlow
"SAME" way (the odd pixel after), convolves without bias, applies BatchNorm (eps 1e-3)
and ReLU; ``MaxPool3dSamePadding`` pads with zeros, not -inf (identical here: it only
ever pools ReLU outputs). The head is AvgPool3d(1x7x7, stride 1) -> 1x1x1 conv (with
bias) -> mean over time.

Outputs: the 400 Kinetics logits (the FVD feature: the original TF FVD and DisCo both
use the logits) or the 1024-d average-pooled features, time-averaged (``features``).
Input: (B, T, 224, 224, 3) in [-1, 1]; any T >= 1.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.eval.layers import BatchNorm, Conv3d, tf_same_padding
from consist_jax.eval.resize import resize_bicubic_antialiased

I3D_SIZE = 224
NUM_CLASSES = 400
FEATURE_DIM = 1024
BN_EPS = 1e-3

# Mixed blocks: (name, [b0, b1a, b1b, b2a, b2b, b3b] output channels), and the pools between.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
POOLS = {  # name -> (kernel, stride) of the max pool placed before that block
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),
}


def same_max_pool(x: jax.Array, kernel, stride) -> jax.Array:
    """MaxPool3dSamePadding: TF-SAME zero padding, then a valid max pool. (B, T, H, W, C)."""
    pads = tf_same_padding(x.shape[1:4], kernel, stride)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    return nn.max_pool(x, tuple(kernel), tuple(stride), "VALID")


class Unit3D(nn.Module):
    """TF-SAME conv3d (+ BatchNorm + ReLU); torch names ``conv3d`` and ``bn``."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    use_batch_norm: bool = True
    use_bias: bool = False
    activation: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pads = tf_same_padding(x.shape[1:4], self.kernel, self.stride)
        x = Conv3d(self.features, self.kernel, self.stride, pads, self.use_bias, name="conv3d")(x)
        if self.use_batch_norm:
            x = BatchNorm(BN_EPS, name="bn")(x)
        return nn.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """(B, T, H, W, C) -> (B, T, H, W, b0 + b1b + b2b + b3b)."""

    channels: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        c0, c1a, c1b, c2a, c2b, c3b = self.channels
        b0 = Unit3D(c0, name="b0")(x)
        b1 = Unit3D(c1b, (3, 3, 3), name="b1b")(Unit3D(c1a, name="b1a")(x))
        b2 = Unit3D(c2b, (3, 3, 3), name="b2b")(Unit3D(c2a, name="b2a")(x))
        b3 = Unit3D(c3b, name="b3b")(same_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3D(nn.Module):
    """x (B, T, 224, 224, 3) in [-1, 1] -> logits (B, 400) (``output="logits"``),
    time-averaged pooled features (B, 1024) (``"features"``), or both (``"both"``)."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, output: str = "logits") -> jax.Array:
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
        x = same_max_pool(x, (1, 3, 3), (1, 2, 2))
        x = Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = same_max_pool(x, (1, 3, 3), (1, 2, 2))
        for name, channels in MIXED.items():
            if name in POOLS:
                x = same_max_pool(x, *POOLS[name])
            x = InceptionModule(channels, name=name)(x)
        if x.shape[2:4] != (7, 7):
            raise ValueError(
                f"I3D's 7x7 head needs 224x224 inputs; the final map is {x.shape[2:4]}"
            )
        pooled = x.mean(axis=(2, 3), keepdims=True)  # AvgPool3d((1, 7, 7), stride 1)
        features = pooled.mean(axis=(1, 2, 3))
        if output == "features":
            return features
        logits = Unit3D(self.num_classes, use_batch_norm=False, use_bias=True, activation=False,
                        name="logits")(pooled)  # dropout is the identity at eval
        logits = logits.mean(axis=(1, 2, 3))  # squeeze space, average over time
        return (logits, features) if output == "both" else logits


def fvd_preprocess(videos: jax.Array) -> jax.Array:
    """DisCo's FVD input: (B, F, H, W, 3) in [0, 1] -> (B, F, 224, 224, 3) in [-1, 1].

    Frames are resized as PIL's bicubic does on 0..255 floats, then x / 127.5 - 1.
    """
    frames = resize_bicubic_antialiased(videos * 255.0, (I3D_SIZE, I3D_SIZE))
    return frames / 127.5 - 1.0


@functools.cache
def init_shapes():
    """The parameter tree (ShapeDtypeStructs) of ``InceptionI3D``."""
    dummy = jnp.zeros((1, 1, I3D_SIZE, I3D_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionI3D().init, jax.random.PRNGKey(0), dummy)["params"]
