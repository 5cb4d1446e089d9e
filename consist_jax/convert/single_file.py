"""One SD-1.x ``.safetensors`` file in the original LDM / CompVis key layout -> UNet and VAE.

Fine-tuned SD-1.5 models are shared as one file holding every component under the
names of the original code base: the UNet under ``model.diffusion_model.``
(``input_blocks.4.1.proj_in.weight``), the VAE under ``first_stage_model.``
(``encoder.down.1.block.0.nin_shortcut.weight``) and the CLIP text encoder under
``cond_stage_model.``. This module reads the UNet and the VAE from such a file into the
same ``(module, params)`` that ``load_unet`` / ``load_vae`` read from a diffusers folder
of the same weights (bit for bit).

The architecture is not inferred from the tensors: it is the SD-1.5 config built in here
(``SD15_UNET_CONFIG``, ``SD15_VAE_CONFIG``) or the ``unet/`` and ``vae/`` config.json of a
diffusers folder given by the caller. The key names follow from that config
(``unet_ldm_key`` / ``vae_ldm_key``: the inverse of diffusers' ``convert_ldm_unet_checkpoint``
and ``convert_ldm_vae_checkpoint``), and every tensor of the file is accounted for: each
key is the UNet's, the VAE's, or one of the parts we deliberately ignore (``IGNORED_PREFIXES``,
``IGNORED_KEYS``); any other key, a missing key and a shape that differs from the config's
are one-line CheckpointErrors naming the file's key.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from consist_jax.convert.loading import (
    PICKLE_SUFFIXES, CheckpointError, CheckpointFormatError, config_from_file, read_safetensors_header,
    state_dict_to_params, to_jax_params, torch_key)
from consist_jax.convert.unet import NEW_WEIGHTS, init_pose_encoder_params, unet_param_shapes
from consist_jax.models.unet import UNet, UNetConfig
from consist_jax.models.vae import AutoencoderKL, VAEConfig, vae_param_shapes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Parts of a full SD-1.x file that SCD does not use: the text encoder (SCD is conditioned
# on the reference image, not on text) and the EMA copy of the UNet (diffusers' single-file
# loader also reads the non-EMA weights by default; EMA-only files hold them as the UNet).
IGNORED_PREFIXES = ("cond_stage_model.", "model_ema.")
# The training schedule's buffers (LatentDiffusion's register_schedule), and its logvar.
IGNORED_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
)

# The diffusers config.json of SD-1.5's UNet and VAE (runwayml/stable-diffusion-v1-5).
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Inside a resnet the two code bases name the layers differently.
_UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                      "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_first(rest: str, names: Mapping[str, str]) -> str:
    """``rest`` with its leading layer name (a key of ``names``) replaced."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_ldm_key(key: str, config: UNetConfig) -> str:
    """A diffusers UNet key -> its name in an LDM file (without ``UNET_PREFIX``).

    LDM numbers the UNet's layers in one list per half: ``input_blocks.0`` is conv_in, then
    each down block's ``layers_per_block`` (resnet, attention) pairs and its downsampler;
    ``output_blocks`` hold each up block's ``layers_per_block + 1`` layers, the last with
    the upsampler after its attention (``.2``) or after its resnet (``.1``).
    """
    per_block = config.layers_per_block + 1
    renamed = _rename_first(key, _UNET_TOP_LEVEL)
    if renamed != key:
        return renamed
    match = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if match:
        half, block, kind, index, rest = match.groups()
        block, index = int(block), int(index)
        if half == "down":
            layer = 1 + block * per_block + (config.layers_per_block if kind == "downsamplers" else index)
            place = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[kind]
            if kind == "downsamplers":
                rest = rest.removeprefix("conv.")
            return f"input_blocks.{layer}.{place}.{_resnet(kind, rest)}"
        layer = block * per_block + (config.layers_per_block if kind == "upsamplers" else index)
        has_attention = config.up_block_types[block].startswith("CrossAttn")
        place = {"resnets": "0", "attentions": "1", "upsamplers": "2" if has_attention else "1"}[kind]
        return f"output_blocks.{layer}.{place}.{_resnet(kind, rest)}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        kind, index, rest = match.groups()
        layer = 2 * int(index) if kind == "resnets" else 1  # resnet, attention, resnet
        return f"middle_block.{layer}.{_resnet(kind, rest)}"
    raise CheckpointError(f"UNet parameter {key!r} has no place in the LDM key layout (not an SD-1.x UNet)")


