"""The SCD model as the trainer and the sampler see it: UNet + latent codec + context.

* The **codec** maps frames to the UNet's latents and back: the SD VAE
  (``VAECodec``, per frame), Wan2.1's causal video VAE (``WanVAECodec``: 4x in time,
  F = 1 + 4k frames -> 1 + k latent frames), or pixel space with an optional
  pixel-unshuffle (``PixelCodec``, for the CPU demo). Pose frames follow the latents'
  time grid (``frames_on_latent_time``; the identity for the per-frame codecs).
* The **context** is the cross-attention input computed from the reference image:
  a CLIP image embedding (``ImageEncoderContext``) or a constant (``NullContext``).
  The unconditional context (classifier-free guidance) is zeros, as in SD
  image-variations.
Codec and context models are frozen: their parameters live in a separate
``frozen`` pytree (``{"vae": ..., "image_encoder": ...}``), never in the train state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from consist_jax.models.unet import UNet


def _flat_frames(images: jax.Array):
    """(B, [F,] H, W, C) -> ((N, H, W, C), restore): frames flattened into the batch."""
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    return flat, lambda x: x.reshape(*lead, *x.shape[1:])


def latent_frame_count(frames: int, temporal_factor: int) -> int:
    """Latent frames of a clip of ``frames`` frames under a causal codec compressing time
    ``temporal_factor``x: frame 0 alone, then groups of t (1 + k for F = 1 + t k)."""
    if temporal_factor == 1:
        return frames
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(f"a clip of {frames} frames: the codec compresses time {temporal_factor}x causally, so "
                         f"clips have 1 + {temporal_factor}k frames (set data.pipeline.clip_length, or pass "
                         f"that many pose frames)")
    return 1 + (frames - 1) // temporal_factor


def frames_on_latent_time(frames: jax.Array, temporal_factor: int) -> jax.Array:
    """Pixel-time frames -> the latents' time grid, losslessly, as the causal VAE groups them:
    (B, F, H, W, C), F = 1 + t k -> (B, 1 + k, H, W, t C), latent frame 0 <- frame 0 repeated
    t times, latent frame j <- frames t(j-1)+1 .. t j, stacked frame-major in channels (the
    layout of Wan's I2V frame mask, diffusers' pipeline_wan_i2v). One frame (B, H, W, C) is a
    one-frame clip -> (B, H, W, t C). t = 1: the frames unchanged.
    """
    t = temporal_factor
    if t == 1:
        return frames
    if frames.ndim == 4:
        return jnp.concatenate([frames] * t, axis=-1)
    b, f, h, w, c = frames.shape
    latent_frame_count(f, t)
    padded = jnp.concatenate([jnp.repeat(frames[:, :1], t, axis=1), frames[:, 1:]], axis=1)
    grouped = padded.reshape(b, -1, t, h, w, c).transpose(0, 1, 3, 4, 2, 5)  # (B, 1 + k, H, W, t, C)
    return grouped.reshape(*grouped.shape[:4], t * c)


class _LatentTime:
    """A codec's time axis: frames per latent frame (1 unless the codec compresses time)."""

    temporal_factor = 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` frames."""
        return latent_frame_count(frames, self.temporal_factor)


@dataclasses.dataclass(frozen=True)
class PixelCodec(_LatentTime):
    """Pixel space, pixel-unshuffled by ``factor``: (.., H, W, 3) <-> (.., H/f, W/f, 3 f^2)."""

    factor: int = 1

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    def encode(self, frozen: Any, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        flat, restore = _flat_frames(images)
        n, h, w, c = flat.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"image size {(h, w)} is not divisible by the pixel-unshuffle factor {f}")
        x = flat.reshape(n, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return restore(x.reshape(n, h // f, w // f, f * f * c))

    def decode(self, frozen: Any, latents: jax.Array) -> jax.Array:
        flat, restore = _flat_frames(latents)
        n, h, w, _ = flat.shape
        f = self.factor
        x = flat.reshape(n, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
        return restore(jnp.clip(x.reshape(n, h * f, w * f, 3), -1.0, 1.0))


@dataclasses.dataclass(frozen=True)
class VAECodec(_LatentTime):
    """The SD VAE: frames in [-1, 1] <-> scaled latents; ``chunk_size`` frames at a time."""

    module: Any  # consist_jax.models.vae.AutoencoderKL
    chunk_size: int = 8

    @property
    def factor(self) -> int:
        return self.module.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.module.config.latent_channels

    def encode(self, frozen: Any, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        from consist_jax.models.vae import encode_frames

        video = images if images.ndim == 5 else images[:, None]
        latents = encode_frames(self.module, frozen["vae"], video, self.chunk_size, rng)
        return latents if images.ndim == 5 else latents[:, 0]

    def decode(self, frozen: Any, latents: jax.Array) -> jax.Array:
        from consist_jax.models.vae import decode_frames

        video = latents if latents.ndim == 5 else latents[:, None]
        frames = decode_frames(self.module, frozen["vae"], video, self.chunk_size)
        return frames if latents.ndim == 5 else frames[:, 0]


@dataclasses.dataclass(frozen=True)
class WanVAECodec(_LatentTime):
    """Wan2.1's causal video VAE (models/wan_vae.py): clips (B, 1 + 4k, H, W, 3) in [-1, 1]
    <-> latents (B, 1 + k, H/8, W/8, z_dim) normalised as diffusers' Wan pipelines do,
    (mu - latents_mean) / latents_std, chunked (the first frame, then 4 at a time; decode
    one latent frame at a time). An image (B, H, W, 3) is a one-frame clip -> (B, h, w, z_dim).

    Encoding takes the posterior mean, never a sample (``rng`` is unused): diffusers' Wan
    pipelines encode conditions with ``retrieve_latents(..., sample_mode="argmax")``, so
    training sees the latents sampling conditions on.
    """

    module: Any  # consist_jax.models.wan_vae.AutoencoderKLWan

    @property
    def factor(self) -> int:
        return self.module.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.module.config.temporal_factor

    @property
    def latent_channels(self) -> int:
        return self.module.config.z_dim

    def encode(self, frozen: Any, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        from consist_jax.models.wan_vae import encode_latents

        video = images if images.ndim == 5 else images[:, None]
        self.latent_frames(video.shape[1])
        latents = encode_latents(self.module, frozen["vae"], video)
        return latents if images.ndim == 5 else latents[:, 0]

    def decode(self, frozen: Any, latents: jax.Array) -> jax.Array:
        from consist_jax.models.wan_vae import decode_latents

        clip = latents if latents.ndim == 5 else latents[:, None]
        frames = decode_latents(self.module, frozen["vae"], clip)
        return frames if latents.ndim == 5 else frames[:, 0]


@dataclasses.dataclass(frozen=True)
class NullContext:
    """No image encoder: a constant zero context (B, 1, dim); the reference acts through
    self-attention alone."""

    dim: int

    def embed(self, frozen: Any, images: jax.Array) -> jax.Array:
        return jnp.zeros((images.shape[0], 1, self.dim), jnp.float32)


@dataclasses.dataclass(frozen=True)
class ImageEncoderContext:
    """A CLIP image encoder's output for the reference image.

    kind: "embedding" -> the projected embedding (B, 1, P); "hidden_states" -> the last
    hidden states (B, 1 + patches, hidden).
    """

    module: Any  # consist_jax.models.clip_vision.CLIPVisionModelWithProjection
    kind: str = "embedding"

    def embed(self, frozen: Any, images: jax.Array) -> jax.Array:
        from consist_jax.models.clip_vision import embed_images

        out = embed_images(self.module, frozen["image_encoder"], images)
        if self.kind == "embedding":
            return out.image_embeds[:, None, :]
        if self.kind == "hidden_states":
            return out.last_hidden_state
        raise ValueError(f"context kind {self.kind!r}: expected 'embedding' or 'hidden_states'")


Codec = Union[PixelCodec, VAECodec, WanVAECodec]
Context = Union[NullContext, ImageEncoderContext]


@dataclasses.dataclass(frozen=True)
class SCDModel:
    """The static half of an SCD model (modules and how they connect); params are separate.

    Trainable params: the UNet's (pose encoder and motion modules included).
    Frozen params: ``{"vae": ..., "image_encoder": ...}`` as the codec/context need.
    """

    unet: UNet
    codec: Codec
    context: Context

    def encode(self, frozen: Any, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Frames (B, [F,] H, W, 3) in [-1, 1] -> latents (B, [F,] h, w, C); no gradient."""
        return jax.lax.stop_gradient(self.codec.encode(frozen, images, rng))

    def decode(self, frozen: Any, latents: jax.Array) -> jax.Array:
        """Latents (B, [F,] h, w, C) -> frames (B, [F,] H, W, 3) in [-1, 1]."""
        return self.codec.decode(frozen, latents)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` frames (the sampler's noise, the loss's
        targets); a clip length the codec cannot take is a one-line error."""
        return self.codec.latent_frames(frames)

    def on_latent_time(self, frames: Optional[jax.Array]) -> Optional[jax.Array]:
        """Per-frame conditions (pose images, masks) (B, [F,] H, W, C) -> the latents' time grid,
        (B, [latent_frames(F),] H, W, t C) (``frames_on_latent_time``; unchanged for t = 1):
        the denoiser's pose input."""
        return None if frames is None else frames_on_latent_time(frames, self.codec.temporal_factor)

    def embed_reference(self, frozen: Any, reference: jax.Array) -> jax.Array:
        """Reference image (B, H, W, 3) in [-1, 1] -> cross-attention context (B, L, D); no gradient."""
        return jax.lax.stop_gradient(self.context.embed(frozen, reference))
