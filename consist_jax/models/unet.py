"""The SCD denoising UNet: diffusers' UNet2DConditionModel (SD-1.x) plus SCD's inputs.

With no reference, ``UNet.apply({"params": p}, sample, timesteps, context)`` computes
what diffusers' ``UNet2DConditionModel`` computes, in NHWC.

The SCD call adds a clean reference latent (with its own timestep, 0 by default)
and pose images. Reference and targets are laid out as separate images of one
batch (see ``ReferenceLayout``): convolutions, GroupNorm, the time embedding,
cross-attention and the feed-forward treat each image alone, and they meet only
in self-attention, under the rule in attention_rule.py (the layer: self_attention.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax import checks
from consist_jax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv3x3
from consist_jax.models.motion import MotionConfig, TemporalTransformer, on_target_frames
from consist_jax.models.pose_encoder import PoseEncoder
from consist_jax.models.self_attention import AttentionConfig, ReferenceLayout
from consist_jax.models.transformer import Transformer2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that do not change the computation of an SD-1.x UNet.
_IGNORED_KEYS = {"sample_size", "dropout"}
# diffusers options we do not implement, with the value that means "off".
_MUST_BE_DEFAULT = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
}


SELF_ATTENTION_KEY_INITS = ("random", "query")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of an SD-1.x UNet (diffusers names) plus SCD's options."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' "attention_head_dim" (heads)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SCD options (not in diffusers' config).
    attention_rule: str = "causal"  # "causal" (SCD) | "full" (ablation)
    attention_impl: str = "xla"  # see self_attention.ATTENTION_IMPLS
    reference_pose_injection: bool = True  # feed the reference pose too (SCD ablates it)
    pose_block_out_channels: Optional[tuple[int, ...]] = (16, 32, 64, 128)  # None: no pose encoder
    remat: bool = False  # rematerialise each resnet / transformer in the backward pass
    # A fresh UNet's self-attention keys: "random", or "query" (each to_k starts equal to its
    # to_q; convert/unet.py, init_unet_params). Pretrained weights are never re-initialised.
    self_attention_key_init: str = "random"
    # False: transformer blocks without cross-attention, for a fresh UNet with no image or
    # caption context (model.context.kind "none"): over that constant zero context the values
    # are zero, so each cross-attention computes only its output bias, at the cost of a LayerNorm, two
    # projections and a one-key attention forward and backward (7-9% of the CPU demo's step).
    cross_attention: bool = True
    motion: Optional[MotionConfig] = None  # video model: AnimateDiff motion modules (None: image model)
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
            checks.positive_int(name, getattr(self, name))
        for name in ("block_out_channels", "attention_heads", "transformer_layers_per_block"):
            checks.positive_ints(name, getattr(self, name))
        if self.pose_block_out_channels is not None:
            checks.positive_ints("pose_block_out_channels", self.pose_block_out_channels)
        checks.positive_number("norm_eps", self.norm_eps)
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "attention_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                    f"block_out_channels has {n}"
                )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unknown down block type {t!r}; expected one of {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unknown up block type {t!r}; expected one of {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unknown mid block type {self.mid_block_type!r}; expected {MID_BLOCK_TYPES}")
        for c, h in zip(self.block_out_channels, self.attention_heads):
            if c % h:
                raise ValueError(f"{c} channels are not divisible by {h} attention heads")
        if self.self_attention_key_init not in SELF_ATTENTION_KEY_INITS:
            raise ValueError(f"self_attention_key_init={self.self_attention_key_init!r}: expected one of "
                             f"{SELF_ATTENTION_KEY_INITS}")
        _ = self.attention  # building it checks attention_rule and attention_impl
        if self.motion is not None:
            self.motion.check_blocks(self.block_out_channels)

    @property
    def attention(self) -> AttentionConfig:
        """The self-attention settings, one value carried down to every layer."""
        return AttentionConfig(self.attention_rule, self.attention_impl, self.upcast_attention)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "UNetConfig":
        """Builds the config from a diffusers ``config.json`` dict; ``overrides`` set SCD options."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # diffusers metadata
        n = len(checks.positive_ints("block_out_channels", config.get("block_out_channels", cls.block_out_channels)))
        unknown = set(config) - _IGNORED_KEYS - set(_MUST_BE_DEFAULT) - {
            f.name for f in dataclasses.fields(cls)
        } - {"attention_head_dim", "num_attention_heads", "mid_block_type"}
        if unknown:
            raise ValueError(f"unknown UNet config key(s) {sorted(unknown)}")
        for key, default in _MUST_BE_DEFAULT.items():
            if key in config and config[key] != default:
                raise ValueError(
                    f"UNet config {key}={config[key]!r} is not supported (SD-1.x UNets have {default!r})"
                )
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)

        def per_block(value):
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

        kwargs = {
            f.name: config[f.name]
            for f in dataclasses.fields(cls)
            if f.name in config and f.name not in ("attention_heads",)
        }
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        kwargs["attention_heads"] = per_block(heads)
        kwargs["transformer_layers_per_block"] = per_block(config.get("transformer_layers_per_block", 1))
        if config.get("mid_block_type") is not None:
            kwargs["mid_block_type"] = config["mid_block_type"]
        kwargs.update(overrides)
        return cls(**kwargs)


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal embedding as diffusers' ``get_timestep_embedding``: (N,) -> (N, dim)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1, SiLU, linear_2: (N, C0) sinusoids -> (N, dim)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        t = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(t.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(t))