def _resnet(kind: str, rest: str) -> str:
    return _rename_first(rest, _UNET_RESNET_NAMES) if kind == "resnets" else rest


def vae_ldm_key(key: str, config: VAEConfig) -> str:
    """A diffusers VAE key -> its name in an LDM file (without ``VAE_PREFIX``).

    LDM numbers the decoder's up blocks from the bottom (``decoder.up.0`` is diffusers'
    last up block) and calls the mid block's layers ``block_1``, ``attn_1``, ``block_2``.
    """
    last = len(config.block_out_channels) - 1
    renames = [
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_NAMES[m[2]]}."),
    ]
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _is_vae_attention_kernel(ldm_key: str) -> bool:
    """LDM's VAE attention projections are 1x1 convolutions (O, I, 1, 1), diffusers' linear."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


# --------------------------------------------------------------------------- the file


def check_single_file(path: str) -> dict[str, dict]:
    """The checked safetensors header of an LDM single file; every key must be accounted for.

    Raises:
      FileNotFoundError / CheckpointFormatError naming ``path``; CheckpointError naming the
      first key that is neither the UNet's, the VAE's nor one we ignore.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"single-file checkpoint {path!r} does not exist")
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointFormatError(f"{path!r} is a pickled checkpoint; convert it to .safetensors first "
                                    "(see consist_jax.convert.loading)")
    header = read_safetensors_header(path)
    if not any(key.startswith(UNET_PREFIX) for key in header):
        raise CheckpointError(f"{path!r} holds no {UNET_PREFIX}* keys: not an SD-1.x single-file "
                              f"checkpoint in the LDM / CompVis layout (a diffusers folder is read by "
                              f"model.pretrained_unet)")
    known = (UNET_PREFIX, VAE_PREFIX) + IGNORED_PREFIXES
    for key in sorted(header):
        if not key.startswith(known) and key not in IGNORED_KEYS:
            raise CheckpointError(f"{path!r}: unknown key {key!r}; an SD-1.x single file holds "
                                  f"{', '.join(p + '*' for p in known)} and the schedule buffers")
    return header


