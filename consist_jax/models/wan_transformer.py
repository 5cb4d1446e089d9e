"""The Wan2.1 video diffusion transformer (diffusers' ``WanTransformer3DModel``) in Flax.

``WanTransformer(config).apply({"params": p}, sample, timesteps, context)`` computes what
diffusers computes, channels-last:

    sample (B, F, H, W, C_in), timesteps (B,), context (B, L, text_dim)
      [, image_context (B, L_img, image_dim): the I2V variant's CLIP image tokens]
    -> (B, F, H, W, C_out)

The pieces (diffusers names, which are also our parameter names):
  * ``patch_embedding``: a Conv3d with stride = kernel = ``patch_size``; the patches
    become N = f h w tokens in (frame, row, column) order.
  * ``rope``: 3D rotary positions. Each head's channels split into a frame, a row and a
    column part (``rope_dims``); pair i of a part turns by ``position * theta^(-2i/d)``.
    The angles are constants of the latent grid, computed in float64 with numpy.
  * ``condition_embedder``: sinusoidal time embedding -> ``time_embedder`` (float32) ->
    ``time_proj`` (the 6 modulation vectors of every block); ``text_embedder`` (GELU-tanh
    MLP) for the text; ``image_embedder`` (I2V) for the image tokens.
  * ``blocks.i``: adaptive-norm self-attention (q/k RMS-normed across heads, rotary),
    cross-attention to the text (plus, for I2V, the image through ``add_k_proj`` /
    ``add_v_proj``), GELU-tanh feed-forward; ``scale_shift_table`` + the time embedding
    give (shift, scale, gate) for the attention and the feed-forward.
  * ``norm_out`` / ``proj_out`` / ``scale_shift_table``, then unpatchify.

Norms, rotary and the modulation run in float32 (as diffusers' ``_keep_in_fp32_modules``
and upcasts do); everything else runs in ``config.dtype``.

Self-attention is split into ``WanAttention.project`` (q, k, v) and ``attend`` (the
softmax), so the SCD rule (docs/wan.md) can replace the attention call alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist_jax import checks
from consist_jax.models.attention import dot_product_attention
from consist_jax.models.unet import TimestepEmbedding, timestep_embedding
from consist_jax.parallel.frames import Axes
from consist_jax.parallel.sequence import gather_tokens, split_tokens

Dtype = Any

QK_NORMS = ("rms_norm_across_heads",)
ROPE_THETA = 10000.0
# diffusers builds the image embedder's LayerNorms with torch's default epsilon.
IMAGE_EMBEDDER_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class WanTransformerConfig:
    """Hyper-parameters of a ``WanTransformer3DModel`` (diffusers' config.json names)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: Optional[int] = None  # I2V: CLIP image-token width (1280); None: T2V
    added_kv_proj_dim: Optional[int] = None  # I2V: the image key/value input width (= inner_dim)
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: Optional[int] = None  # FLF2V: learned positions of two images' tokens
    # Our options (not in diffusers' config).
    remat: bool = False  # rematerialise each block in the backward pass
    dtype: Any = jnp.float32  # compute dtype
    # A mesh axis (or tuple of axes) the tokens of each clip are split over: the hidden
    # states (B, N, D) live split along N, self-attention gathers its keys and values
    # (consist_jax/parallel/sequence.py). None: each clip's tokens stay whole.
    sequence_axis: Optional[Axes] = None

    def __post_init__(self):
        checks.positive_ints("patch_size", self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size={self.patch_size!r}: must be 3 integers (frames, height, width)")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
            checks.positive_int(name, getattr(self, name))
        checks.positive_number("eps", self.eps)
        if self.attention_head_dim % 2 or self.freq_dim % 2:
            raise ValueError(f"attention_head_dim={self.attention_head_dim}, freq_dim={self.freq_dim}: "
                             f"both must be even (rotary pairs, sin/cos halves)")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r}: expected one of {QK_NORMS} (diffusers 0.42.1 "
                             f"always applies RMS q/k norm across heads)")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"image_dim={self.image_dim!r}, added_kv_proj_dim={self.added_kv_proj_dim!r}: "
                             f"an I2V model sets both, a T2V model neither")
        if self.image_dim is not None:
            checks.positive_int("image_dim", self.image_dim)
            if self.added_kv_proj_dim != self.inner_dim:
                raise ValueError(f"added_kv_proj_dim={self.added_kv_proj_dim!r}: must equal num_attention_heads "
                                 f"x attention_head_dim = {self.inner_dim} (it reads the embedded image tokens)")
        axes = (self.sequence_axis,) if isinstance(self.sequence_axis, str) else self.sequence_axis
        if axes is not None and not (isinstance(axes, tuple) and axes and all(isinstance(a, str) and a
                                                                               for a in axes)):
            raise ValueError(f"sequence_axis={self.sequence_axis!r}: expected None, a mesh axis name or a "
                             f"tuple of them")
        if self.pos_embed_seq_len is not None:
            checks.positive_int("pos_embed_seq_len", self.pos_embed_seq_len)
            if self.image_dim is None or self.pos_embed_seq_len % 2:
                raise ValueError(f"pos_embed_seq_len={self.pos_embed_seq_len!r}: needs image_dim and an even "
                                 f"length (the tokens of two images)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head turned by the frame, row and column positions."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "WanTransformerConfig":
        """Builds the config from a diffusers ``config.json`` dict; ``overrides`` set our options."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # diffusers metadata
        ours = {"remat", "dtype", "sequence_axis"}
        known = {f.name for f in dataclasses.fields(cls)} - ours
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel config key(s) {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        kwargs = dict(config)
        if "patch_size" in kwargs:
            if not isinstance(kwargs["patch_size"], (list, tuple)):
                raise ValueError(f"patch_size={kwargs['patch_size']!r}: must be a list of 3 integers")
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        if kwargs.get("out_channels") is None:  # diffusers: out_channels or in_channels
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def wan21_t2v_1_3b(cls, **overrides) -> "WanTransformerConfig":
        """Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json."""
        return cls(num_attention_heads=12, ffn_dim=8960, num_layers=30, **overrides)

    @classmethod
    def wan21_t2v_14b(cls, **overrides) -> "WanTransformerConfig":
        """Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json."""
        return cls(num_attention_heads=40, ffn_dim=13824, num_layers=40, **overrides)


# --------------------------------------------------------------------------- rotary positions


def rotary_angles(config: WanTransformerConfig, grid: Sequence[int],
                  frame_positions: Optional[Sequence[float]] = None) -> np.ndarray:
    """Rotation angles of every token's channel pairs: (N, attention_head_dim / 2) float64.

    grid: (f, h, w) tokens per axis; N = f h w in (frame, row, column) order.
    frame_positions: the f frame positions (default 0 .. f-1); row and column positions
    are 0 .. h-1 and 0 .. w-1. The frame, row and column parts of the head use
    frequencies ``theta^(-2i/d)`` for their own width d (``rope_dims``).
    """
    f, h, w = grid
    frames = np.arange(f) if frame_positions is None else np.asarray(frame_positions, np.float64)
    if frames.shape != (f,):
        raise ValueError(f"frame_positions has shape {frames.shape}; the grid has {f} frames")
    for axis, size in zip(("frames", "height", "width"), grid):
        if size > config.rope_max_seq_len:
            raise ValueError(f"{size} patches along {axis}: rope_max_seq_len={config.rope_max_seq_len} "
                             f"is the most the rotary table covers")
    parts = []
    for positions, dim, axis in zip((frames, np.arange(h), np.arange(w)), config.rope_dims, range(3)):
        freqs = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(np.asarray(positions, np.float64), freqs)  # (size, dim / 2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = len(positions)
        parts.append(np.broadcast_to(angles.reshape(shape), (f, h, w, dim // 2)))
    return np.concatenate(parts, axis=-1).reshape(f * h * w, -1)


def rotary_table(angles: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the angles, float32 (diffusers rounds its float64 table to float32)."""
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Turns channel pairs (2i, 2i+1) of x (B, N, H, D) by the angles of cos/sin (N, D/2), in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    turned = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return turned.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- layers


class FP32LayerNorm(nn.Module):
    """diffusers' FP32LayerNorm over the last axis (two-pass variance): x (..., C) -> float32."""

    epsilon: float
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            channels = x.shape[-1]
            x = x * self.param("scale", nn.initializers.ones, (channels,), jnp.float32).astype(jnp.float32)
            x = x + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(jnp.float32)
        return x


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm over the last axis (all heads together), in float32: x (..., C) -> x.dtype."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.epsilon)
        return (h * scale.astype(jnp.float32)).astype(x.dtype)


class FeedForward(nn.Module):
    """diffusers' FeedForward: ``net.0.proj``, GELU (tanh or exact), ``net.2``: (..., C) -> (..., out)."""

    inner_dim: int
    out_dim: int
    approximate: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.inner_dim, dtype=self.dtype, name="net.0.proj")(x)
        h = nn.gelu(h, approximate=self.approximate)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="net.2")(h)


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Full softmax attention: q (B, Nq, H, D), k/v (B, Nk, H, D) -> (B, Nq, H, D).

    The one call the SCD rule replaces in self-attention (docs/wan.md).
    """
    return dot_product_attention(q, k, v)


class WanAttention(nn.Module):
    """diffusers' WanAttention: self-attention (rotary) or cross-attention (text [+ image]).

    x (B, N, dim), context (B, L, dim) or None (self-attention) -> (B, N, dim).
    """

    dim: int
    heads: int
    eps: float
    added_kv: bool = False  # I2V cross-attention: image keys/values too
    dtype: Dtype = jnp.float32

    def setup(self):
        def dense(name):
            return nn.Dense(self.dim, dtype=self.dtype, name=name)

        self.to_q, self.to_k, self.to_v, self.to_out = dense("to_q"), dense("to_k"), dense("to_v"), dense("to_out.0")
        self.norm_q, self.norm_k = RMSNorm(self.eps, name="norm_q"), RMSNorm(self.eps, name="norm_k")
        if self.added_kv:
            self.add_k_proj, self.add_v_proj = dense("add_k_proj"), dense("add_v_proj")
            self.norm_added_k = RMSNorm(self.eps, name="norm_added_k")

    def heads_of(self, x: jax.Array) -> jax.Array:
        """(B, N, dim) -> (B, N, H, dim / H)."""
        return x.reshape(*x.shape[:-1], self.heads, -1)

    def project(self, x: jax.Array, context: Optional[jax.Array] = None,
                rotary: Optional[tuple[jax.Array, jax.Array]] = None):
        """(q, k, v), each (B, N or L, H, D): q/k RMS-normed across heads, then turned by ``rotary``."""
        source = x if context is None else context
        q = self.heads_of(self.norm_q(self.to_q(x)))
        k = self.heads_of(self.norm_k(self.to_k(source)))
        v = self.heads_of(self.to_v(source))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def project_image(self, image_context: jax.Array):
        """The image tokens' (k, v), each (B, L_img, H, D) (I2V)."""
        k = self.heads_of(self.norm_added_k(self.add_k_proj(image_context)))
        return k, self.heads_of(self.add_v_proj(image_context))

    def output(self, h: jax.Array) -> jax.Array:
        """(B, N, H, D) -> (B, N, dim)."""
        return self.to_out(h.reshape(*h.shape[:2], -1))

    def __call__(self, x, context=None, rotary=None, image_context=None):
        q, k, v = self.project(x, context, rotary)
        h = attend(q, k, v)
        if image_context is not None:
            h = h + attend(q, *self.project_image(image_context))
        return self.output(h)


