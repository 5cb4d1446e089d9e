"""A model config -> (SCDModel, trainable params, frozen params), from pretrained folders or fresh.

``config`` is the ``model`` section of a run config (see configs/):
    unet:             UNetConfig fields (all of them for a fresh UNet; with a pretrained
                      UNet only SCD's options apply: attention_rule, attention_impl,
                      reference_pose_injection, pose_block_out_channels, remat, dtype)
    pretrained_unet:  a diffusers UNet folder, or "" for a fresh UNet
    codec:            kind "pixel" (factor) or "vae" (vae_path, chunk_size)
    context:          kind "none" | "embedding" | "hidden_states" (image_encoder_path)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from consist_jax.convert.unet import init_unet_params, load_unet
from consist_jax.models.scd import ImageEncoderContext, NullContext, PixelCodec, SCDModel, VAECodec
from consist_jax.models.unet import UNet, UNetConfig

# UNetConfig fields a run config may set on top of a pretrained UNet's config.json.
SCD_OPTIONS = (
    "attention_rule", "attention_impl", "reference_pose_injection", "pose_block_out_channels", "remat", "dtype",
)


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


def check_paths(config: Any) -> None:
    """Errors (before any compile) naming each pretrained path that is set but missing."""
    paths = {
        "model.pretrained_unet": config.pretrained_unet,
        "model.codec.vae_path": config.codec.get("vae_path", "") if config.codec.kind == "vae" else "",
        "model.context.image_encoder_path": (
            config.context.get("image_encoder_path", "") if config.context.kind != "none" else ""
        ),
    }
    if config.codec.kind == "vae" and not paths["model.codec.vae_path"]:
        raise ValueError("model.codec.kind='vae' needs model.codec.vae_path (a diffusers VAE folder)")
    if config.context.kind != "none" and not paths["model.context.image_encoder_path"]:
        raise ValueError(f"model.context.kind={config.context.kind!r} needs model.context.image_encoder_path")
    for name, path in paths.items():
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"{name}={path!r} does not exist")


def build_model(config: Any, rng: jax.Array, *, init_params: bool = True) -> tuple[SCDModel, Any, dict]:
    """Builds the SCD model described by ``config`` (the run config's ``model`` section).

    With ``init_params=False`` and no pretrained UNet the UNet's params are None (for
    callers that restore them from a checkpoint: no init program is compiled).
    """
    check_paths(config)
    unet_cfg = dict(config.unet)
    if not config.pretrained_unet and not init_params:
        unet, params = UNet(unet_config_from(unet_cfg)), None
    elif config.pretrained_unet:
        overrides = {k: v for k, v in unet_cfg.items() if k in SCD_OPTIONS}
        overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
        dtype = _dtype(overrides.pop("dtype", "float32"))
        unet, params = _load_pretrained_unet(config.pretrained_unet, rng, dtype, overrides)
    else:
        unet_config = unet_config_from(unet_cfg)
        unet, params = UNet(unet_config), init_unet_params(unet_config, rng)
    frozen: dict = {}
    codec, frozen = _codec(config.codec, frozen)
    context, frozen = _context(config.context, unet.config.cross_attention_dim, frozen)
    return SCDModel(unet, codec, context), params, frozen


def _load_pretrained_unet(folder, rng, dtype, overrides):
    """Parameters stay float32 (the optimiser's master copy); ``dtype`` is the compute dtype."""
    unet, params = load_unet(folder, jnp.float32, rng=rng, **overrides)
    return UNet(dataclasses.replace(unet.config, dtype=dtype)), params


def _codec(codec_cfg: Any, frozen: dict):
    if codec_cfg.kind == "pixel":
        return PixelCodec(int(codec_cfg.get("factor", 1))), frozen
    if codec_cfg.kind == "vae":
        from consist_jax.models.vae import load_vae

        module, params = load_vae(codec_cfg.vae_path)
        return VAECodec(module, int(codec_cfg.get("chunk_size", 8))), {**frozen, "vae": params}
    raise ValueError(f"model.codec.kind={codec_cfg.kind!r}: expected 'pixel' or 'vae'")


def _context(context_cfg: Any, dim: int, frozen: dict):
    if context_cfg.kind == "none":
        return NullContext(dim), frozen
    if context_cfg.kind in ("embedding", "hidden_states"):
        from consist_jax.models.clip_vision import load_image_encoder

        module, params = load_image_encoder(context_cfg.image_encoder_path)
        return ImageEncoderContext(module, context_cfg.kind), {**frozen, "image_encoder": params}
    raise ValueError(
        f"model.context.kind={context_cfg.kind!r}: expected 'none', 'embedding' or 'hidden_states'"
    )
