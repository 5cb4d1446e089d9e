"""The Wan DiT as SCD's denoiser behind the factory (``model.backbone = "wan"``).

``WanSCD`` takes pose frames at latent resolution; the trainer and the sampler hand
every denoiser pose IMAGES at pixel resolution (B, [F,] H, W, 3), as the UNet (whose
pose encoder downsamples them) takes them. ``WanDenoiser`` brings them to the latent
grid losslessly, by a pixel-unshuffle with the codec's factor (``PixelCodec``'s: 3 f^2
channels), then is ``WanSCD``: same parameters (a ``load_transformer`` tree plus the
pose embedding), same calls, same cache.
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
    images (the codec's: 8 for Wan's VAE, the unshuffle factor of a pixel codec);
    pose_channels must then be 3 pose_factor^2 (or None: no pose input)."""

    pose_factor: int = 1

    def __post_init__(self):
        super().__post_init__()
        checks.positive_int("pose_factor", self.pose_factor)
        expected = POSE_IMAGE_CHANNELS * self.pose_factor ** 2
        if self.pose_channels not in (None, expected):
            raise ValueError(f"pose_channels={self.pose_channels}: pose images unshuffled by pose_factor="
                             f"{self.pose_factor} have {expected} channels")

    # What the sampler and the compile tool ask of any denoiser's config (the UNet's names).
    @property
    def pose_block_out_channels(self) -> Optional[tuple]:
        """None without a pose input (like the UNet's); () with one (no conv stack here)."""
        return None if self.pose_channels is None else ()

    @property
    def cross_attention_dim(self) -> int:
        return self.transformer.text_dim


class WanDenoiser(WanSCD):
    """``WanSCD`` taking pose images (B, [F,] H, W, 3) in [0, 1] at pixel resolution."""

    config: WanDenoiserConfig

    def __call__(self, sample, timesteps, encoder_hidden_states, *, reference_pose=None, target_pose=None,
                 **kwargs):
        return super().__call__(sample, timesteps, encoder_hidden_states, reference_pose=self._to_latent_grid(
            reference_pose), target_pose=self._to_latent_grid(target_pose), **kwargs)

    def extract_reference(self, reference, reference_timesteps, encoder_hidden_states, reference_pose=None):
        return super().extract_reference(reference, reference_timesteps, encoder_hidden_states,
                                         self._to_latent_grid(reference_pose))

    def _to_latent_grid(self, pose: Optional[jax.Array]) -> Optional[jax.Array]:
        return None if pose is None else PixelCodec(self.config.pose_factor).encode(None, pose)
