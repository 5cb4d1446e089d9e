"""The SCD model as the trainer and the sampler see it: UNet + latent codec + context.

* The **codec** maps frames to the UNet's latents and back: the SD VAE
  (``VAECodec``), or pixel space with an optional pixel-unshuffle (``PixelCodec``,
  for the CPU demo).
* The **context** is the cross-attention input computed from the reference image:
  a CLIP image embedding (``ImageEncoderContext``) or a constant (``NullContext``); or
  a caption embedding precomputed once per caption (``TextContext``: Wan's UMT5 text),
  which the batch or the sampler's caller carries.
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


@dataclasses.dataclass(frozen=True)
class PixelCodec:
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
class VAECodec:
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


@dataclasses.dataclass(frozen=True)
class TextContext:
    """A caption embedding (B, L, dim) computed once per caption (data/text_embeddings.py),
    e.g. UMT5's for Wan: the training batch carries it as ``"context"`` and the sampler
    takes it from its caller; it is never computed from the reference image."""

    dim: int

    def embed(self, frozen: Any, images: jax.Array) -> jax.Array:
        raise ValueError("model.context.kind='text': the context is a precomputed caption embedding from the "
                         "batch or the sampler's caller, not computed from the reference image")

    def from_batch(self, batch: dict) -> jax.Array:
        """The batch's ``"context"`` (B, L, dim); a missing or misshapen one is a one-line error."""
        if "context" not in batch:
            raise ValueError("model.context.kind='text' needs the caption embeddings in the batch as 'context': "
                             "set data.pipeline.text_embeddings_dir (a folder data/text_embeddings.py wrote)")
        context = batch["context"]
        if context.ndim != 3 or context.shape[-1] != self.dim:
            raise ValueError(f"batch['context'] has shape {tuple(context.shape)}; model.context.kind='text' "
                             f"expects (B, L, {self.dim}) (the model's text dim)")
        return context


Codec = Union[PixelCodec, VAECodec]
Context = Union[NullContext, ImageEncoderContext, TextContext]


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

    def embed_reference(self, frozen: Any, reference: jax.Array) -> jax.Array:
        """Reference image (B, H, W, 3) in [-1, 1] -> cross-attention context (B, L, D); no gradient."""
        return jax.lax.stop_gradient(self.context.embed(frozen, reference))
