"""The model factory: a model config -> (SCDModel, trainable params, frozen params), from
pretrained folders (through the loaders in convert/) or fresh.

It sits above both models/ (the modules) and convert/ (the weight readers), which it
composes; training, sampling and evaluation build their model here.

``config`` is the ``model`` section of a run config (see configs/):
    backbone:         "unet" (default) or "wan" (the Wan DiT, models/wan_denoiser.py)
    wan:              with backbone "wan": WanTransformerConfig fields (all of them for a fresh
                      DiT; with a pretrained one only remat and dtype apply) plus SCD's options
                      (WAN_SCD_OPTIONS; ``pose`` switches the pose input on)
    pretrained_transformer: a diffusers WanTransformer3DModel folder, or "" for a fresh DiT
    unet:             UNetConfig fields (all of them for a fresh UNet; with a pretrained
                      UNet only SCD's options apply: attention_rule, attention_impl,
                      reference_pose_injection, pose_block_out_channels, remat, dtype)
    pretrained_unet:  a diffusers UNet folder, or "" for a fresh UNet
    pretrained_single_file: one SD-1.x .safetensors file in the LDM layout (instead of
                      pretrained_unet; its VAE too when codec.vae_path is ""), with
                      pretrained_single_file_config (see convert/single_file.py)
    motion:           the video model's motion modules: ``enabled`` plus MotionConfig fields
    motion_adapter:   AnimateDiff motion modules to start from (a MotionAdapter folder or a
                      .safetensors file), or "" for fresh ones (zero output: the video UNet
                      starts equal to the image UNet)
    init_from:        a train.py workdir (the image stage) whose checkpoint's params replace
                      every non-motion param (the trainer applies it, see trainer.py)
    codec:            kind "pixel" (factor), "vae" (vae_path, chunk_size) or "wan_vae" (Wan2.1's
                      causal video VAE, 4x in time: vae_path, a diffusers AutoencoderKLWan folder,
                      or "" for a fresh random one of the architecture ``wan_vae`` (WanVAEConfig
                      fields; {} is Wan2.1's) seeded by ``seed``: for tests and ahead-of-time
                      compiles, never for a real run)
    context:          kind "none" | "text" (a caption embedding in the batch: data.pipeline.
                      text_embeddings_dir) | "embedding" | "hidden_states" (image_encoder_path)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from consist_jax.convert.clip_vision import load_image_encoder
from consist_jax.convert.loading import config_from_file
from consist_jax.convert.motion import adapter_structure, add_motion_params, load_motion_adapter
from consist_jax.convert.single_file import load_unet_single_file, load_vae_single_file
from consist_jax.convert.unet import init_unet_params, load_unet
from consist_jax.convert.vae import load_vae
from consist_jax.convert.wan import load_transformer
from consist_jax.convert.wan_vae import load_wan_vae
from consist_jax.models.clip_vision import CLIPVisionConfig
from consist_jax.models.motion import MotionConfig
from consist_jax.models.scd import (ImageEncoderContext, NullContext, PixelCodec, SCDModel, TextContext, VAECodec,
                                    WanVAECodec)
from consist_jax.models.self_attention import AttentionConfig
from consist_jax.models.unet import UNet, UNetConfig
from consist_jax.models.vae import VAEConfig
from consist_jax.models.wan_denoiser import POSE_IMAGE_CHANNELS, WanDenoiser, WanDenoiserConfig
from consist_jax.models.wan_scd import PosePatchEmbedding, WanSCDConfig, init_wan_scd_params
from consist_jax.models.wan_transformer import WanTransformerConfig
from consist_jax.models.wan_vae import ENCODE_CHUNK_FRAMES, AutoencoderKLWan, WanVAEConfig

# UNetConfig fields a run config may set on top of a pretrained UNet's config.json.
SCD_OPTIONS = (
    "attention_rule", "attention_impl", "reference_pose_injection", "pose_block_out_channels", "remat", "dtype",
    "self_attention_key_init", "cross_attention",  # FRESH_UNET_OPTIONS: only their defaults here
)


def scd_option_defaults() -> dict:
    """SCD's UNet options at UNetConfig's defaults, as a config section (dtype by name)."""
    defaults = {name: getattr(UNetConfig(), name) for name in SCD_OPTIONS}
    return {**defaults, "dtype": jnp.dtype(defaults["dtype"]).name}


BACKBONES = ("unet", "wan")
IMAGE_CONTEXTS = ("embedding", "hidden_states")  # context kinds computed by a CLIP image encoder
# model.wan keys beyond WanTransformerConfig's fields: SCD's options on the DiT.
WAN_SCD_OPTIONS = ("attention_rule", "attention_impl", "pose", "pose_hidden_channels",
                   "reference_pose_injection", "target_frame_start")
# WanTransformerConfig fields a run config may set on top of a pretrained DiT's config.json.
WAN_RUNTIME_OPTIONS = ("remat", "dtype", "sequence_axis")
# The I2V / FLF2V image inputs (None by default): SCD's reference joins as tokens instead,
# so the section leaves them out (WanSCDConfig refuses them).
WAN_I2V_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def wan_option_defaults() -> dict:
    """model.wan at the dataclasses' defaults (WanTransformerConfig, AttentionConfig,
    WanSCDConfig), as a config section (dtype by name, tuples as lists are fine)."""
    transformer = {f.name: getattr(WanTransformerConfig(), f.name) for f in dataclasses.fields(WanTransformerConfig)
                   if f.name not in WAN_I2V_FIELDS}
    transformer["dtype"] = jnp.dtype(transformer["dtype"]).name
    scd = {f.name: f.default for f in dataclasses.fields(WanSCDConfig) if f.name in WAN_SCD_OPTIONS}
    return {**transformer, "attention_rule": AttentionConfig.rule, "attention_impl": AttentionConfig.impl,
            "pose": True, **scd}


def _dtype(name: Any):
    return jnp.dtype(name) if isinstance(name, str) else name


def unet_config_from(unet_cfg: Any) -> UNetConfig:
    """UNetConfig from a config mapping; tuples for sequence fields, dtype names resolved."""
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = set(unet_cfg) - fields
    if unknown:
        raise ValueError(f"unknown model.unet key(s) {sorted(unknown)}; UNetConfig has {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(unet_cfg).items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = _dtype(kwargs["dtype"])
    return UNetConfig(**kwargs)


def backbone(config: Any) -> str:
    name = config.get("backbone", "unet")
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r}: expected one of {BACKBONES}")
    return name


def wan_config_from(wan_cfg: Any, pose_factor: int, transformer: WanTransformerConfig | None = None,
                    pose_temporal_factor: int = 1) -> WanDenoiserConfig:
    """WanDenoiserConfig from model.wan; ``transformer`` (a pretrained DiT's) replaces the
    architecture fields, only WAN_RUNTIME_OPTIONS applying on top. pose_factor,
    pose_temporal_factor: the codec's spatial and temporal factors."""
    fields = {f.name for f in dataclasses.fields(WanTransformerConfig)}
    unknown = set(wan_cfg) - fields - set(WAN_SCD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown model.wan key(s) {sorted(unknown)}; allowed: WanTransformerConfig's "
                         f"{sorted(fields)} and {list(WAN_SCD_OPTIONS)}")
    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(wan_cfg).items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = _dtype(kwargs["dtype"])
    arch = {k: v for k, v in kwargs.items() if k in fields}
    if transformer is None:
        transformer = WanTransformerConfig(**arch)
    else:
        transformer = dataclasses.replace(transformer, **{k: arch[k] for k in WAN_RUNTIME_OPTIONS if k in arch})
    scd = {k: kwargs[k] for k in WAN_SCD_OPTIONS if k in kwargs}
    attention = AttentionConfig(scd.pop("attention_rule", AttentionConfig.rule),
                                scd.pop("attention_impl", AttentionConfig.impl))
    pose = bool(scd.pop("pose", True))
    pose_channels = POSE_IMAGE_CHANNELS * pose_temporal_factor * pose_factor ** 2 if pose else None
    return WanDenoiserConfig(transformer, attention, pose_channels=pose_channels, pose_factor=pose_factor,
                             pose_temporal_factor=pose_temporal_factor, **scd)


def check_paths(config: Any) -> None:
    """Errors (before any compile) naming each pretrained path that is set but missing."""
    paths = {
        "model.pretrained_unet": config.pretrained_unet,
        "model.pretrained_transformer": config.get("pretrained_transformer", ""),
        "model.codec.vae_path": config.codec.get("vae_path", "") if config.codec.kind in ("vae", "wan_vae") else "",
        "model.context.image_encoder_path": (
            config.context.get("image_encoder_path", "") if config.context.kind in IMAGE_CONTEXTS else ""
        ),
    }
    single_file = config.get("pretrained_single_file", "")
    if single_file and config.pretrained_unet:
        raise ValueError("set model.pretrained_unet (a diffusers folder) or model.pretrained_single_file, not both")
    if single_file and not os.path.isfile(single_file):
        raise FileNotFoundError(f"model.pretrained_single_file={single_file!r} does not exist")
    if config.codec.kind == "vae" and not paths["model.codec.vae_path"] and not single_file:
        raise ValueError("model.codec.kind='vae' needs model.codec.vae_path (a diffusers VAE folder)")
    if config.context.kind in IMAGE_CONTEXTS and not paths["model.context.image_encoder_path"]:
        raise ValueError(f"model.context.kind={config.context.kind!r} needs model.context.image_encoder_path")
    for name, path in paths.items():
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"{name}={path!r} does not exist")
    adapter = config.get("motion_adapter", "")
    if adapter and not os.path.exists(adapter):
        raise FileNotFoundError(f"model.motion_adapter={adapter!r} does not exist")
    init_from = config.get("init_from", "")
    if init_from and not os.path.isdir(os.path.join(init_from, "checkpoints")):
        raise FileNotFoundError(f"model.init_from={init_from!r} is not a train.py workdir (no checkpoints/)")
    check_config_files(config, paths)


