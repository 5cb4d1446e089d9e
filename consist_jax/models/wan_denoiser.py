"""The Wan DiT as SCD's denoiser behind the factory (``model.backbone = "wan"``).

``WanSCD`` takes pose frames at latent resolution; the trainer and the sampler hand
every denoiser pose IMAGES at pixel resolution on the latents' time grid
(``SCDModel.on_latent_time``: (B, [F_latent,] H, W, 3 t), each latent frame's t
pixel frames stacked in channels; t = 1, plain RGB, for per-frame codecs), as the UNet
(whose pose encoder downsamples them) takes them. ``WanDenoiser`` brings them to the
latent grid losslessly, by a pixel-unshuffle with the codec's spatial factor
(``PixelCodec``'s: 3 t f^2 channels), then is ``WanSCD``: same parameters (a
``load_transformer`` tree plus the pose embedding), same calls, same cache.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from consist_jax import checks
from consist_jax.models.scd import PixelCodec
from consist_jax.models.wan_scd import WanSCD, WanSCDConfig

POSE_IMAGE_CHANNELS = 3  # rendered pose images are RGB


@dataclasses.dataclass(frozen=True)
class WanDenoiserConfig(WanSCDConfig):
    """``WanSCDConfig`` plus pose_factor: the pixel-to-latent downsampling of the pose
    images (the codec's: 8 for Wan's VAE, the unshuffle factor of a pixel codec), and
    pose_temporal_factor: the pixel frames stacked per latent frame (the codec's: 4 for
    Wan's VAE, 1 per frame); pose_channels must then be 3 t f^2 (or None: no pose input)."""

    pose_factor: int = 1
    pose_temporal_factor: int = 1

    def __post_init__(self):
        super().__post_init__()
        checks.positive_int("pose_factor", self.pose_factor)
        checks.positive_int("pose_temporal_factor", self.pose_temporal_factor)
        expected = self.pose_image_channels * self.pose_factor ** 2
        if self.pose_channels not in (None, expected):
            raise ValueError(f"pose_channels={self.pose_channels}: pose images of {self.pose_image_channels} channels "
                             f"unshuffled by pose_factor={self.pose_factor} have {expected} channels")

    @property
    def pose_image_channels(self) -> int:
        """Channels of the pose images this denoiser takes: RGB times the frames a latent frame stacks."""
        return POSE_IMAGE_CHANNELS * self.pose_temporal_factor

    # What the sampler and the compile tool ask of any denoiser's config (the UNet's names).
    @property
    def pose_block_out_channels(self) -> Optional[tuple]:
        """None without a pose input (like the UNet's); () with one (no conv stack here)."""
        return None if self.pose_channels is None else ()

    @property
    def cross_attention_dim(self) -> int:
        return self.transformer.text_dim


class WanDenoiser(WanSCD):
    """``WanSCD`` taking pose images (B, [F,] H, W, 3 t) in [0, 1] at pixel resolution, on
    the latents' time grid (``config.pose_image_channels``)."""

    config: WanDenoiserConfig

    def __call__(self, sample, timesteps, encoder_hidden_states, *, reference_pose=None, target_pose=None,
                 **kwargs):
        return super().__call__(sample, timesteps, encoder_hidden_states, reference_pose=self._to_latent_grid(
            reference_pose), target_pose=self._to_latent_grid(target_pose), **kwargs)

    def extract_reference(self, reference, reference_timesteps, encoder_hidden_states, reference_pose=None):
        return super().extract_reference(reference, reference_timesteps, encoder_hidden_states,
                                         self._to_latent_grid(reference_pose))

    def _to_latent_grid(self, pose: Optional[jax.Array]) -> Optional[jax.Array]:
        if pose is None:
            return None
        if pose.shape[-1] != self.config.pose_image_channels:
            raise ValueError(f"pose images {tuple(pose.shape)}: this denoiser takes {self.config.pose_image_channels} "
                             f"channels ({self.config.pose_temporal_factor} frames per latent frame; see "
                             f"SCDModel.on_latent_time)")
        return PixelCodec(self.config.pose_factor).encode(None, pose)
