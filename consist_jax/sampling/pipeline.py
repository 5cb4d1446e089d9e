"""Programmatic sampling: load a trained SCD model once, then generate from a reference and poses.

    pipe = SCDPipeline.from_checkpoint("runs/demo")            # a train.py workdir
    frames = pipe(reference_image, target_poses, reference_pose=ref_pose, steps=25,
                  guidance=3.0, seed=0)                          # uint8 (F, H, W, 3)

Inputs are uint8 images (H, W, 3) / pose images (F, H, W, 3) at the model's
resolution (``pipe.resolution``), or ``PoseSequence``s that are rendered with the one
pose renderer. Generation is two-stage (reference extracted once, the cache serving
every step, guidance branch and frame) and windowed in time for long videos; a model
trained with the full attention rule (an ablation) has no cache and samples jointly. One
compile per input shape and settings; the same seed gives the same frames.

The sampler follows the checkpoint's ``diffusion.kind`` (diffusion/kinds.py): ddim (default),
dpmpp_2m or euler for DDPM; flow_unipc (default) or flow_euler for flow matching, at its
``flow_shift``; a name of the other kind is a one-line error before any compile. With a
codec compressing time (Wan's VAE: 1 + 4k frames -> 1 + k latent frames) ``window`` and
``overlap`` count latent frames.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from consist_jax.checkpoints import restore_params
from consist_jax.checks import check_sample_settings
from consist_jax.diffusion.kinds import Schedule, make_sampler_for, sampler_name, schedule_from_config
from consist_jax.factory import build_model
from consist_jax.models.attention_rule import has_reference_cache
from consist_jax.models.scd import SCDModel, TextContext
from consist_jax.poses.keypoints import PoseSequence
from consist_jax.poses.render import render
from consist_jax.sampling.two_stage import GuidanceConfig, denoise, extract_reference, window_starts


def _to_signed(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32) / 127.5 - 1.0


def _to_unit(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32) / 255.0


def _as_pose_images(poses: Any, name: str) -> np.ndarray:
    """PoseSequence -> rendered uint8 (F, H, W, 3); uint8 pose images pass through."""
    if isinstance(poses, PoseSequence):
        return render(poses)
    poses = np.asarray(poses)
    if poses.dtype != np.uint8 or poses.ndim not in (3, 4) or poses.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 pose images (F, H, W, 3) or a PoseSequence, "
                         f"got {poses.dtype} {poses.shape}")
    return poses


class SCDPipeline:
    """A loaded SCD model plus its schedule (DDPM or flow); call it to generate frames."""

    def __init__(self, model: SCDModel, params: Any, frozen: Any, schedule: Schedule,
                 prediction_type: str, resolution: tuple[int, int], reference_timestep: int = 0,
                 config: Optional[dict] = None, step: Optional[int] = None):
        self.model, self.params, self.frozen = model, params, frozen
        self.schedule, self.prediction_type = schedule, prediction_type
        self.resolution = resolution
        self.reference_timestep = reference_timestep
        self.config, self.step = config, step  # the run config and step of a loaded checkpoint
        self._progress_bar = None

    @classmethod
    def from_checkpoint(cls, workdir: str, step: Optional[int] = None, use_ema: bool = True) -> "SCDPipeline":
        params, config_dict, step = restore_params(workdir, step, use_ema)
        config = ml_collections.ConfigDict(config_dict)
        model, _, frozen = build_model(config.model, jax.random.key(0), init_params=False)
        resolution = config.data.pipeline.resolution
        resolution = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
        schedule = schedule_from_config(config.diffusion)
        return cls(model, params, frozen, schedule, config.diffusion.prediction_type, resolution,
                   config.train.reference_timestep, config_dict, step)

    def sample_settings(self, steps: Optional[int] = None, guidance: Optional[float] = None) -> tuple[int, float]:
        """(denoising steps, guidance scale): those given, else the loaded run config's
        ``sample.steps`` / ``sample.guidance`` (what the model was configured to be sampled with)."""
        sample = self.config["sample"]
        return (sample["steps"] if steps is None else steps, sample["guidance"] if guidance is None else guidance)

    def check_inputs(self, reference_image: np.ndarray, target_poses: np.ndarray,
                     reference_pose: Optional[np.ndarray]) -> None:
        """Clear errors before any compile."""
        h, w = self.resolution
        if reference_image.dtype != np.uint8 or reference_image.shape != (h, w, 3):
            raise ValueError(f"reference image must be uint8 ({h}, {w}, 3), got "
                             f"{reference_image.dtype} {reference_image.shape}")
        if target_poses.ndim != 4 or len(target_poses) == 0:
            raise ValueError(f"target poses must be (F >= 1, {h}, {w}, 3), got {target_poses.shape}")
        if target_poses.shape[1:] != (h, w, 3):
            raise ValueError(f"pose images are {target_poses.shape[1:3]}, the model's resolution is {(h, w)}")
        self.model.latent_frames(len(target_poses))  # a clip length the codec cannot take: one line
        pose_cfg = self.model.unet.config
        if pose_cfg.pose_block_out_channels is not None and pose_cfg.reference_pose_injection:
            if reference_pose is None:
                raise ValueError("this model injects the reference pose: pass reference_pose")
            if reference_pose.shape != (h, w, 3):
                raise ValueError(f"reference pose must be ({h}, {w}, 3), got {reference_pose.shape}")

    def check_context(self, context: Optional[np.ndarray], negative_context: Optional[np.ndarray]) -> None:
        """A caption-conditioned model (model.context.kind "text") needs its caption embedding
        (L, D); any other model takes none. Clear errors before any compile."""
        text = isinstance(self.model.context, TextContext)
        if not text:
            if context is not None or negative_context is not None:
                raise ValueError("context= / negative_context= are caption embeddings for a model with "
                                 "model.context.kind='text'; this model's context comes from the reference image")
            return
        if context is None:
            raise ValueError("this model is conditioned on a caption (model.context.kind='text'): pass context=, "
                             "its (L, D) embedding (data/text_embeddings.py: TextEmbeddings(folder).lookup(id)[0])")
        dim = self.model.context.dim
        for name, value in (("context", context), ("negative_context", negative_context)):
            if value is not None and (value.ndim != 2 or value.shape[1] != dim or value.shape != context.shape):
                raise ValueError(f"{name} has shape {value.shape}; the model's caption embeddings are (L, {dim}) "
                                 f"(negative_context: context's {context.shape})")

    def __call__(self, reference_image, target_poses, *, reference_pose=None, steps: int = 25,
                 guidance: float = 3.0, guidance_rescale: float = 0.0, seed: int = 0,
                 sampler: Optional[str] = None, window: int = 24, overlap: int = 4,
                 timestep_spacing: Optional[str] = None, progress: bool = False,
                 context=None, negative_context=None) -> np.ndarray:
        """reference_image uint8 (H, W, 3); target_poses uint8 (F, H, W, 3) or PoseSequence;
        reference_pose uint8 (H, W, 3) or a 1-frame PoseSequence -> uint8 frames (F, H, W, 3).

        ``sampler``: None (or "") for the model's kind's default (ddim; flow_unipc for flow).
        context: (L, D) float, the caption embedding of a caption-conditioned model
        (model.context.kind "text"); negative_context: (L, D), the unconditional branch's
        (default zeros, as training drops the caption).

        ``progress`` shows a bar over denoising steps x temporal windows (the same frames
        either way)."""
        reference_image = np.asarray(reference_image)
        target_poses = _as_pose_images(target_poses, "target poses")
        if reference_pose is not None:
            reference_pose = _as_pose_images(reference_pose, "reference pose")
            reference_pose = reference_pose[0] if reference_pose.ndim == 4 else reference_pose
        self.check_inputs(reference_image, target_poses, reference_pose)
        context, negative_context = (None if c is None else np.asarray(c, np.float32)
                                     for c in (context, negative_context))
        self.check_context(context, negative_context)
        check_sample_settings("", steps=steps, guidance=guidance, window=window, overlap=overlap,
                              seed=seed, guidance_rescale=guidance_rescale)
        sampler = sampler_name(self.schedule, sampler)
        generate = self._compiled(len(target_poses), steps, sampler, timestep_spacing,
                                  float(guidance_rescale), window, overlap, progress)
        if progress:
            from tqdm import tqdm

            windows = len(window_starts(self.model.latent_frames(len(target_poses)), window, overlap))
            self._progress_bar = tqdm(total=steps * windows, desc=f"{steps} steps x {windows} window(s)")
        try:
            frames = generate(
                self.params, self.frozen, jnp.float32(guidance),
                _to_signed(reference_image)[None],
                None if reference_pose is None else _to_unit(reference_pose)[None],
                _to_unit(target_poses)[None],
                jax.random.key(seed),
                None if context is None else context[None],
                None if negative_context is None else negative_context[None],
            )
            return np.asarray(jnp.round((frames[0] + 1.0) * 127.5)).astype(np.uint8)
        finally:
            if self._progress_bar is not None:
                self._progress_bar.close()
                self._progress_bar = None

    def _tick(self) -> None:
        if self._progress_bar is not None:
            self._progress_bar.update(1)

    @functools.lru_cache(maxsize=8)
    def _compiled(self, num_frames, steps, sampler, timestep_spacing, guidance_rescale, window, overlap,
                  progress):
        """One jitted generator per static setting; the guidance scale is a traced input."""
        model, h, w = self.model, *self.resolution
        f = self.model.codec.factor
        sampler = make_sampler_for(self.schedule, sampler, steps, prediction_type=self.prediction_type,
                                   timestep_spacing=timestep_spacing)
        latent_shape = (1, model.latent_frames(num_frames), h // f, w // f, model.codec.latent_channels)

        @jax.jit
        def generate(params, frozen, guidance_scale, reference_image, reference_pose, target_poses, rng,
                     context, negative_context):
            guidance = GuidanceConfig(guidance_scale, guidance_rescale)
            reference_pose, target_poses = model.on_latent_time(reference_pose), model.on_latent_time(target_poses)
            reference = extract_reference(model, params, frozen, reference_image, reference_pose,
                                          self.reference_timestep, context)
            noise = jax.random.normal(rng, latent_shape, jnp.float32)
            latents = denoise(model, params, reference, sampler, noise, target_poses, guidance,
                              window=window, overlap=overlap, progress=self._tick if progress else None,
                              joint=not has_reference_cache(model.unet.config.attention.rule),
                              reference_pose=reference_pose, reference_timestep=self.reference_timestep,
                              negative_context=negative_context)
            return model.decode(frozen, latents)

        return generate