class _Blocks:
    """Constructors shared by the down, mid and up blocks (remat applied once here)."""

    def __init__(self, config: UNetConfig):
        self.config = config
        if config.remat:
            self.resnet_cls = nn.remat(ResnetBlock2D)
            # layout (arg 3, counting self) is static: it selects the attention path.
            self.transformer_cls = nn.remat(Transformer2D, static_argnums=(3,))
            self.motion_cls = nn.remat(TemporalTransformer)
        else:
            self.resnet_cls, self.transformer_cls = ResnetBlock2D, Transformer2D
            self.motion_cls = TemporalTransformer

    def resnet(self, channels: int, name: str):
        c = self.config
        return self.resnet_cls(channels, c.norm_num_groups, c.norm_eps, dtype=c.dtype, name=name)

    def transformer(self, block: int, name: str):
        c = self.config
        return self.transformer_cls(
            heads=c.attention_heads[block],
            num_layers=c.transformer_layers_per_block[block],
            groups=c.norm_num_groups,
            use_linear_projection=c.use_linear_projection,
            attention=c.attention,
            cross_attention=c.cross_attention,
            dtype=c.dtype,
            name=name,
        )

    def motion(self, x, layout: ReferenceLayout, block: int, name: str, num_layers: Optional[int] = None):
        """The motion module after a resnet/attention pair (identity in an image UNet).

        x (N, h, w, C) flat images; only the target frames meet across time.
        block: down-block depth (heads and layers); num_layers overrides the layers.
        """
        m = self.config.motion
        if m is None:
            return x
        module = self.motion_cls(
            heads=m.heads(block),
            num_layers=m.layers(block) if num_layers is None else num_layers,
            groups=m.norm_num_groups,
            max_seq_length=m.max_seq_length,
            frames_axis=m.frames_axis,
            dtype=self.config.dtype,
            name=name,
        )
        return on_target_frames(module, x, layout)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D (+ motion modules): returns the output and the skips."""

    config: UNetConfig
    index: int

    @nn.compact
    def __call__(self, x, temb, context, layout, reference_mask):
        c, blocks = self.config, _Blocks(self.config)
        channels = c.block_out_channels[self.index]
        with_attention = c.down_block_types[self.index] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(c.layers_per_block):
            x = blocks.resnet(channels, f"resnets.{j}")(x, temb)
            if with_attention:
                x = blocks.transformer(self.index, f"attentions.{j}")(x, context, layout, reference_mask)
            x = blocks.motion(x, layout, self.index, f"motion_modules.{j}")
            skips.append(x)
        if self.index < len(c.block_out_channels) - 1:
            x = Downsample2D(channels, dtype=c.dtype, name="downsamplers.0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, [motion module,] resnet."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x, temb, context, layout, reference_mask):
        c, blocks = self.config, _Blocks(self.config)
        last = len(c.block_out_channels) - 1
        channels = c.block_out_channels[-1]
        x = blocks.resnet(channels, "resnets.0")(x, temb)
        x = blocks.transformer(last, "attentions.0")(x, context, layout, reference_mask)
        if c.motion is not None and c.motion.use_mid_block:
            x = blocks.motion(x, layout, last, "motion_modules.0", c.motion.mid_block_transformer_layers)
        return blocks.resnet(channels, "resnets.1")(x, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D (+ motion modules): consumes skips (last first), then upsamples."""

    config: UNetConfig
    index: int  # position in up_blocks (0 = deepest)

    @nn.compact
    def __call__(self, x, skips, temb, context, layout, reference_mask):
        c, blocks = self.config, _Blocks(self.config)
        depth = len(c.block_out_channels) - 1 - self.index  # matching down block
        channels = c.block_out_channels[depth]
        with_attention = c.up_block_types[self.index] == "CrossAttnUpBlock2D"
        for j in range(c.layers_per_block + 1):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = blocks.resnet(channels, f"resnets.{j}")(x, temb)
            if with_attention:
                x = blocks.transformer(depth, f"attentions.{j}")(x, context, layout, reference_mask)
            x = blocks.motion(x, layout, depth, f"motion_modules.{j}")
        if self.index < len(c.block_out_channels) - 1:
            x = Upsample2D(channels, dtype=c.dtype, name="upsamplers.0")(x)
        return x