def check_config_files(config: Any, paths: dict) -> None:
    """Reads every named folder's config.json now, before any work: the UNet's init (or a
    pretrained load) compiles, so a bad VAE, image-encoder, Wan or motion-adapter config
    found after it would cost that time. Errors name the file and the key."""
    readers = {
        "model.pretrained_unet": UNetConfig.from_diffusers,
        "model.pretrained_transformer": WanTransformerConfig.from_diffusers,
        "model.codec.vae_path": (WanVAEConfig if config.codec.kind == "wan_vae" else VAEConfig).from_diffusers,
        "model.context.image_encoder_path": CLIPVisionConfig.from_transformers,
    }
    for name, path in paths.items():
        if path:
            config_from_file(readers[name], path)
    adapter = config.get("motion_adapter", "")
    if adapter and os.path.isdir(adapter):
        config_from_file(adapter_structure, adapter)


def motion_options(config: Any) -> dict:
    """MotionConfig fields from ``model.motion`` (without ``enabled``); a ``frames_axis``
    naming several mesh axes comes as one string, "clips,frames"."""
    motion = dict(config.get("motion") or {})
    motion.pop("enabled", None)
    axis = motion.get("frames_axis")
    if isinstance(axis, str) and "," in axis:
        motion["frames_axis"] = tuple(name.strip() for name in axis.split(","))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in motion.items()}


