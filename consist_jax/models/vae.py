"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``, SD-1.x layout) in Flax.

Images are NHWC in [-1, 1]; latents are NHWC with ``latent_channels`` channels at
``1 / downsample_factor`` of the image size (8 for SD: 512x512x3 <-> 64x64x4).

Parameter names mirror diffusers' module names (``encoder.down_blocks.0.resnets.1.conv1``),
so ``consist_jax.convert.vae.load_vae`` maps a ``diffusion_pytorch_model.safetensors``
file onto them without a table.

Public API:
  * ``consist_jax.convert.vae.load_vae(folder, dtype) -> (AutoencoderKL, params)``
  * ``encode_latents(module, params, images, rng=None)``: images -> scaled latents
  * ``decode_latents(module, params, latents)``: scaled latents -> images
  * ``encode_frames`` / ``decode_frames``: the same over ``(B, F, ...)`` video frames,
    computed ``chunk_size`` frames at a time so the activations of a long clip never
    coexist.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax import checks
from consist_jax.models.attention import dot_product_attention
from consist_jax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv3x3
from consist_jax.parallel.batch import constrain_leading, leading_split

Dtype = Any

# diffusers builds every VAE norm with this epsilon (not GroupNorm's 1e-5 default).
VAE_NORM_EPS = 1e-6

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of an ``AutoencoderKL`` (diffusers names). Defaults: SD-1.x.

    force_upcast is informational (diffusers runs such a VAE in float32 inside fp16
    pipelines); ``dtype`` is the compute dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            checks.positive_int(name, getattr(self, name))
        checks.positive_ints("block_out_channels", self.block_out_channels)
        checks.positive_number("scaling_factor", self.scaling_factor)
        if self.shift_factor is not None:
            checks.finite_number("shift_factor", self.shift_factor)
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"VAE block_out_channels {self.block_out_channels} must be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "VAEConfig":
        """Builds the config from a diffusers ``config.json`` dict, rejecting what we lack.

        Keys absent from ``config`` take diffusers' defaults (old configs lack newer keys).
        """
        _check_diffusers_vae_config(config)
        present = {**_DIFFUSERS_DEFAULTS, **config}
        kwargs = {f.name: present[f.name] for f in dataclasses.fields(cls) if f.name in present}
        kwargs["block_out_channels"] = checks.positive_ints("block_out_channels", kwargs["block_out_channels"])
        kwargs.update(overrides)
        return cls(**kwargs)


# diffusers' AutoencoderKL.__init__ defaults, for keys an older config.json lacks.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys read but not stored (sample_size only sizes diffusers' tiling).
_ACCEPTED_ONLY = {
    "down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std", "sample_size"
}


def _check_diffusers_vae_config(config: dict) -> None:
    """Raises ValueError naming the first option of ``config`` we do not implement."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"VAE config is for {class_name!r}; only diffusers' 'AutoencoderKL' is supported")
    known = set(_DIFFUSERS_DEFAULTS) | _ACCEPTED_ONLY
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unsupported AutoencoderKL config key(s) {unknown}")
    n = len(config.get("block_out_channels", _DIFFUSERS_DEFAULTS["block_out_channels"]))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, (block,) * n))
        if types != [block] * n:
            raise ValueError(f"VAE {key}={types} not supported: expected {n} x {block!r}")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"VAE act_fn={config['act_fn']!r} not supported (only 'silu')")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(f"VAE {key} is not supported (per-channel latent statistics); SD VAEs have None")


# --------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance, each (N, h, w, latent_channels)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments (N, h, w, 2L): the first L channels are the mean (torch.chunk order)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # Clamped as diffusers does, so exp() stays finite for untrained encoders.
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per image: (N,)."""
        return 0.5 * jnp.sum(
            jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3)
        )


# --------------------------------------------------------------------------- blocks


class VAEAttention(nn.Module):
    """The mid-block spatial self-attention: one head over all channels, residual.

    x (N, h, w, C) -> (N, h, w, C). GroupNorm, then to_q/to_k/to_v (with bias) over
    the h*w tokens, to_out.0, plus the input.
    """

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        tokens = GroupNorm(self.groups, VAE_NORM_EPS, self.dtype, name="group_norm")(x)
        tokens = tokens.reshape(n, h * w, c)

        def project(name):
            return nn.Dense(c, dtype=self.dtype, name=name)(tokens).reshape(n, h * w, 1, c)

        # diffusers upcasts this softmax; the scores of 4096 tokens overflow fp16.
        out = dot_product_attention(project("to_q"), project("to_k"), project("to_v"), upcast=True)
        out = nn.Dense(c, dtype=self.dtype, name="to_out.0")(out.reshape(n, h * w, c))
        return x + out.reshape(n, h, w, c)