class UNet(nn.Module):
    """SCD's denoising UNet. Parameters mirror diffusers' names (plus ``pose_encoder``).

    With ``config.motion`` it is the video model: AnimateDiff motion modules after each
    resnet/attention pair (diffusers' ``UNetMotionModel`` names), acting on the target
    frames only (see motion.py); the reference branch is the image model's.

    Calls:
      * diffusers-equivalent: ``apply(v, sample (N, h, w, C), timesteps (N,) or (),
        context (N, L, D)) -> (N, h, w, C_out)``; optional ``target_pose`` (N, H, W, 3).
        A video ``sample`` (B, F, h, w, C) without reference runs its frames as images
        that meet only in the temporal layers (when the UNet has them).
      * SCD joint: ``apply(v, target_latents (B, F, h, w, C) or (B, h, w, C), timesteps (B,),
        context (B, L, D), reference=(B, h, w, C), reference_timesteps=(B,) (default 0),
        reference_pose=(B, H, W, 3), target_pose=(B, F, H, W, 3), reference_mask=(B,))``
        -> the target prediction, shaped like ``target_latents``.
      * stage 1: ``apply(v, reference, reference_timesteps, context, reference_pose,
        method=UNet.extract_reference, mutable=["reference_cache"])``.
      * stage 2: as the joint call without ``reference``, with ``use_reference_cache=True``
        and the cache in the variables: ``{"params": p, "reference_cache": cache}``.
    Pose images are in [0, 1] at ``pose_encoder`` resolution (latent size x its factor).
    """

    config: UNetConfig

    # ------------------------------------------------------------------ public calls

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        *,
        reference: Optional[jax.Array] = None,
        reference_timesteps: Optional[jax.Array] = None,
        reference_pose: Optional[jax.Array] = None,
        target_pose: Optional[jax.Array] = None,
        reference_mask: Optional[jax.Array] = None,
        use_reference_cache: bool = False,
    ) -> jax.Array:
        image_input = sample.ndim == 4
        targets = sample[:, None] if image_input else sample
        self._check_latents(targets, "sample" if reference is None else "target latents", 5)
        b, f = targets.shape[:2]
        t = jnp.repeat(self._per_example(timesteps, b, "timesteps"), f)
        target_pose = self._frames_of(target_pose, b, f, image_input, "target_pose")
        if reference_mask is not None and reference_mask.shape != (b,):
            raise ValueError(f"reference_mask must be ({b},) booleans, got {reference_mask.shape}")
        if reference is None:
            # Targets only: plain images / video frames, or against the reference cache.
            layout = ReferenceLayout("cached" if use_reference_cache else "none", f)
            out = self.forward_images(
                targets.reshape(b * f, *targets.shape[2:]),
                t,
                jnp.repeat(encoder_hidden_states, f, axis=0),
                target_pose,
                layout,
                reference_mask,
            )
        elif use_reference_cache:
            raise ValueError("pass either a reference or use_reference_cache=True, not both")
        else:
            out = self._joint(targets, t, encoder_hidden_states, reference, reference_timesteps,
                              reference_pose, target_pose, reference_mask)
        out = out.reshape(b, f, *out.shape[1:])
        return out[:, 0] if image_input else out

    def extract_reference(
        self,
        reference: jax.Array,
        reference_timesteps: Optional[jax.Array],
        encoder_hidden_states: jax.Array,
        reference_pose: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Stage 1: runs the reference alone; apply with ``mutable=["reference_cache"]``.

        reference (B, h, w, C) -> the reference's own prediction (B, h, w, C_out); the
        cache, ``{path to each attn1: {"key", "value": (B, N_r, H, D)}}``, comes back in
        the mutated ``"reference_cache"`` collection.
        """
        self._check_latents(reference, "reference", 4)
        b = reference.shape[0]
        t = self._reference_timesteps(reference_timesteps, b)
        pose = reference_pose if self.config.reference_pose_injection else None
        return self.forward_images(reference, t, encoder_hidden_states, pose, ReferenceLayout("extract"))

    # ------------------------------------------------------------------ internals

    def _joint(self, targets, t, context, reference, reference_timesteps, reference_pose,
               target_pose, reference_mask):
        """Lays out [reference, target_1..F] per example and runs the joint forward."""
        b, f = targets.shape[:2]
        if reference.shape != (b, *targets.shape[2:]):
            raise ValueError(
                f"reference must be (B, h, w, C) = {(b, *targets.shape[2:])} to match the "
                f"target latents {targets.shape}, got {reference.shape}"
            )
        t_ref = self._reference_timesteps(reference_timesteps, b)
        images = jnp.concatenate([reference[:, None], targets], axis=1)
        times = jnp.concatenate([t_ref[:, None], t.reshape(b, f)], axis=1).reshape(-1)
        pose = self._joint_pose(reference_pose, target_pose, b, f)
        out = self.forward_images(
            images.reshape(b * (1 + f), *images.shape[2:]),
            times,
            jnp.repeat(context, 1 + f, axis=0),
            pose,
            ReferenceLayout("joint", f),
            reference_mask,
        )
        out = out.reshape(b, 1 + f, *out.shape[1:])[:, 1:]
        return out.reshape(b * f, *out.shape[2:])

    def _joint_pose(self, reference_pose, target_pose, b, f):
        """Pose images of the joint batch: (B*(1+F), H, W, 3), or (B*F, ...) of the
        targets alone when reference-pose injection is off (the reference gets none)."""
        if target_pose is None:
            if reference_pose is not None:
                raise ValueError("reference_pose given without target_pose")
            return None
        if not self.config.reference_pose_injection:
            return target_pose
        if reference_pose is None:
            raise ValueError("reference_pose is required when reference_pose_injection is on")
        if reference_pose.shape != (b, *target_pose.shape[1:]):
            raise ValueError(
                f"reference_pose must be {(b, *target_pose.shape[1:])}, got {reference_pose.shape}"
            )
        poses = jnp.concatenate([reference_pose[:, None], target_pose.reshape(b, f, *target_pose.shape[1:])], axis=1)
        return poses.reshape(b * (1 + f), *poses.shape[2:])

    @nn.compact
    def forward_images(self, x, timesteps, context, pose, layout: ReferenceLayout, reference_mask=None):
        """The UNet over a flat batch of images x (N, h, w, C) laid out as ``layout`` says.

        timesteps (N,), context (N, L, D), pose (N, H, W, 3) or None (in the joint
        layout without reference-pose injection: the targets' (B*F, H, W, 3)).
        Returns (N, h, w, C_out) float32.
        """
        c = self.config
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B, L, {c.cross_attention_dim}) with the "
                f"latents' batch, got {context.shape}"
            )
        temb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = TimestepEmbedding(4 * c.block_out_channels[0], c.dtype, name="time_embedding")(temb)
        h = conv3x3(c.block_out_channels[0], "conv_in", c.dtype)(x.astype(c.dtype))
        if pose is not None:
            h = h + self._pose_features(pose, h.shape, layout)
        skips = [h]
        for i in range(len(c.block_out_channels)):
            h, block_skips = DownBlock(c, i, name=f"down_blocks.{i}")(h, temb, context, layout, reference_mask)
            skips.extend(block_skips)
        h = MidBlock(c, name="mid_block")(h, temb, context, layout, reference_mask)
        for i in range(len(c.block_out_channels)):
            h = UpBlock(c, i, name=f"up_blocks.{i}")(h, skips, temb, context, layout, reference_mask)
        h = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, c.dtype, name="conv_norm_out")(h))
        return conv3x3(c.out_channels, "conv_out", c.dtype)(h).astype(jnp.float32)

    def _pose_features(self, pose, feature_shape, layout):
        """Pose images -> features (N, h, w, C0); a reference without injection gets zeros."""
        c = self.config
        if c.pose_block_out_channels is None:
            raise ValueError("pose images given but this UNet has no pose encoder (pose_block_out_channels=None)")
        encoder = PoseEncoder(c.block_out_channels[0], c.pose_block_out_channels, c.dtype, name="pose_encoder")
        factor = encoder.downsample_factor
        skip_reference = layout.mode == "joint" and not c.reference_pose_injection
        n = feature_shape[0] // layout.images_per_example * layout.num_frames if skip_reference else feature_shape[0]
        expected = (n, feature_shape[1] * factor, feature_shape[2] * factor, 3)
        if pose.shape != expected:
            raise ValueError(f"pose images must be {expected} for these latents, got {pose.shape}")
        features = encoder(pose)
        if skip_reference:
            grouped = features.reshape(-1, layout.num_frames, *features.shape[1:])
            grouped = jnp.concatenate([jnp.zeros_like(grouped[:, :1]), grouped], axis=1)
            features = grouped.reshape(feature_shape)
        return features

    def _check_latents(self, latents, name, ndim):
        c = self.config
        if latents.ndim != ndim or latents.shape[-1] != c.in_channels:
            layout = "(B, h, w, C)" if ndim == 4 else "(B, h, w, C) or (B, F, h, w, C)"
            raise ValueError(f"{name} must be {layout} with C={c.in_channels}, got {latents.shape}")
        h, w = latents.shape[-3:-1]
        if h % c.downsample_factor or w % c.downsample_factor:
            raise ValueError(
                f"{name} spatial size {(h, w)} must be divisible by {c.downsample_factor} "
                f"(the UNet downsamples {len(c.block_out_channels) - 1} times)"
            )

    def _per_example(self, timesteps, b, name):
        t = jnp.asarray(timesteps)
        if t.ndim == 0:
            return jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"{name} must be a scalar or ({b},), got {t.shape}")
        return t

    def _reference_timesteps(self, reference_timesteps, b):
        if reference_timesteps is None:
            return jnp.zeros((b,), jnp.int32)
        return self._per_example(reference_timesteps, b, "reference_timesteps")

    def _frames_of(self, pose, b, f, image_input, name):
        """Target pose images (B, [F,] H, W, 3) -> (B*F, H, W, 3)."""
        if pose is None:
            return None
        if image_input and pose.ndim == 4:
            pose = pose[:, None]
        if pose.ndim != 5 or pose.shape[:2] != (b, f):
            raise ValueError(f"{name} must be (B, F, H, W, 3) with B={b}, F={f}, got {pose.shape}")
        return pose.reshape(b * f, *pose.shape[2:])