def is_video_model(config: Any) -> bool:
    return bool((config.get("motion") or {}).get("enabled", False) or config.get("motion_adapter", ""))


def build_model(config: Any, rng: jax.Array, *, init_params: bool = True) -> tuple[SCDModel, Any, dict]:
    """Builds the SCD model described by ``config`` (the run config's ``model`` section).

    With ``init_params=False`` and no pretrained UNet the UNet's params are None (for
    callers that restore them from a checkpoint: no init program is compiled).
    """
    pretrained = is_pretrained_unet(config)
    check_fresh_unet_options(config, init_params)
    check_paths(config)
    if backbone(config) == "wan":
        return _build_wan_model(config, rng, init_params)
    unet_cfg = dict(config.unet)
    if not pretrained and not init_params:
        unet, params = UNet(unet_config_from(unet_cfg)), None
    elif pretrained:
        overrides = {k: v for k, v in unet_cfg.items() if k in SCD_OPTIONS}
        overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
        dtype = _dtype(overrides.pop("dtype", UNetConfig.dtype))
        unet, params = _load_pretrained_unet(config, rng, dtype, overrides)
    else:
        unet_config = unet_config_from(unet_cfg)
        unet, params = UNet(unet_config), init_unet_params(unet_config, rng)
    if is_video_model(config):
        unet, params = _add_motion_modules(config, unet, params, jax.random.fold_in(rng, 1))
    frozen: dict = {}
    codec, frozen = _codec(config.codec, frozen, config)
    context, frozen = _context(config.context, unet.config.cross_attention_dim, frozen)
    return SCDModel(unet, codec, context), params, frozen


