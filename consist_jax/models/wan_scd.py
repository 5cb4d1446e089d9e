"""SCD on the Wan DiT: the reference frame as causal extra tokens (docs/wan.md).

The clean reference latent, a one-frame clip, is patch-embedded like the targets and
runs beside them through every block as its own token stream:

  * its own timestep (0 by default): each stream's adaptive-norm modulation comes from
    its own time embedding (diffusers' Wan modulates per clip; here per segment);
  * its own rotary frame position: the reference at frame 0, the target latent frames
    at ``target_frame_start`` .. (default 1 .. F, window-local; docs/wan.md says why);
    rows and columns on the same grid as the targets;
  * self-attention under SCD's rule through the same rule, backends and kernels as the
    UNet (``self_attention.reference_target_attention`` and the ``AttentionConfig``'s
    backend). In a video DiT all target tokens of a clip attend to one another, so the
    targets form ONE segment (id 1) and the reference segment 0: R reads R, T reads R
    and T (causal); the full rule (ablation) lets R read T too;
  * cross-attention to the text, the norms and the feed-forward act per token, so the
    two streams share those weights and never mix;
  * with ``transformer.sequence_axis`` each stream's tokens live split over that mesh
    axis and self-attention gathers keys and values, so the reference cache is whole
    (consist_jax/parallel/sequence.py).

Pose: ``PosePatchEmbedding`` turns pose frames at latent resolution (B, F, h, w, C_pose)
(rendered pose images resized to the latent, or their VAE latents) into tokens added
to the patch embedding; its output layer starts at zero, so a pretrained Wan starts
unchanged. The reference pose goes to the reference tokens unless
``reference_pose_injection`` is off (the UNet's ablation switch, same name).

The parameters are ``WanTransformer``'s (same names: a ``load_transformer`` checkpoint
plugs in) plus ``pose_patch_embedding``. ``WanSCD`` takes the UNet's calls, so the pure
train step (``training/step.py``) and the one denoiser (``sampling/two_stage.py``) drive
it as ``SCDModel.unet``:

  * targets only (no reference): ``apply(v, sample (B, F, h, w, C), timesteps (B,) or (),
    context (B, L, text_dim))`` -> (B, F, h, w, C_out); with no pose this is Wan's forward.
  * joint: the same plus ``reference=(B, h, w, C)``, ``reference_timesteps=(B,)``
    (default 0), ``reference_pose=(B, h, w, C_pose)``, ``target_pose=(B, F, h, w, C_pose)``,
    ``reference_mask=(B,)`` -> the target prediction (loss on target tokens only).
  * stage 1: ``apply(v, reference, reference_timesteps, context, reference_pose,
    method="extract_reference", mutable=["reference_cache"])``; the cache is
    ``{"blocks.i": {"key", "value": (B, N_r, H, D)}}``, the keys after rotary.
  * stage 2: as the joint call without ``reference``, ``use_reference_cache=True`` and
    ``{"params": p, "reference_cache": cache}``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist_jax import checks
from consist_jax.models.self_attention import (AttentionConfig, read_reference_cache,
                                               reference_target_attention, write_reference_cache)
from consist_jax.models.wan_transformer import (
    ConditionEmbedder,
    FP32LayerNorm,
    WanTransformerConfig,
    block_layers,
    block_rest,
    modulate,
    modulation,
    patch_grid,
    rotary_angles,
    rotary_table,
    self_attention_inputs,
    unpatchify,
)
from consist_jax.parallel.sequence import split_tokens

# How a forward pass lays out its streams (static): targets alone ("none"), reference and
# targets ("joint"), the reference alone writing the cache ("extract"), the targets
# reading it ("cached").
MODES = ("none", "joint", "extract", "cached")
REFERENCE_FRAME_POSITION = 0  # the reference's rotary frame position (docs/wan.md)
REFERENCE_TIMESTEP = 0  # its default timestep: the clean latent


@dataclasses.dataclass(frozen=True)
class WanSCDConfig:
    """A Wan transformer plus SCD's options.

    transformer: the DiT (T2V: ``image_dim`` None; the reference acts through
      self-attention, the text through cross-attention).
    attention: the rule and backend of every self-attention (the UNet's ``AttentionConfig``).
    pose_channels: channels of the pose frames at latent resolution; None: no pose input.
    pose_hidden_channels: width of the pose embedding's hidden (1, 3, 3) convolution.
    reference_pose_injection: feed the reference pose to the reference tokens too.
    target_frame_start: rotary frame position of the first target latent frame (the
      reference sits at 0): 1 puts the reference before the clip (default); 0 shares the
      first target's position (the ablation docs/wan.md names).
    """

    transformer: WanTransformerConfig
    attention: AttentionConfig = AttentionConfig()
    pose_channels: Optional[int] = None
    pose_hidden_channels: int = 64
    reference_pose_injection: bool = True
    target_frame_start: int = 1

    def __post_init__(self):
        if self.transformer.image_dim is not None:
            raise ValueError(f"transformer.image_dim={self.transformer.image_dim}: SCD on Wan takes the T2V "
                             f"transformer (the reference joins as tokens, not as CLIP image context)")
        if self.transformer.patch_size[0] != 1:
            raise ValueError(f"transformer.patch_size={self.transformer.patch_size}: the reference is a one-frame "
                             f"clip, so the temporal patch must be 1")
        if self.pose_channels is not None:
            checks.positive_int("pose_channels", self.pose_channels)
        checks.positive_int("pose_hidden_channels", self.pose_hidden_channels)
        if self.target_frame_start not in (0, 1):
            raise ValueError(f"target_frame_start={self.target_frame_start}: expected 1 (reference before the "
                             f"clip) or 0 (reference shares the first target's frame position)")


class PosePatchEmbedding(nn.Module):
    """Pose frames (B, F, h, w, C_pose) at latent resolution -> tokens (B, F h' w', D).

    A (1, 3, 3) convolution (frames stay independent, so the one-frame reference pose
    and a target frame are embedded alike), SiLU, then a patchify convolution with
    Wan's patch and zero-initialised weights: an untrained embedding adds nothing.
    """

    config: WanTransformerConfig
    hidden_channels: int

    @nn.compact
    def __call__(self, pose: jax.Array) -> jax.Array:
        c = self.config
        h = nn.Conv(self.hidden_channels, (1, 3, 3), padding="SAME", dtype=c.dtype, name="conv_in")(
            pose.astype(c.dtype))
        h = nn.Conv(c.inner_dim, c.patch_size, strides=c.patch_size, padding="VALID", dtype=c.dtype,
                    kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                    name="conv_out")(nn.silu(h))
        return h.reshape(h.shape[0], -1, c.inner_dim)


class Stream(NamedTuple):
    """One segment's tokens as they pass through the blocks.

    x (B, N, D); temb (B, D) and temb6 (B, 6, D): its own timestep's embeddings;
    rotary: (cos, sin), each (N, head_dim / 2), of its own positions.
    """

    x: jax.Array
    temb: jax.Array
    temb6: jax.Array
    rotary: tuple[jax.Array, jax.Array]


class WanSCDBlock(nn.Module):
    """``WanBlock`` over a reference and a target stream (either may be absent, as
    ``mode`` says): (ref x, tgt x) -> (ref x, tgt x), each (B, N, D) or None."""

    config: WanTransformerConfig
    attention: AttentionConfig
    mode: str

    @nn.compact
    def __call__(self, ref: Optional[Stream], tgt: Optional[Stream], context: jax.Array,
                 reference_mask: Optional[jax.Array]):
        c = self.config
        layers = block_layers(self, c, added_kv=False)
        streams = {k: s for k, s in (("ref", ref), ("tgt", tgt)) if s is not None}
        mods = {k: modulation(layers.table, s.temb6) for k, s in streams.items()}
        axis = c.sequence_axis
        qkv = {k: self_attention_inputs(layers, s.x, mods[k], s.rotary, c.dtype, axis) for k, s in streams.items()}
        attended = self.self_attention(qkv.get("ref"), qkv.get("tgt"), reference_mask)
        out = {k: block_rest(layers, s.x, attended[k], mods[k], context, c.dtype, sequence_axis=axis)
               for k, s in streams.items()}
        return out.get("ref"), out.get("tgt")

    def self_attention(self, ref, tgt, reference_mask) -> dict:
        """ref, tgt: (q, k, v), each (B, N, H, D), or None -> {"ref", "tgt": (B, N, H, D) or None}.

        The targets are one segment of the rule: (B, 1, N_t, H, D).
        """
        config = self.attention
        if self.mode == "none":
            return {"ref": None, "tgt": config.backend.plain(*tgt, upcast=config.upcast)}
        if self.mode == "extract":
            write_reference_cache(self, ref[1], ref[2])
            return {"ref": config.backend.plain(*ref, upcast=config.upcast), "tgt": None}
        segment = tuple(a[:, None] for a in tgt)
        if self.mode == "joint":
            out_ref, out_tgt = reference_target_attention(
                ref, segment, rule=config.rule, impl=config.impl, reference_mask=reference_mask,
                upcast=config.upcast)
            return {"ref": out_ref, "tgt": out_tgt[:, 0]}
        k_ref, v_ref = self.cached_reference(tgt[0])
        out_tgt = config.backend.target(*segment, k_ref, v_ref, reference_mask, upcast=config.upcast)
        return {"ref": None, "tgt": out_tgt[:, 0]}

    def cached_reference(self, q_tgt: jax.Array):
        """This layer's cached reference (key, value), each (B, N_r, H, D)."""
        k_ref, v_ref = read_reference_cache(self, self.attention.rule, q_tgt.dtype)
        if k_ref.shape[0] != q_tgt.shape[0] or k_ref.shape[2:] != q_tgt.shape[2:]:
            raise ValueError(f"reference cache at {'/'.join(self.scope.path)} has keys {k_ref.shape}; the targets' queries are "
                             f"{q_tgt.shape} (B, N, H, D): tile the cache to the target batch")
        return k_ref, v_ref


class WanSCD(nn.Module):
    """SCD's Wan denoiser; the calls are the UNet's (module docstring)."""

    config: WanSCDConfig

    def __call__(self, sample, timesteps, encoder_hidden_states, *, reference=None, reference_timesteps=None,
                 reference_pose=None, target_pose=None, reference_mask=None, use_reference_cache=False):
        """sample (B, F, h, w, C) -> the targets' prediction (B, F, h, w, C_out)."""
        b = sample.shape[0]
        t = _per_example(timesteps, b, "timesteps")
        if reference_mask is not None and reference_mask.shape != (b,):
            raise ValueError(f"reference_mask of shape {reference_mask.shape}: expected ({b},) booleans")
        if reference is not None and use_reference_cache:
            raise ValueError("pass either a reference or use_reference_cache=True, not both")
        # With a reference (joint or cached) the targets sit at target_frame_start ..; alone,
        # at Wan's own 0 .. F-1 (the forward is then diffusers' exactly).
        with_reference = reference is not None or use_reference_cache
        first_frame = self.config.target_frame_start if with_reference else 0
        tgt = (sample, t, self._checked_pose(target_pose, sample, "target_pose"), first_frame)
        if reference is None:
            if reference_pose is not None:
                raise ValueError("reference_pose given without a reference (the cache holds the reference's pose)")
            mode = "cached" if use_reference_cache else "none"
            return self.forward(encoder_hidden_states, mode, reference_mask, tgt=tgt)
        if target_pose is not None and reference_pose is None and self.config.reference_pose_injection:
            raise ValueError("reference_pose is required with target_pose when reference_pose_injection is on")
        ref = self._reference_clip(reference, reference_timesteps, reference_pose, sample.shape)
        return self.forward(encoder_hidden_states, "joint", reference_mask, ref=ref, tgt=tgt)

    def extract_reference(self, reference, reference_timesteps, encoder_hidden_states, reference_pose=None):
        """Stage 1: reference (B, h, w, C) alone -> its own prediction (B, h, w, C_out); apply
        with ``mutable=["reference_cache"]`` for the cache."""
        ref = self._reference_clip(reference, reference_timesteps, reference_pose)
        return self.forward(encoder_hidden_states, "extract", None, ref=ref)[:, 0]

    @nn.compact
    def forward(self, context, mode: str, reference_mask, ref=None, tgt=None):
        """The DiT over the streams ``mode`` names. ref / tgt: (latents (B, F, h, w, C),
        timesteps (B,), pose (B, F, h, w, C_pose) or None, first rotary frame position).
        Returns the prediction (B, F, h, w, C_out) of the targets (of the reference in
        ``extract`` mode), float32."""
        scd, c = self.config, self.config.transformer
        patch = nn.Conv(c.inner_dim, c.patch_size, strides=c.patch_size, padding="VALID", dtype=c.dtype,
                        name="patch_embedding")
        pose_embedding = (PosePatchEmbedding(c, scd.pose_hidden_channels, name="pose_patch_embedding")
                          if scd.pose_channels is not None else None)
        embedder = ConditionEmbedder(c, name="condition_embedder")
        text, streams, grids = None, {}, {}
        for key, clip in (("ref", ref), ("tgt", tgt)):
            if clip is None:
                streams[key] = None
                continue
            latents, t, pose, first_frame = clip
            grids[key] = grid = patch_grid(c, latents.shape)
            x = patch(latents.astype(c.dtype)).reshape(latents.shape[0], -1, c.inner_dim)
            if pose is not None:
                x = x + pose_embedding(pose)
            x = split_tokens(x, c.sequence_axis)
            temb, temb6, text, _ = embedder(t, context)
            positions = np.arange(first_frame, first_frame + grid[0])
            streams[key] = Stream(x, temb, temb6, rotary_table(rotary_angles(c, grid, positions)))

        block_cls = nn.remat(WanSCDBlock) if c.remat else WanSCDBlock
        for i in range(c.num_layers):
            x_ref, x_tgt = block_cls(c, scd.attention, mode, name=f"blocks.{i}")(
                streams["ref"], streams["tgt"], text, reference_mask)
            streams = {k: None if s is None else s._replace(x=x) for (k, s), x in
                       zip(streams.items(), (x_ref, x_tgt))}

        out_key = "ref" if mode == "extract" else "tgt"
        table = self.param("scale_shift_table", nn.initializers.normal(c.inner_dim ** -0.5),
                           (1, 2, c.inner_dim), jnp.float32)
        s = streams[out_key]
        shift, scale = modulation(table, s.temb[:, None])
        x = modulate(s.x, FP32LayerNorm(c.eps, name="norm_out"), shift, scale, c.dtype)
        x = nn.Dense(c.out_channels * math.prod(c.patch_size), dtype=c.dtype, name="proj_out")(x)
        return unpatchify(x, grids[out_key], c.patch_size).astype(jnp.float32)

    # ------------------------------------------------------------------ input checks

    def _reference_clip(self, reference, reference_timesteps, reference_pose, target_shape=None):
        """The reference as a one-frame clip: (latents (B, 1, h, w, C), timesteps (B,), pose, 0)."""
        if reference.ndim != 4 or (target_shape is not None and
                                   reference.shape != (target_shape[0], *target_shape[2:])):
            expected = "(B, h, w, C)" if target_shape is None else (target_shape[0], *target_shape[2:])
            raise ValueError(f"reference of shape {reference.shape}: expected {expected}, one latent frame")
        clip = reference[:, None]
        b = reference.shape[0]
        t = (jnp.full((b,), REFERENCE_TIMESTEP, jnp.int32) if reference_timesteps is None
             else _per_example(reference_timesteps, b, "reference_timesteps"))
        pose = None
        if reference_pose is not None and self.config.reference_pose_injection:
            pose = self._checked_pose(reference_pose[:, None], clip, "reference_pose (B, h, w, C_pose)")
        return clip, t, pose, REFERENCE_FRAME_POSITION

    def _checked_pose(self, pose, latents, name):
        """pose (B, F, h, w, C_pose) matching the latents (B, F, h, w, C), or None."""
        if pose is None:
            return None
        if self.config.pose_channels is None:
            raise ValueError(f"{name} given but this model has no pose embedding (pose_channels=None)")
        expected = (*latents.shape[:-1], self.config.pose_channels)
        if pose.shape != expected:
            raise ValueError(f"{name} of shape {pose.shape}: expected {expected} (pose frames at latent "
                             f"resolution)")
        return pose


def _per_example(timesteps, b: int, name: str) -> jax.Array:
    """A scalar or (B,) timestep -> (B,)."""
    t = jnp.asarray(timesteps)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
        raise ValueError(f"{name} of shape {t.shape}: expected a scalar or ({b},)")
    return t


def init_wan_scd_params(config: WanSCDConfig, rng: jax.Array, frames: int = 1, latent_hw=None) -> Any:
    """Fresh parameters of ``WanSCD(config)`` (pose embedding included when configured).

    The sequence axis splits activations over a mesh, not parameters: it is left out, so
    this runs without a mesh.
    """
    c = config.transformer
    config = dataclasses.replace(config, transformer=dataclasses.replace(c, sequence_axis=None))
    h, w = latent_hw or tuple(2 * p for p in c.patch_size[1:])
    sample = jnp.zeros((1, frames, h, w, c.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, c.text_dim), jnp.float32)
    pose = None if config.pose_channels is None else jnp.zeros((1, frames, h, w, config.pose_channels))
    ref_pose = None if pose is None else pose[:, 0]
    return WanSCD(config).init(rng, sample, jnp.zeros((1,)), context, reference=sample[:, 0],
                               reference_pose=ref_pose, target_pose=pose)["params"]
