"""The Wan2.1 video VAE (diffusers' ``AutoencoderKLWan``) in Flax, channels-last.

Videos are (B, F, H, W, C) in [-1, 1] with F = 1 + 4k frames; latents are
(B, 1 + k, H/8, W/8, z_dim): the first frame is encoded on its own (an image is a
one-frame clip), every later group of 4 frames becomes one latent frame.

Causality. Every 3D convolution pads only the past side in time (``CausalConv3d``), so
an output frame never depends on a later input frame. That is what lets diffusers encode
the first frame alone, then chunks of 4 frames, and decode one latent frame at a time,
carrying each convolution's last input frames from chunk to chunk (its ``feat_cache``).
Here that cache is explicit state: every layer maps ``(x, cache) -> (y, new_cache)``,
where ``cache`` is a pytree of the layer's last input frames and ``None`` means "this
chunk starts the clip" (zero padding, and the first-frame rules below). So:

  * whole clip:  ``module.apply(params, video, None, method=encode_chunk)``;
  * chunked:     the first chunk with ``None``, then ``jax.lax.scan`` over equal chunks
    carrying the cache (``encode`` / ``decode`` below). Memory is that of one chunk.

Both give the same numbers (the convolutions sum the same terms). diffusers itself only
has the chunked path (its ``feat_cache=None`` path skips the temporal resampling), and
that is the path the tests compare against.

The temporal resamplers treat a clip's first frame specially, exactly as diffusers does:
  * ``downsample3d``: frame 0 passes through; later frames are a stride-2, unpadded time
    convolution over the whole clip (frames 0-2, 2-4, ...): 1 + 2k frames -> 1 + k.
  * ``upsample3d``: frame 0 passes through (diffusers' "Rep" cache); every later frame
    becomes two through a causal time convolution that starts at frame 1 (zero past).

Parameter names mirror diffusers' modules (``decoder.up_blocks.1.upsamplers.0.time_conv``),
so ``consist_jax.convert.loading`` maps a ``diffusion_pytorch_model.safetensors`` onto them
without a table; norm scales keep the file's (C, 1, 1[, 1]) shape.

Latent statistics. Wan's diffusion model works on ``(z - latents_mean) / latents_std``
per channel; the 16 + 16 constants live in the VAE's ``config.json`` (diffusers' defaults
are the Wan2.1 values, ``WAN21_LATENTS_MEAN`` / ``WAN21_LATENTS_STD`` here) and diffusers'
Wan pipelines apply them outside the VAE, as ``scale_latents`` / ``unscale_latents`` do.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax import checks
from consist_jax.models.attention import dot_product_attention
from consist_jax.models.vae import DiagonalGaussian, check_images

Dtype = Any
Cache = Any  # a pytree of arrays (B, frames, h, w, c), or None at the start of a clip

# diffusers' AutoencoderKLWan defaults: the Wan2.1 VAE's per-channel latent statistics.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# diffusers encodes the first frame alone, then this many frames per chunk.
ENCODE_CHUNK_FRAMES = 4
# torch.nn.functional.normalize's floor on the norm.
_NORMALIZE_EPS = 1e-12


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Hyper-parameters of an ``AutoencoderKLWan`` (diffusers names; "temperal" sic).

    Defaults: Wan2.1's VAE. ``temperal_downsample[i]`` says whether level i halves time
    (the decoder mirrors it); ``dtype`` is the compute dtype.
    """

    base_dim: int = 96
    decoder_base_dim: Optional[int] = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            checks.positive_int(name, getattr(self, name))
        if self.decoder_base_dim is not None:
            checks.positive_int("decoder_base_dim", self.decoder_base_dim)
        checks.positive_ints("dim_mult", self.dim_mult)
        levels = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != levels or not all(
                isinstance(v, bool) for v in self.temperal_downsample):
            raise ValueError(f"temperal_downsample={list(self.temperal_downsample)}: must be {levels} "
                             f"booleans (one per downsampling level of dim_mult={list(self.dim_mult)})")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim:
                raise ValueError(f"{name} has {len(values)} values; must have z_dim={self.z_dim}")
            for i, v in enumerate(values):
                (checks.positive_number if name == "latents_std" else checks.finite_number)(f"{name}[{i}]", v)
        if ENCODE_CHUNK_FRAMES % self.temporal_factor:
            raise ValueError(f"temperal_downsample={list(self.temperal_downsample)} compresses time "
                             f"{self.temporal_factor}x; chunks of {ENCODE_CHUNK_FRAMES} frames need 1, 2 or 4x")

    @property
    def spatial_factor(self) -> int:
        """Video size / latent size (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "WanVAEConfig":
        """Builds the config from an ``AutoencoderKLWan`` ``config.json`` dict, rejecting
        what we do not implement (Wan2.2's residual layout and patching)."""
        class_name = config.get("_class_name", "AutoencoderKLWan")
        if class_name != "AutoencoderKLWan":
            raise ValueError(f"VAE config is for {class_name!r}; load_wan_vae reads 'AutoencoderKLWan'")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
        if unknown:
            raise ValueError(f"unsupported AutoencoderKLWan config key(s) {unknown}")
        # attn_scales: diffusers' encoder passes its cache to every down block, which its
        # attention block does not accept, so only [] runs there (and in Wan2.1).
        for key, supported in (("is_residual", False), ("patch_size", None), ("dropout", 0.0),
                               ("attn_scales", [])):
            if config.get(key, supported) != supported:
                raise ValueError(f"AutoencoderKLWan {key}={config[key]!r} is not supported "
                                 f"(only {supported!r}: the Wan2.1 layout)")
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        for key in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        kwargs.update(overrides)
        made = cls(**kwargs)
        for key, value in (("scale_factor_spatial", made.spatial_factor),
                           ("scale_factor_temporal", made.temporal_factor)):
            if config.get(key) not in (None, value):
                raise ValueError(f"AutoencoderKLWan {key}={config[key]!r} disagrees with the "
                                 f"layers (dim_mult and temperal_downsample give {value})")
        return made


# Every key diffusers' AutoencoderKLWan.__init__ takes.
_DIFFUSERS_KEYS = {
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
    "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual",
    "in_channels", "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial",
}


# --------------------------------------------------------------------------- layers


def _sub(cache: Cache, name: str) -> Cache:
    """A child's cache (None at the start of a clip)."""
    return None if cache is None else cache[name]


class CausalConv3d(nn.Module):
    """diffusers' ``WanCausalConv3d``: x (B, F, H, W, Cin) -> (B, F', H', W', features).

    ``padding`` is torch's (t, h, w); the 2 t frames of time padding all go on the past
    side. With a cache, those frames are the previous chunk's last input frames instead
    of zeros. Returns ``(y, new_cache)``; the new cache (the last 2 t input frames, zeros
    included) is None for a convolution without time padding.
    """

    features: int
    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Optional[jax.Array] = None):
        past = 2 * self.padding[0]
        new_cache = None
        if past:
            if cache is None:
                cache = jnp.zeros((x.shape[0], past, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
            new_cache = x[:, -past:]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        _, ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
            padding=((0, 0), (ph, ph), (pw, pw)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias.astype(self.dtype), new_cache


def causal_conv3x3(features: int, name: str, dtype: Dtype) -> CausalConv3d:
    return CausalConv3d(features, (3, 3, 3), padding=(1, 1, 1), dtype=dtype, name=name)


class RMSNorm(nn.Module):
    """diffusers' ``WanRMS_norm`` over channels: x / ||x|| * sqrt(C) * gamma, same shape.

    ``gamma`` keeps the file's shape: (C, 1, 1, 1), or (C, 1, 1) for ``images``.
    """

    images: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        shape = (c, 1, 1) if self.images else (c, 1, 1, 1)
        gamma = self.param("gamma", nn.initializers.ones, shape, jnp.float32).reshape(c)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        return (x32 / jnp.maximum(norm, _NORMALIZE_EPS) * (c ** 0.5) * gamma).astype(self.dtype)


class ResidualBlock(nn.Module):
    """norm, SiLU, causal 3x3x3 conv, twice, plus a (1x1x1 conv) shortcut."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        h = x
        if x.shape[-1] != self.features:
            h, _ = CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        new = {}
        x = nn.silu(RMSNorm(dtype=self.dtype, name="norm1")(x))
        x, new["conv1"] = causal_conv3x3(self.features, "conv1", self.dtype)(x, _sub(cache, "conv1"))
        x = nn.silu(RMSNorm(dtype=self.dtype, name="norm2")(x))
        x, new["conv2"] = causal_conv3x3(self.features, "conv2", self.dtype)(x, _sub(cache, "conv2"))
        return x + h, new


class AttentionBlock(nn.Module):
    """One-head self-attention over each frame's h*w positions, residual (the mid
    blocks'). No cache: each frame on its own."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(
            RMSNorm(images=True, dtype=self.dtype, name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(b * f, h * w, 1, 3 * c), 3, axis=-1)
        out = dot_product_attention(q, k, v, upcast=True).reshape(b, f, h, w, c)
        return x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj")(out)


class MidBlock(nn.Module):
    """resnet, attention, resnet at constant width."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        c, new = x.shape[-1], {}
        x, new["resnets.0"] = ResidualBlock(c, self.dtype, name="resnets.0")(x, _sub(cache, "resnets.0"))
        x = AttentionBlock(self.dtype, name="attentions.0")(x)
        x, new["resnets.1"] = ResidualBlock(c, self.dtype, name="resnets.1")(x, _sub(cache, "resnets.1"))
        return x, new


def _interleave_pairs(y: jax.Array) -> jax.Array:
    """(B, T, H, W, 2C) -> (B, 2T, H, W, C): channels [:C] are the first of each pair."""
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)


class Resample(nn.Module):
    """diffusers' ``WanResample``: x (B, F, H, W, C) -> spatial x2 or /2, time per ``mode``.

    mode: upsample2d | upsample3d (H, W x2 to ``features`` channels; 3d also doubles every
    frame but a clip's first) or downsample2d | downsample3d (H, W /2; 3d also halves the
    frames after the first). See the module docstring for the first-frame rules.
    """

    mode: str
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        new = {}
        if self.mode == "upsample3d":
            x, new["time_conv"] = self._upsample_time(x, _sub(cache, "time_conv"))
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact, x2
            x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="resample.1")(x)
        else:  # ZeroPad2d((0, 1, 0, 1)), then a stride-2 3x3 conv
            x = nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                        dtype=self.dtype, name="resample.1")(x)
        if self.mode == "downsample3d":
            x, new["time_conv"] = self._downsample_time(x, _sub(cache, "time_conv"))
        return x, new

    def _upsample_time(self, x: jax.Array, cache: Cache):
        """Frame 0 of a clip passes through; every later frame becomes two."""
        conv = CausalConv3d(2 * x.shape[-1], (3, 1, 1), padding=(1, 0, 0), dtype=self.dtype, name="time_conv")
        head = x[:, :1] if cache is None else x[:, :0]
        x = x[:, head.shape[1]:]
        if not x.shape[1]:  # a one-frame first chunk: the next chunk starts from zeros
            return head, jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
        y, cache = conv(x, cache)
        return jnp.concatenate([head, _interleave_pairs(y).astype(head.dtype)], axis=1), cache

    def _downsample_time(self, x: jax.Array, cache: Cache):
        """Frame 0 of a clip passes through; then a stride-2 unpadded conv over frames
        (0, 1, 2), (2, 3, 4), ... of the clip (the cache holds the frame before x)."""
        conv = CausalConv3d(x.shape[-1], (3, 1, 1), strides=(2, 1, 1), dtype=self.dtype, name="time_conv")
        head, frames = (x[:, :1], x) if cache is None else (x[:, :0], jnp.concatenate([cache, x], axis=1))
        if frames.shape[1] >= 3:
            y, _ = conv(frames)
            head = jnp.concatenate([head, y.astype(head.dtype)], axis=1)
        return head, x[:, -1:]


class Encoder3d(nn.Module):
    """video (B, 1 + 4k, H, W, Cin) -> moments (B, 1 + k, H/8, W/8, 2 z_dim)."""

    config: WanVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        cfg, dt = self.config, self.config.dtype
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        new = {}
        x, new["conv_in"] = causal_conv3x3(dims[0], "conv_in", dt)(x, _sub(cache, "conv_in"))
        for name, layer in self._down_layers(dims):
            x, new[name] = layer(x, _sub(cache, name))
        x, new["mid_block"] = MidBlock(dt, name="mid_block")(x, _sub(cache, "mid_block"))
        x = nn.silu(RMSNorm(dtype=dt, name="norm_out")(x))
        x, new["conv_out"] = causal_conv3x3(2 * cfg.z_dim, "conv_out", dt)(x, _sub(cache, "conv_out"))
        return x, new

    def _down_layers(self, dims):
        """diffusers' flat ``down_blocks`` list: each level's resnets, then a resampler."""
        cfg, dt = self.config, self.config.dtype
        layers = []
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(out_dim, dt, name=f"down_blocks.{len(layers)}"))
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                layers.append(Resample(mode, out_dim, dt, name=f"down_blocks.{len(layers)}"))
        return [(layer.name, layer) for layer in layers]


class UpBlock(nn.Module):
    """num_res_blocks + 1 resnets, then an optional resampler (to half the channels)."""

    features: int
    num_resnets: int
    upsample_mode: Optional[str]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        new = {}
        for j in range(self.num_resnets):
            name = f"resnets.{j}"
            x, new[name] = ResidualBlock(self.features, self.dtype, name=name)(x, _sub(cache, name))
        if self.upsample_mode is not None:
            resample = Resample(self.upsample_mode, self.features // 2, self.dtype, name="upsamplers.0")
            x, new["upsamplers.0"] = resample(x, _sub(cache, "upsamplers.0"))
        return x, new


class Decoder3d(nn.Module):
    """z (B, 1 + k, h, w, z_dim) -> video (B, 1 + 4k, 8h, 8w, Cout), not clipped."""

    config: WanVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        cfg, dt = self.config, self.config.dtype
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        upsample = cfg.temperal_downsample[::-1]
        new = {}
        x, new["conv_in"] = causal_conv3x3(dims[0], "conv_in", dt)(x, _sub(cache, "conv_in"))
        x, new["mid_block"] = MidBlock(dt, name="mid_block")(x, _sub(cache, "mid_block"))
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if upsample[i] else "upsample2d"
            name = f"up_blocks.{i}"
            block = UpBlock(out_dim, cfg.num_res_blocks + 1, mode, dt, name=name)
            x, new[name] = block(x, _sub(cache, name))
        x = nn.silu(RMSNorm(dtype=dt, name="norm_out")(x))
        x, new["conv_out"] = causal_conv3x3(cfg.out_channels, "conv_out", dt)(x, _sub(cache, "conv_out"))
        return x, new


class AutoencoderKLWan(nn.Module):
    """The Wan VAE. ``encode_chunk`` / ``decode_chunk`` map one chunk and its cache (None:
    the chunk starts the clip, which may be the whole clip); the functions below chunk."""

    config: WanVAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder3d(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)
        self.decoder = Decoder3d(cfg)

    def encode_chunk(self, video: jax.Array, cache: Cache = None):
        """video (B, n, H, W, Cin) -> (moments (B, n', H/8, W/8, 2 z_dim), cache)."""
        x, cache = self.encoder(video, cache)
        return self.quant_conv(x)[0], cache

    def decode_chunk(self, z: jax.Array, cache: Cache = None):
        """z (B, n, h, w, z_dim) unscaled -> (video (B, n', 8h, 8w, Cout) not clipped, cache)."""
        return self.decoder(self.post_quant_conv(z)[0], cache)

    def __call__(self, video: jax.Array) -> jax.Array:
        """The whole-clip round trip through the posterior mean (creates every parameter)."""
        moments, _ = self.encode_chunk(video)
        return self.decode_chunk(DiagonalGaussian.from_moments(moments).mode())[0]


# --------------------------------------------------------------------------- functions


def check_video(config: WanVAEConfig, video: Any, name: str = "video") -> None:
    """Raises unless ``video`` is (B, 1 + 4k, H, W, in_channels) floats in [-1, 1]."""
    shape = tuple(video.shape)
    if len(shape) != 5 or shape[-1] != config.in_channels or (shape[1] - 1) % ENCODE_CHUNK_FRAMES:
        raise ValueError(f"{name}: expected shape (B, 1 + 4k frames, H, W, {config.in_channels}), "
                         f"got {shape}")
    check_images(video, name)


def _check_latents(config: WanVAEConfig, z: Any) -> None:
    shape = tuple(z.shape)
    if len(shape) != 5 or shape[1] < 1 or shape[-1] != config.z_dim:
        raise ValueError(f"latents: expected shape (B, F, h, w, {config.z_dim}), got {shape}")


def _frames_first(x: jax.Array, chunk: int) -> jax.Array:
    """(B, n * chunk, ...) -> (n, B, chunk, ...): the chunks as a scan axis."""
    b, f = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, f // chunk, chunk, *x.shape[2:]), 1, 0)


def _frames_back(ys: jax.Array) -> jax.Array:
    """(n, B, m, ...) -> (B, n * m, ...)."""
    n, b, m = ys.shape[:3]
    return jnp.moveaxis(ys, 0, 1).reshape(b, n * m, *ys.shape[3:])


def _scan_chunks(apply, x: jax.Array, first_frames: int, chunk: int) -> jax.Array:
    """``apply(chunk, cache) -> (out, cache)`` over x's frames: the first ``first_frames``
    alone (cache None), then ``lax.scan`` over equal chunks carrying the cache."""
    out, cache = apply(x[:, :first_frames], None)
    if x.shape[1] == first_frames:
        return out

    def step(cache, frames):
        y, cache = apply(frames, cache)
        return cache, y

    _, ys = jax.lax.scan(step, cache, _frames_first(x[:, first_frames:], chunk))
    return jnp.concatenate([out, _frames_back(ys)], axis=1)


@functools.partial(jax.jit, static_argnames=("module", "chunked"))
def _encode_moments(module: AutoencoderKLWan, params: dict, video: jax.Array, chunked: bool) -> jax.Array:
    apply = functools.partial(module.apply, {"params": params}, method=AutoencoderKLWan.encode_chunk)
    if not chunked:
        return apply(video)[0]
    return _scan_chunks(apply, video, 1, ENCODE_CHUNK_FRAMES)


@functools.partial(jax.jit, static_argnames=("module", "chunked"))
def _decode(module: AutoencoderKLWan, params: dict, z: jax.Array, chunked: bool) -> jax.Array:
    apply = functools.partial(module.apply, {"params": params}, method=AutoencoderKLWan.decode_chunk)
    video = _scan_chunks(apply, z, 1, 1) if chunked else apply(z)[0]
    return jnp.clip(video, -1.0, 1.0)


def encode(module: AutoencoderKLWan, params: dict, video: jax.Array, *, chunked: bool = True) -> DiagonalGaussian:
    """video (B, 1 + 4k, H, W, C) in [-1, 1] -> the posterior over (B, 1 + k, H/8, W/8, z_dim).

    ``chunked``: diffusers' way (the first frame, then 4 frames at a time, a scan carrying
    the causal cache: the activations of one chunk at a time); else the whole clip at once.
    """
    check_video(module.config, video)
    return DiagonalGaussian.from_moments(_encode_moments(module, params, video, chunked))


def decode(module: AutoencoderKLWan, params: dict, z: jax.Array, *, chunked: bool = True) -> jax.Array:
    """unscaled z (B, 1 + k, h, w, z_dim) -> video (B, 1 + 4k, 8h, 8w, C) clipped to [-1, 1].

    ``chunked``: one latent frame at a time (a scan carrying the cache), as diffusers
    decodes; else the whole clip at once (same values, memory growing with the clip).
    """
    _check_latents(module.config, z)
    return _decode(module, params, z, chunked)


def _latent_stats(config: WanVAEConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """(mean, 1 / std) per channel, as diffusers' Wan pipelines build them."""
    mean = jnp.asarray(config.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(config.latents_std, jnp.float32)
    return mean.astype(dtype), inv_std.astype(dtype)


def scale_latents(config: WanVAEConfig, z: jax.Array) -> jax.Array:
    """Posterior latents (..., z_dim) -> the diffusion model's: (z - mean) / std."""
    mean, inv_std = _latent_stats(config, z.dtype)
    return (z - mean) * inv_std


def unscale_latents(config: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """The inverse of ``scale_latents`` (diffusers: ``latents / (1 / std) + mean``)."""
    mean, inv_std = _latent_stats(config, latents.dtype)
    return latents / inv_std + mean


def encode_latents(module: AutoencoderKLWan, params: dict, video: jax.Array,
                   rng: Optional[jax.Array] = None) -> jax.Array:
    """video (B, 1 + 4k, H, W, C) in [-1, 1] -> scaled latents (B, 1 + k, H/8, W/8, z_dim):
    the posterior mean when ``rng`` is None, else a sample; chunked."""
    posterior = encode(module, params, video)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return scale_latents(module.config, z)


def decode_latents(module: AutoencoderKLWan, params: dict, latents: jax.Array) -> jax.Array:
    """scaled latents (B, 1 + k, h, w, z_dim) -> video (B, 1 + 4k, 8h, 8w, C) in [-1, 1]; chunked."""
    return decode(module, params, unscale_latents(module.config, latents))