# SCD_OPTIONS that shape a fresh UNet: a pretrained UNet, or the DiT, takes only the default.
FRESH_UNET_OPTIONS = {
    "self_attention_key_init": ("initialises a fresh UNet", "initialises the UNet's self-attention"),
    "cross_attention": ("builds a UNet without cross-attention", "leaves out the UNet's cross-attention"),
}


def fresh_unet_option_defaults() -> dict:
    """FRESH_UNET_OPTIONS at UNetConfig's defaults: what a config built on the demo's sets for a
    pretrained UNet or the DiT."""
    return {option: getattr(UNetConfig, option) for option in FRESH_UNET_OPTIONS}


def is_pretrained_unet(config: Any) -> bool:
    """Whether the model section loads UNet weights (a diffusers folder or a single file)."""
    return bool(config.pretrained_unet or config.get("pretrained_single_file", ""))


def check_fresh_unet_options(config: Any, init_params: bool) -> None:
    """FRESH_UNET_OPTIONS away from their defaults are refused with pretrained UNet weights and
    with a fresh DiT (a DiT checkpoint saved with the demo's key init "query" still restores);
    a UNet without cross-attention needs model.context.kind "none". One-line errors."""
    pretrained = is_pretrained_unet(config)
    for option, (for_pretrained, for_dit) in FRESH_UNET_OPTIONS.items():
        default = getattr(UNetConfig, option)
        value = config.unet.get(option, default)
        if value == default:
            continue
        name = f"model.unet.{option}={value!r}"
        if pretrained:
            raise ValueError(f"{name} {for_pretrained}; this run loads a pretrained one "
                             f"(model.pretrained_unet / pretrained_single_file): set it to {default!r}")
        if backbone(config) == "wan" and init_params:
            raise ValueError(f"{name} {for_dit}; model.backbone='wan' builds the DiT, "
                             f"which keeps its own: set it to {default!r}")
    context_kind = (config.get("context") or {}).get("kind", "none")
    if not config.unet.get("cross_attention", UNetConfig.cross_attention) and context_kind != "none":
        raise ValueError(f"model.unet.cross_attention=False leaves the UNet without cross-attention, but "
                         f"model.context.kind={context_kind!r} feeds it a context: set the kind to 'none'")


def _build_wan_model(config: Any, rng: jax.Array, init_params: bool) -> tuple[SCDModel, Any, dict]:
    """The SCD model on the Wan DiT: a pretrained transformer (float32 master params, the
    config's compute dtype) plus a fresh pose embedding, or a fresh DiT."""
    if is_video_model(config) or config.pretrained_unet or config.get("pretrained_single_file", ""):
        raise ValueError("model.backbone='wan' takes no UNet weights or motion modules (model.pretrained_unet, "
                         "pretrained_single_file, motion, motion_adapter): the DiT attends across frames itself")
    codec, frozen = _codec(config.codec, {}, config)
    folder = config.get("pretrained_transformer", "")
    loaded, params = load_transformer(folder, jnp.float32) if folder else (None, None)
    wan_config = wan_config_from(config.wan, codec.factor, loaded and loaded.config, codec.temporal_factor)
    if codec.latent_channels != wan_config.transformer.in_channels:
        raise ValueError(f"model.codec ({config.codec.kind}) gives {codec.latent_channels} latent channels; the DiT "
                         f"reads model.wan.in_channels={wan_config.transformer.in_channels}")
    if folder and wan_config.pose_channels is not None:
        params = {**params, "pose_patch_embedding": _fresh_pose_embedding(wan_config, rng)}
    elif not folder and init_params:
        params = jax.jit(lambda key: init_wan_scd_params(wan_config, key))(rng)
    denoiser = WanDenoiser(wan_config)
    context, frozen = _context(config.context, wan_config.cross_attention_dim, frozen)
    return SCDModel(denoiser, codec, context), params, frozen


def _fresh_pose_embedding(config: WanDenoiserConfig, rng: jax.Array) -> dict:
    c = config.transformer
    pose = jnp.zeros((1, 1, *(2 * p for p in c.patch_size[1:]), config.pose_channels))
    return PosePatchEmbedding(c, config.pose_hidden_channels).init(rng, pose)["params"]


