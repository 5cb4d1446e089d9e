"""The Kinetics-400 3D ResNet-50 (Hara et al., "3D-ResNets-PyTorch") that DisCo's FID-VID
uses (``FVD-3DRN50``), in Flax: 2048-d clip features.

Layout of ``resnet-50-kinetics.pth`` (shortcut type B: a strided 1x1x1 conv + BatchNorm
on the first block of each stage): ``conv1`` 7x7x7 stride (1, 2, 2), ``bn1``, ReLU,
max pool 3x3x3 stride 2 pad 1, stages ``layer1..4`` of 3/4/6/3 bottlenecks
(``conv1`` 1x1x1, ``conv2`` 3x3x3 with the stride, ``conv3`` 1x1x1 to 4x width, each with
``bn1..3``), then an average pool over the final (ceil(T/16), ceil(H/32), ceil(W/32))
map. DisCo builds it with ``last_fc=False``: the 2048-d pooled vector is the feature;
the file's ``fc`` (400 classes) is unused. BatchNorm eps 1e-5. The file's keys carry
DataParallel's ``module.`` prefix, which ``consist_jax.eval.weights`` strips.

Input: DisCo's (``fid_vid_preprocess``): 16-frame clips at 112x112, 0..255 values minus
the Kinetics mean (114.7748, 107.7354, 99.4750), no scaling.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax.eval.layers import BatchNorm, Conv3d, max_pool
from consist_jax.eval.resize import resize_bicubic_antialiased

CLIP_LENGTH = 16
CLIP_SIZE = 112
FEATURE_DIM = 2048
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)


class Bottleneck(nn.Module):
    """(B, T, H, W, C) -> (B, T/s, H/s, W/s, 4 * planes)."""

    planes: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        s = (self.stride,) * 3
        h = nn.relu(BatchNorm(name="bn1")(Conv3d(self.planes, (1, 1, 1), name="conv1")(x)))
        h = Conv3d(self.planes, (3, 3, 3), s, ((1, 1),) * 3, name="conv2")(h)
        h = nn.relu(BatchNorm(name="bn2")(h))
        h = BatchNorm(name="bn3")(Conv3d(4 * self.planes, (1, 1, 1), name="conv3")(h))
        if self.downsample:  # torch's nn.Sequential(conv, bn) -> children "0" and "1"
            x = Conv3d(4 * self.planes, (1, 1, 1), s, name="downsample.0")(x)
            x = BatchNorm(name="downsample.1")(x)
        return nn.relu(h + x)


class ResNet3D50(nn.Module):
    """x (B, T, H, W, 3) (mean-subtracted 0..255) -> (B, 2048). DisCo: T=16, H=W=112."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv3d(64, (7, 7, 7), (1, 2, 2), ((3, 3),) * 3, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x))
        x = max_pool(x, (3, 3, 3), (2, 2, 2), ((1, 1),) * 3)
        channels = 64
        for stage, (planes, blocks, stride) in enumerate(STAGES, start=1):
            for block in range(blocks):
                first = block == 0
                x = Bottleneck(
                    planes, stride if first else 1,
                    downsample=first and (stride != 1 or channels != 4 * planes),
                    name=f"layer{stage}.{block}",
                )(x)
                channels = 4 * planes
        # torch: AvgPool3d((ceil(T/16), ceil(H/32), ceil(W/32)), stride=1), then flatten.
        # Every stride-2 stage maps n to ceil(n / 2), so the final map is exactly that
        # window for any input size: the pool is a global mean.
        return x.mean(axis=(1, 2, 3))


def fid_vid_preprocess(videos: jax.Array) -> jax.Array:
    """Frames as DisCo feeds the 3D ResNet: (..., H, W, 3) in [0, 1] -> (..., 112, 112, 3).

    PIL-bicubic resize of 0..255 values, minus the Kinetics mean (no division).
    """
    frames = resize_bicubic_antialiased(videos * 255.0, (CLIP_SIZE, CLIP_SIZE))
    return frames - jnp.asarray(KINETICS_MEAN, jnp.float32)


def split_clips(num_frames: int, clip_length: int = CLIP_LENGTH) -> tuple[int, int]:
    """DisCo's segmentation of a video: (number of clips, frames of padding).

    A video is padded to a multiple of ``clip_length`` by repeating its last frame and
    cut into consecutive clips; its feature is the mean of its clips' features.
    """
    clips = math.ceil(num_frames / clip_length)
    return clips, clips * clip_length - num_frames


def video_clips(videos: jax.Array, clip_length: int = CLIP_LENGTH) -> jax.Array:
    """(B, F, H, W, C) -> (B, S, clip_length, H, W, C), last frame repeated as padding."""
    b, f = videos.shape[:2]
    clips, pad = split_clips(f, clip_length)
    if pad:
        videos = jnp.concatenate([videos, jnp.repeat(videos[:, -1:], pad, axis=1)], axis=1)
    return videos.reshape(b, clips, clip_length, *videos.shape[2:])


@functools.cache
def init_shapes():
    """The parameter tree (ShapeDtypeStructs) of ``ResNet3D50``."""
    dummy = jnp.zeros((1, CLIP_LENGTH, CLIP_SIZE, CLIP_SIZE, 3), jnp.float32)
    return jax.eval_shape(ResNet3D50().init, jax.random.PRNGKey(0), dummy)["params"]