def modulation(table: jax.Array, temb: jax.Array) -> list[jax.Array]:
    """scale_shift_table (1, n, D) + temb (B, n, D), in float32 -> n vectors (B, 1, D)."""
    mod = table.astype(jnp.float32) + temb.astype(jnp.float32)
    return [mod[:, i:i + 1] for i in range(mod.shape[1])]


def modulate(x: jax.Array, norm: nn.Module, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
    """norm(x) * (1 + scale) + shift in float32, cast to the compute dtype."""
    return (norm(x) * (1 + scale) + shift).astype(dtype)


class BlockLayers(NamedTuple):
    """A Wan block's modules (diffusers' names), made inside the block's compact method."""

    table: jax.Array  # scale_shift_table (1, 6, D)
    norm1: nn.Module
    attn1: WanAttention
    norm2: Optional[nn.Module]
    attn2: WanAttention
    norm3: nn.Module
    ffn: FeedForward


def block_layers(block: nn.Module, c: WanTransformerConfig, added_kv: bool) -> BlockLayers:
    """The modules of ``block`` (call from its ``nn.compact`` method)."""
    dim, heads = c.inner_dim, c.num_attention_heads
    return BlockLayers(
        block.param("scale_shift_table", nn.initializers.normal(dim ** -0.5), (1, 6, dim), jnp.float32),
        FP32LayerNorm(c.eps, name="norm1"),
        WanAttention(dim, heads, c.eps, dtype=c.dtype, name="attn1"),
        FP32LayerNorm(c.eps, affine=True, name="norm2") if c.cross_attn_norm else None,
        WanAttention(dim, heads, c.eps, added_kv, c.dtype, name="attn2"),
        FP32LayerNorm(c.eps, name="norm3"),
        FeedForward(c.ffn_dim, dim, dtype=c.dtype, name="ffn"))


def self_attention_inputs(layers: BlockLayers, x: jax.Array, mods, rotary, dtype: Dtype,
                          sequence_axis: Optional[Axes] = None):
    """The self-attention's (q, k, v), each (B, N, H, D), of the modulated ``x`` (B, N, D).

    With a ``sequence_axis`` the queries keep the tokens' split, keys and values are whole.
    """
    q, k, v = layers.attn1.project(modulate(x, layers.norm1, mods[0], mods[1], dtype), rotary=rotary)
    return q, gather_tokens(k, sequence_axis), gather_tokens(v, sequence_axis)


def block_rest(layers: BlockLayers, x: jax.Array, attended: jax.Array, mods, context: jax.Array,
               dtype: Dtype, image_context: Optional[jax.Array] = None,
               sequence_axis: Optional[Axes] = None) -> jax.Array:
    """After self-attention (attended (B, N, H, D)): its gated residual, cross-attention and
    the modulated feed-forward -> (B, N, D), split along N over ``sequence_axis``."""
    _, _, gate, c_shift, c_scale, c_gate = mods
    x = (x.astype(jnp.float32) + layers.attn1.output(attended) * gate).astype(dtype)
    h = layers.norm2(x).astype(dtype) if layers.norm2 is not None else x
    x = x + layers.attn2(h, context, image_context=image_context)
    h = layers.ffn(modulate(x, layers.norm3, c_shift, c_scale, dtype))
    return split_tokens((x.astype(jnp.float32) + h.astype(jnp.float32) * c_gate).astype(dtype), sequence_axis)


class WanBlock(nn.Module):
    """diffusers' WanTransformerBlock: x (B, N, D), context (B, L, D), temb6 (B, 6, D) -> (B, N, D)."""

    config: WanTransformerConfig

    @nn.compact
    def __call__(self, x, context, temb6, rotary, image_context=None):
        c = self.config
        layers = block_layers(self, c, added_kv=c.image_dim is not None)
        mods = modulation(layers.table, temb6)
        attended = attend(*self_attention_inputs(layers, x, mods, rotary, c.dtype, c.sequence_axis))
        return block_rest(layers, x, attended, mods, context, c.dtype, image_context, c.sequence_axis)


class ImageEmbedding(nn.Module):
    """diffusers' WanImageEmbedding: (B', L_img, image_dim) -> (B, L', D).

    With ``pos_embed_seq_len`` (FLF2V), consecutive pairs of images join into one sequence
    of ``2 L_img`` tokens (B = B' / 2) and get learned positions.
    """

    config: WanTransformerConfig

    @nn.compact
    def __call__(self, image_context: jax.Array) -> jax.Array:
        c = self.config
        x = image_context
        if c.pos_embed_seq_len is not None:
            n, length, width = x.shape
            if n % 2 or 2 * length != c.pos_embed_seq_len:
                raise ValueError(f"image_context of shape {x.shape}: pos_embed_seq_len={c.pos_embed_seq_len} "
                                 f"needs pairs of images of {c.pos_embed_seq_len // 2} tokens each")
            pos = self.param("pos_embed", nn.initializers.zeros, (1, c.pos_embed_seq_len, width), jnp.float32)
            x = x.reshape(n // 2, 2 * length, width) + pos.astype(x.dtype)
        x = FP32LayerNorm(IMAGE_EMBEDDER_EPS, affine=True, name="norm1")(x).astype(c.dtype)
        x = FeedForward(c.image_dim, c.inner_dim, approximate=False, dtype=c.dtype, name="ff")(x)
        return FP32LayerNorm(IMAGE_EMBEDDER_EPS, affine=True, name="norm2")(x).astype(c.dtype)


class TextProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: linear_1, GELU-tanh, linear_2."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.gelu(h, approximate=True))


class ConditionEmbedder(nn.Module):
    """diffusers' WanTimeTextImageEmbedding.

    timesteps (B,), context (B, L, text_dim) [, image_context] ->
    temb (B, D), temb6 (B, 6, D), context (B, L, D), image_context (B, L_img, D) or None.
    """

    config: WanTransformerConfig

    @nn.compact
    def __call__(self, timesteps, context, image_context=None):
        c = self.config
        sinusoids = timestep_embedding(timesteps, c.freq_dim, flip_sin_to_cos=True, freq_shift=0)
        # The time embedder stays in float32 (diffusers' _keep_in_fp32_modules).
        temb = TimestepEmbedding(c.inner_dim, jnp.float32, name="time_embedder")(sinusoids).astype(c.dtype)
        temb6 = nn.Dense(6 * c.inner_dim, dtype=c.dtype, name="time_proj")(nn.silu(temb))
        text = TextProjection(c.inner_dim, c.dtype, name="text_embedder")(context)
        if image_context is not None:
            image_context = ImageEmbedding(c, name="image_embedder")(image_context)
        return temb, temb6.reshape(-1, 6, c.inner_dim), text, image_context


# --------------------------------------------------------------------------- the model


def patch_grid(config: WanTransformerConfig, shape: Sequence[int]) -> tuple[int, int, int]:
    """Tokens per axis (f, h, w) of a latent (B, F, H, W, C); each axis must divide by the patch."""
    if len(shape) != 5 or shape[-1] != config.in_channels:
        raise ValueError(f"sample of shape {tuple(shape)}: expected (B, F, H, W, {config.in_channels})")
    for axis, size, p in zip(("F", "H", "W"), shape[1:4], config.patch_size):
        if size % p:
            raise ValueError(f"sample of shape {tuple(shape)}: {axis}={size} is not a multiple of "
                             f"patch_size {config.patch_size}")
    return tuple(s // p for s, p in zip(shape[1:4], config.patch_size))


def unpatchify(x: jax.Array, grid: Sequence[int], patch_size: Sequence[int]) -> jax.Array:
    """(B, f h w, pt ph pw C) tokens -> (B, f pt, h ph, w pw, C)."""
    (f, h, w), (pt, ph, pw) = grid, patch_size
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(x.shape[0], f * pt, h * ph, w * pw, -1)


class WanTransformer(nn.Module):
    """Wan2.1 denoiser: sample (B, F, H, W, C_in), timesteps (B,), context (B, L, text_dim)
    [, image_context (B, L_img, image_dim)] -> (B, F, H, W, C_out)."""

    config: WanTransformerConfig

    @nn.compact
    def __call__(self, sample, timesteps, context, image_context=None):
        c = self.config
        grid = patch_grid(c, sample.shape)
        if timesteps.shape != (sample.shape[0],):
            raise ValueError(f"timesteps of shape {timesteps.shape}: expected ({sample.shape[0]},), one per clip")
        if (image_context is None) != (c.image_dim is None):
            raise ValueError(f"image_context is {'missing' if image_context is None else 'given'}: an I2V "
                             f"model (image_dim set) needs it, a T2V model takes none (image_dim={c.image_dim})")
        rotary = rotary_table(rotary_angles(c, grid))
        x = nn.Conv(c.inner_dim, c.patch_size, strides=c.patch_size, padding="VALID", dtype=c.dtype,
                    name="patch_embedding")(sample.astype(c.dtype))
        x = split_tokens(x.reshape(x.shape[0], -1, c.inner_dim), c.sequence_axis)
        temb, temb6, context, image_context = ConditionEmbedder(c, name="condition_embedder")(
            timesteps, context, image_context)
        block_cls = nn.remat(WanBlock) if c.remat else WanBlock
        for i in range(c.num_layers):
            x = block_cls(c, name=f"blocks.{i}")(x, context, temb6, rotary, image_context)
        table = self.param("scale_shift_table", nn.initializers.normal(c.inner_dim ** -0.5),
                           (1, 2, c.inner_dim), jnp.float32)
        shift, scale = modulation(table, temb[:, None])
        x = modulate(x, FP32LayerNorm(c.eps, name="norm_out"), shift, scale, c.dtype)
        x = nn.Dense(c.out_channels * math.prod(c.patch_size), dtype=c.dtype, name="proj_out")(x)
        return unpatchify(x, grid, c.patch_size)