class MidBlock(nn.Module):
    """resnet, attention (optional), resnet at constant width: (N, h, w, C) -> same."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = self._resnet(channels, 0)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions.0")(x)
        return self._resnet(channels, 1)(x)

    def _resnet(self, channels: int, index: int) -> ResnetBlock2D:
        return ResnetBlock2D(
            channels, self.groups, VAE_NORM_EPS, dtype=self.dtype, name=f"resnets.{index}"
        )


class DownEncoderBlock(nn.Module):
    """``num_layers`` resnets then an optional stride-2 conv (padded right/bottom).

    x (N, h, w, C_in) -> (N, h/2, w/2, out_channels) (or (N, h, w, ...) without downsampling).
    """

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, VAE_NORM_EPS, dtype=self.dtype, name=f"resnets.{i}"
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers.0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """``num_layers`` resnets then an optional nearest 2x upsample + conv.

    x (N, h, w, C_in) -> (N, 2h, 2w, out_channels) (or (N, h, w, ...) without upsampling).
    """

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, VAE_NORM_EPS, dtype=self.dtype, name=f"resnets.{i}"
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers.0")(x)
        return x


class Encoder(nn.Module):
    """images (N, H, W, in_channels) -> moments (N, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = self.config, self.config.dtype
        x = conv3x3(c.block_out_channels[0], "conv_in", dtype)(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            x = DownEncoderBlock(
                channels, c.layers_per_block, c.norm_num_groups, i < last, dtype, name=f"down_blocks.{i}"
            )(x)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, dtype, name="mid_block")(x)
        x = GroupNorm(c.norm_num_groups, VAE_NORM_EPS, dtype, name="conv_norm_out")(x)
        return conv3x3(2 * c.latent_channels, "conv_out", dtype)(nn.silu(x))


class Decoder(nn.Module):
    """latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels) (unclipped)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c, dtype = self.config, self.config.dtype
        widths = tuple(reversed(c.block_out_channels))
        x = conv3x3(widths[0], "conv_in", dtype)(z)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, dtype, name="mid_block")(x)
        for i, channels in enumerate(widths):
            # One resnet more than the encoder per block, as in diffusers.
            x = UpDecoderBlock(
                channels,
                c.layers_per_block + 1,
                c.norm_num_groups,
                i < len(widths) - 1,
                dtype,
                name=f"up_blocks.{i}",
            )(x)
        x = GroupNorm(c.norm_num_groups, VAE_NORM_EPS, dtype, name="conv_norm_out")(x)
        return conv3x3(c.out_channels, "conv_out", dtype)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``. Methods (use ``module.apply(..., method=...)``):

    * ``encode(images (N, H, W, 3)) -> DiagonalGaussian`` over (N, H/f, W/f, L)
    * ``decode(z (N, h, w, L)) -> (N, h*f, w*f, 3)``, unscaled latents, unclipped output
    * ``__call__(images, rng=None)``: reconstruction through the mode (or a sample)
    """

    config: VAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), padding="VALID", dtype=c.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), padding="VALID", dtype=c.dtype)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(images.astype(self.config.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.config.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        posterior = self.encode(images)
        return self.decode(posterior.mode() if rng is None else posterior.sample(rng))


# --------------------------------------------------------------------------- loading


def vae_param_shapes(config: VAEConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation)."""
    size = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda r, x: AutoencoderKL(config).init(r, x)["params"], jax.random.key(0), images)


# --------------------------------------------------------------------------- helpers

# Image values may overshoot [-1, 1] by this much (resampling, float rounding).
_RANGE_SLACK = 1e-3


def check_images(images: Any, name: str = "images") -> None:
    """Raises if ``images`` are not float images in [-1, 1] (range checked when concrete).

    Catches the common mistakes: uint8 pixels, or float pixels in [0, 255].
    """
    dtype = jnp.result_type(images)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected floating-point images in [-1, 1], got dtype {dtype}; "
            "convert uint8 pixels with images.astype(np.float32) / 127.5 - 1"
        )
    if isinstance(images, jax.core.Tracer):
        return  # values are unknown while tracing; the caller's jit owns the check.
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"{name}: expected values in [-1, 1], got [{lo:.4g}, {hi:.4g}]")


def scale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """Posterior latents -> the diffusion model's latents: (z - shift) * scaling_factor."""
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def unscale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
    """The inverse of ``scale_latents``."""
    z = latents / config.scaling_factor
    if config.shift_factor is not None:
        z = z + config.shift_factor
    return z


@functools.partial(jax.jit, static_argnames="module")
def _encode_posterior(module: AutoencoderKL, params: dict, images: jax.Array) -> DiagonalGaussian:
    return module.apply({"params": params}, images, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnames="module")
def _decode(module: AutoencoderKL, params: dict, z: jax.Array) -> jax.Array:
    return module.apply({"params": params}, z, method=AutoencoderKL.decode)


@functools.partial(jax.jit, static_argnames="config")
def _latents_from_posterior(config, posterior, rng):
    # Jitted: one small program, not a compile per eager op of the sampler.
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return scale_latents(config, z)


def encode_latents(
    module: AutoencoderKL, params: dict, images: jax.Array, rng: Optional[jax.Array] = None
) -> jax.Array:
    """images (N, H, W, 3) in [-1, 1] -> scaled latents (N, H/f, W/f, L).

    The posterior mode when ``rng`` is None, else a sample.
    """
    check_images(images)
    return _latents_from_posterior(module.config, _encode_posterior(module, params, images), rng)


def decode_latents(module: AutoencoderKL, params: dict, latents: jax.Array) -> jax.Array:
    """scaled latents (N, h, w, L) -> images (N, h*f, w*f, 3), clipped to [-1, 1]."""
    images = _decode(module, params, unscale_latents(module.config, latents))
    return jnp.clip(images, -1.0, 1.0)


def map_in_chunks(fn: Callable, x: jax.Array, chunk_size: int, devices: Optional[int] = None):
    """``fn`` over the leading axis of ``x``, ``chunk_size`` items per call and device.

    Full chunks go through one ``lax.map`` (a loop: one chunk's activations live at a
    time); a smaller remainder is one more call. fn: (n, ...) -> pytree of (n, ...).
    Under a mesh that splits the leading axis over d devices (parallel/batch.py), each
    step takes ``chunk_size`` items from every device's own part, so nothing moves
    between devices; with d = 1 the chunks are consecutive. devices: d, when the caller
    knows it (a jitted caller must take it as a static argument: its traces are cached
    without the mesh).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = x.shape[0]
    d = leading_split(n) if devices is None else devices
    local = x.reshape(d, n // d, *x.shape[1:])  # device i's items in row i
    full = (n // d) - (n // d) % chunk_size
    parts = []
    if full:
        chunks = local[:, :full].reshape(d, full // chunk_size, chunk_size, *x.shape[1:]).swapaxes(0, 1)
        out = jax.lax.map(lambda chunk: fn(constrain_leading(chunk.reshape(d * chunk_size, *x.shape[1:]))),
                          chunks)
        parts.append(jax.tree.map(
            lambda a: a.reshape(full // chunk_size, d, chunk_size, *a.shape[2:]).swapaxes(0, 1)
            .reshape(d, full, *a.shape[2:]), out))
    if n // d - full:
        rest = local[:, full:]
        out = fn(constrain_leading(rest.reshape(d * rest.shape[1], *x.shape[1:])))
        parts.append(jax.tree.map(lambda a: a.reshape(d, rest.shape[1], *a.shape[1:]), out))
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1).reshape(n, *a[0].shape[2:]), *parts)


@functools.partial(jax.jit, static_argnames=("module", "chunk_size", "devices"))
def _encode_frames_posterior(module, params, frames, chunk_size, devices):
    """frames (N, H, W, 3) -> the posterior of every frame, ``chunk_size`` at a time."""
    encode = functools.partial(module.apply, {"params": params}, method=AutoencoderKL.encode)
    return map_in_chunks(encode, frames, chunk_size, devices)


@functools.partial(jax.jit, static_argnames=("module", "chunk_size", "devices"))
def _decode_frames(module, params, latents, chunk_size, devices):
    b, f = latents.shape[:2]
    decode = functools.partial(module.apply, {"params": params}, method=AutoencoderKL.decode)
    z = unscale_latents(module.config, latents.reshape(b * f, *latents.shape[2:]))
    images = jnp.clip(map_in_chunks(decode, z, chunk_size, devices), -1.0, 1.0)
    return images.reshape(b, f, *images.shape[1:])


def encode_frames(
    module: AutoencoderKL,
    params: dict,
    frames: jax.Array,
    chunk_size: int,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """frames (B, F, H, W, 3) in [-1, 1] -> scaled latents (B, F, H/f, W/f, L).

    ``chunk_size`` frames are encoded at a time (batch and frame axes flattened), so a
    24-frame clip at 512x512 needs the activations of ``chunk_size`` frames only. The
    result equals ``encode_latents`` on all frames at once, samples included (same rng).
    """
    check_images(frames, "frames")
    if frames.ndim != 5:
        raise ValueError(f"frames: expected (B, F, H, W, C), got shape {tuple(frames.shape)}")
    b, f = frames.shape[:2]
    posterior = _encode_frames_posterior(module, params, frames.reshape(b * f, *frames.shape[2:]), chunk_size,
                                         leading_split(b * f))
    # Noise is drawn for all frames at once (latent-sized), so chunking never changes a sample.
    latents = _latents_from_posterior(module.config, posterior, rng)
    return latents.reshape(b, f, *latents.shape[1:])


def decode_frames(
    module: AutoencoderKL, params: dict, latents: jax.Array, chunk_size: int
) -> jax.Array:
    """scaled latents (B, F, h, w, L) -> frames (B, F, h*f, w*f, 3) in [-1, 1], in chunks."""
    return _decode_frames(module, params, latents, chunk_size, leading_split(latents.shape[0] * latents.shape[1]))
