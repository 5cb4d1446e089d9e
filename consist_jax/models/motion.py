"""AnimateDiff's motion module (the temporal transformer), on SCD's target frames only.

``TemporalTransformer`` computes what diffusers' ``AnimateDiffTransformer3D`` computes
(the blocks of ``MotionAdapter`` / ``UNetMotionModel``), on frames (B, F, h, w, C):

    x = GroupNorm(frames)             # statistics over (F, h, w) of each clip
    x = proj_in(x)                    # tokens: one sequence of F frames per (b, y, x)
    for each block:                   # frames attend to each other at each position
        x = x + attn1(norm1(x) + pe[:F])
        x = x + attn2(norm2(x) + pe[:F])     # a second self-attention, as AnimateDiff
        x = x + ff(norm3(x))                 # GEGLU
    return frames + proj_out(x)       # proj_out starts at zero: the module starts as identity

``pe`` is the sinusoidal table of frame positions 0..max_seq_length-1, added to the
normalised input of each attention (not to the residual stream), as diffusers does.

SCD keeps the reference out of time: ``on_target_frames`` is the one place that
decides which images of a UNet batch are frames of a clip (see ``ReferenceLayout``).
The reference of the joint layout passes through unchanged and a reference-only
batch (``extract``) skips the module, so the reference branch and its cache are
exactly those of the image model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.models.attention import dot_product_attention
from consist_jax.models.layers import GroupNorm
from consist_jax.models.self_attention import ReferenceLayout
from consist_jax.models.transformer import FeedForward, layer_norm
from consist_jax.parallel.frames import gather_frames, split_frames

Dtype = Any
PerBlock = Union[int, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """The motion modules of a video UNet (diffusers' ``MotionAdapter`` options).

    Per-block values follow the down blocks; up blocks use them reversed, the mid block
    the last one (as diffusers does). ``frames_axis`` is a runtime option: the mesh
    axis (or axes, clips first) the frames of a clip are split over, see
    consist_jax/parallel/frames.py; it does not change the parameters.
    """

    num_attention_heads: PerBlock = 8
    transformer_layers_per_block: PerBlock = 1
    mid_block_transformer_layers: int = 1
    use_mid_block: bool = True
    max_seq_length: int = 32  # frame positions the sinusoidal table covers
    norm_num_groups: int = 32  # UNetMotionModel takes the UNet's instead; equal (32) in practice
    frames_axis: Optional[Union[str, tuple[str, ...]]] = None

    def __post_init__(self):
        if isinstance(self.frames_axis, list):
            object.__setattr__(self, "frames_axis", tuple(self.frames_axis))
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, list):  # from JSON; keep the config hashable
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"MotionConfig.{name} must be positive integers, got {value!r}")
        for name in ("mid_block_transformer_layers", "max_seq_length", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"MotionConfig.{name} must be >= 1, got {getattr(self, name)}")

    def heads(self, block: int) -> int:
        """Attention heads of the motion modules at down-block depth ``block`` (-1: deepest)."""
        return _per_block(self.num_attention_heads, block)

    def layers(self, block: int) -> int:
        """Transformer blocks per motion module at down-block depth ``block``."""
        return _per_block(self.transformer_layers_per_block, block)

    def check_blocks(self, block_out_channels: tuple[int, ...]) -> None:
        """Raises unless per-block values and channel counts fit the UNet's blocks."""
        n = len(block_out_channels)
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"MotionConfig.{name} has {len(value)} entries, the UNet has {n} blocks")
        for i, c in enumerate(block_out_channels):
            if c % self.heads(i) or c % self.norm_num_groups:
                raise ValueError(
                    f"a motion module of {c} channels needs them divisible by its {self.heads(i)} "
                    f"heads and {self.norm_num_groups} norm groups"
                )

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "MotionConfig":
        """From a diffusers ``MotionAdapter`` config.json dict; ``overrides`` set our fields.

        The adapter's structure (``block_out_channels``, ``motion_layers_per_block``) is not
        kept here: it is the UNet's, and loading checks that they agree.
        """
        unsupported = {
            "conv_in_channels": None,  # PIA / SparseCtrl inputs, not AnimateDiff's motion module
            "motion_mid_block_layers_per_block": 1,  # SD's mid block has one attention
        }
        for key, default in unsupported.items():
            if config.get(key, default) != default:
                raise ValueError(f"motion adapter {key}={config[key]!r} is not supported ({default!r} is)")
        layers = config.get("motion_transformer_layers_per_block", 1)
        mid_layers = config.get("motion_transformer_layers_per_mid_block", 1)
        if isinstance(mid_layers, (list, tuple)):
            (mid_layers,) = mid_layers
        if isinstance(layers, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in layers):
            raise ValueError("per-layer motion_transformer_layers_per_block (nested lists) is not supported")
        kwargs = dict(
            num_attention_heads=config.get("motion_num_attention_heads", 8),
            transformer_layers_per_block=layers,
            mid_block_transformer_layers=mid_layers,
            use_mid_block=config.get("use_motion_mid_block", True),
            max_seq_length=config.get("motion_max_seq_length", 32),
            norm_num_groups=config.get("motion_norm_num_groups", 32),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _per_block(value: PerBlock, block: int) -> int:
    return value[block] if isinstance(value, tuple) else value


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """diffusers' ``SinusoidalPositionalEmbedding`` table: (length, dim) float32.

    Even columns sin(p w_i), odd columns cos(p w_i), w_i = 10000^(-2i/dim).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal frame positions need an even width, got {dim}")
    position = np.arange(length, dtype=np.float32)[:, None]
    rates = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * rates)
    table[:, 1::2] = np.cos(position * rates)
    return table


class TemporalSelfAttention(nn.Module):
    """Self-attention across frames: x (M, F, C) -> (M, F, C), M sequences of F frames.

    Projections as diffusers' ``Attention``: to_q/to_k/to_v (no bias), to_out.0. With
    ``frames_axis`` the queries stay split over the frames while keys and values are
    gathered, so each device attends its frames to the whole clip.
    """

    heads: int
    frames_axis: Optional[Union[str, tuple[str, ...]]] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m, f, channels = x.shape
        head_dim = channels // self.heads

        def project(name):
            y = nn.Dense(channels, use_bias=False, dtype=self.dtype, name=name)(x)
            return y.reshape(m, f, self.heads, head_dim)

        q = project("to_q")
        k = gather_frames(project("to_k"), self.frames_axis, frame_dim=1)
        v = gather_frames(project("to_v"), self.frames_axis, frame_dim=1)
        out = dot_product_attention(q, k, v).reshape(m, f, channels)
        return nn.Dense(channels, dtype=self.dtype, name="to_out.0")(out)


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions and a GEGLU MLP, pre-LayerNorm residuals.

    x (M, F, C), positions (F, C) -> (M, F, C).
    """

    heads: int
    frames_axis: Optional[Union[str, tuple[str, ...]]] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        for norm, attn in (("norm1", "attn1"), ("norm2", "attn2")):
            attention = TemporalSelfAttention(self.heads, self.frames_axis, self.dtype, name=attn)
            x = x + attention(layer_norm(norm, self.dtype)(x) + positions)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm("norm3", self.dtype)(x))