def _read_tensors(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The named tensors of a checked safetensors file (not the rest: a full SD file also
    holds a text encoder)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return {key: f.get_tensor(key) for key in keys}


def _load_component(path: str, header: Mapping[str, dict], prefix: str, reference: Any,
                    ldm_key: Callable[[str], str], dtype: Any,
                    keep: Callable[[str], bool] = lambda key: False) -> dict:
    """The ``prefix`` part of an LDM file (``header``: its checked header) mapped onto
    ``reference`` (our parameter tree).

    The reference is renamed to the file's keys, so the one mapping (``state_dict_to_params``)
    checks every key and shape and its errors name the file's keys. Parameters for which
    ``keep(torch key)`` holds are not in the file and keep the reference's values.
    """
    keys = [key for key in header if key.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"{path!r} holds no {prefix}* keys")
    renamed, ours_by_ldm, kept = {}, {}, {}
    for our_path, value in traverse_util.flatten_dict(reference).items():
        key = torch_key(our_path)
        if keep(key):
            kept[our_path] = np.asarray(value).astype(dtype)
            continue
        # (the file key's module, our leaf name): torch_key of it is the file's key.
        ldm_path = ((prefix + ldm_key(key)).rpartition(".")[0], our_path[-1])
        renamed[ldm_path], ours_by_ldm[ldm_path] = value, our_path
    state = _read_tensors(path, keys)
    for key, value in state.items():
        if _is_vae_attention_kernel(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            state[key] = value[:, :, 0, 0]
    params = state_dict_to_params(state, traverse_util.unflatten_dict(renamed),
                                  source=f"{path!r} ({prefix}*)", dtype=dtype)
    flat = {ours_by_ldm[ldm]: value for ldm, value in traverse_util.flatten_dict(params).items()}
    return traverse_util.unflatten_dict({**flat, **kept})


def _config(from_dict, config_folder: str, component: str, builtin: dict, **overrides):
    """The component's config: ``config_folder/component/config.json``, or the built-in one."""
    if config_folder:
        return config_from_file(from_dict, os.path.join(config_folder, component), **overrides)
    return from_dict(builtin, **overrides)


def load_unet_single_file(path: str, config_folder: str = "", dtype: Any = jnp.float32, *,
                          rng: Optional[jax.Array] = None, **overrides) -> tuple[UNet, dict]:
    """The UNet of an LDM single file -> ``(UNet module, params)``, as ``load_unet`` reads it
    from a diffusers folder.

    Args:
      path: the ``.safetensors`` file (``model.diffusion_model.*`` keys).
      config_folder: a diffusers folder whose ``unet/config.json`` gives the architecture;
        "" for SD-1.5's (``SD15_UNET_CONFIG``).
      dtype: the parameter and compute dtype.
      rng: initialises the weights SCD adds (the pose encoder), which the file lacks.
      overrides: UNetConfig fields (SCD options such as ``attention_rule``).
    """
    header = check_single_file(path)  # before any work
    config = _config(UNetConfig.from_diffusers, config_folder, "unet", SD15_UNET_CONFIG,
                     dtype=dtype, **overrides)
    reference = unet_param_shapes(config)
    if config.pose_block_out_channels is not None:
        reference = dict(reference, pose_encoder=init_pose_encoder_params(config, rng))
    new_weights = [re.compile(p) for p in NEW_WEIGHTS]
    params = _load_component(path, header, UNET_PREFIX, reference, lambda key: unet_ldm_key(key, config),
                             np.dtype(jnp.dtype(dtype)), keep=lambda key: any(p.search(key) for p in new_weights))
    return UNet(config), to_jax_params(params)


def load_vae_single_file(path: str, config_folder: str = "",
                         dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict]:
    """The VAE of an LDM single file (``first_stage_model.*`` keys) -> ``(AutoencoderKL, params)``,
    as ``load_vae`` reads it from a diffusers folder; ``config_folder`` as for the UNet
    (its ``vae/config.json``; "" for SD-1.5's)."""
    header = check_single_file(path)
    config = _config(VAEConfig.from_diffusers, config_folder, "vae", SD15_VAE_CONFIG, dtype=dtype)
    params = _load_component(path, header, VAE_PREFIX, vae_param_shapes(config), lambda key: vae_ldm_key(key, config),
                             np.dtype(jnp.dtype(dtype)))
    return AutoencoderKL(config), to_jax_params(params)


def to_ldm_state_dict(unet_state: Mapping[str, np.ndarray], unet_config: UNetConfig,
                      vae_state: Mapping[str, np.ndarray] = {}, vae_config: Optional[VAEConfig] = None
                      ) -> dict[str, np.ndarray]:
    """Diffusers-named UNet (and VAE) state dicts -> one LDM-layout state dict (export, tests).

    The VAE's attention projections become 1x1 convolutions, as LDM stores them.
    """
    out = {UNET_PREFIX + unet_ldm_key(key, unet_config): value for key, value in unet_state.items()}
    for key, value in vae_state.items():
        ldm = VAE_PREFIX + vae_ldm_key(key, vae_config)
        out[ldm] = value[:, :, None, None] if _is_vae_attention_kernel(ldm) and value.ndim == 2 else value
    return out