def _load_pretrained_unet(config, rng, dtype, overrides):
    """Parameters stay float32 (the optimiser's master copy); ``dtype`` is the compute dtype."""
    if config.get("pretrained_single_file", ""):
        unet, params = load_unet_single_file(config.pretrained_single_file, config.get(
            "pretrained_single_file_config", ""), jnp.float32, rng=rng, **overrides)
    else:
        unet, params = load_unet(config.pretrained_unet, jnp.float32, rng=rng, **overrides)
    return UNet(dataclasses.replace(unet.config, dtype=dtype)), params


def _add_motion_modules(config: Any, unet: UNet, params: Any, rng: jax.Array):
    """The video UNet: ``unet`` plus motion modules, from ``model.motion_adapter`` or fresh."""
    options = motion_options(config)
    motion_params = None
    if config.get("motion_adapter", ""):
        # The adapter fixes the modules' structure; only runtime options apply on top,
        # and the heads, which original AnimateDiff files do not record.
        keep = ("frames_axis",) if os.path.isdir(config.motion_adapter) else ("frames_axis", "num_attention_heads")
        motion, motion_params = load_motion_adapter(
            config.motion_adapter, **{k: v for k, v in options.items() if k in keep})
    else:
        motion = MotionConfig(**options)
    video = UNet(dataclasses.replace(unet.config, motion=motion))
    if params is None:
        return video, None
    return video, add_motion_params(params, video.config, motion_params, rng)


def wan_vae_config_from(codec_cfg: Any) -> WanVAEConfig:
    """The fresh Wan VAE's architecture: ``model.codec.wan_vae`` (WanVAEConfig fields; {} or
    absent: Wan2.1's), tuples for sequences."""
    arch = dict(codec_cfg.get("wan_vae") or {})
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    unknown = set(arch) - fields
    if unknown:
        raise ValueError(f"unknown model.codec.wan_vae key(s) {sorted(unknown)}; WanVAEConfig has {sorted(fields)}")
    return WanVAEConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in arch.items()})


def _fresh_wan_vae(codec_cfg: Any) -> tuple[AutoencoderKLWan, dict]:
    """A random Wan VAE (tests, ahead-of-time compiles), from ``model.codec.seed`` so train.py
    and sample.py build the same one; a clip of two latent frames creates every parameter."""
    config = wan_vae_config_from(codec_cfg)
    module = AutoencoderKLWan(config)
    size = config.spatial_factor
    video = jnp.zeros((1, 1 + ENCODE_CHUNK_FRAMES, size, size, config.in_channels), jnp.float32)
    params = jax.jit(lambda key: module.init(key, video)["params"])(jax.random.key(int(codec_cfg.get("seed", 0))))
    return module, params


def _codec(codec_cfg: Any, frozen: dict, config: Any):
    if codec_cfg.kind == "pixel":
        return PixelCodec(int(codec_cfg.get("factor", 1))), frozen
    if codec_cfg.kind == "vae":
        if codec_cfg.get("vae_path", ""):
            module, params = load_vae(codec_cfg.vae_path)
        else:  # check_paths: the single file's VAE
            module, params = load_vae_single_file(config.pretrained_single_file,
                                                  config.get("pretrained_single_file_config", ""))
        return VAECodec(module, int(codec_cfg.get("chunk_size", 8))), {**frozen, "vae": params}
    if codec_cfg.kind == "wan_vae":
        if backbone(config) != "wan":
            raise ValueError("model.codec.kind='wan_vae' (4x in time) needs model.backbone='wan': the UNet's "
                             "frames are the video's")
        if codec_cfg.get("vae_path", ""):
            module, params = load_wan_vae(codec_cfg.vae_path)
        else:
            module, params = _fresh_wan_vae(codec_cfg)
        return WanVAECodec(module), {**frozen, "vae": params}
    raise ValueError(f"model.codec.kind={codec_cfg.kind!r}: expected 'pixel', 'vae' or 'wan_vae'")


def _context(context_cfg: Any, dim: int, frozen: dict):
    if context_cfg.kind == "none":
        return NullContext(dim), frozen
    if context_cfg.kind == "text":  # precomputed caption embeddings in the batch (data.pipeline.text_embeddings_dir)
        return TextContext(dim), frozen
    if context_cfg.kind in IMAGE_CONTEXTS:
        module, params = load_image_encoder(context_cfg.image_encoder_path)
        return ImageEncoderContext(module, context_cfg.kind), {**frozen, "image_encoder": params}
    raise ValueError(
        f"model.context.kind={context_cfg.kind!r}: expected 'none', 'text', 'embedding' or 'hidden_states'"
    )