class TemporalTransformer(nn.Module):
    """One motion module (``AnimateDiffTransformer3D``): frames (B, F, h, w, C) -> same.

    F <= ``max_seq_length``. Parameters: norm, proj_in, transformer_blocks.{i}, proj_out
    (zero-initialised, so a fresh module returns its input).
    """

    heads: int
    num_layers: int = 1
    groups: int = 32
    max_seq_length: int = 32
    frames_axis: Optional[Union[str, tuple[str, ...]]] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        b, f, h, w, channels = frames.shape
        if f > self.max_seq_length:
            raise ValueError(
                f"the motion module knows {self.max_seq_length} frame positions, the clip has {f} "
                "frames: sample long videos in temporal windows"
            )
        if channels % self.heads:
            raise ValueError(f"motion module: {channels} channels not divisible by {self.heads} heads")
        frames = split_frames(frames, self.frames_axis)
        x = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(frames)
        # One sequence of F frames per spatial position: (B*h*w, F, C).
        x = x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, channels)
        x = nn.Dense(channels, dtype=self.dtype, name="proj_in")(x)
        positions = jnp.asarray(sinusoidal_positions(f, channels), self.dtype)
        for i in range(self.num_layers):
            block = TemporalTransformerBlock(
                self.heads, self.frames_axis, self.dtype, name=f"transformer_blocks.{i}"
            )
            x = block(x, positions)
        x = nn.Dense(
            channels,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="proj_out",
        )(x)
        x = x.reshape(b, h, w, f, channels).transpose(0, 3, 1, 2, 4)
        return split_frames(frames + x, self.frames_axis)


def on_target_frames(
    module: Callable[[jax.Array], jax.Array], x: jax.Array, layout: ReferenceLayout
) -> jax.Array:
    """Applies a temporal ``module`` to the target frames of a flat UNet batch only.

    x (N, h, w, C) laid out as ``layout`` says; ``module`` maps clips (B, F, h, w, C) to
    the same shape. Joint layout: each example's reference is sliced out and put back
    unchanged. ``none`` / ``cached``: every image is a frame. ``extract``: no frames,
    x is returned as is.
    """
    if layout.mode == "extract":
        return x
    grouped = x.reshape(-1, layout.images_per_example, *x.shape[1:])
    if layout.mode == "joint":
        targets = module(grouped[:, 1:])
        grouped = jnp.concatenate([grouped[:, :1], targets.astype(grouped.dtype)], axis=1)
    else:
        grouped = module(grouped).astype(grouped.dtype)
    return grouped.reshape(x.shape)
