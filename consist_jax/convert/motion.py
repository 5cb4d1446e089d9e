"""AnimateDiff motion-module checkpoints -> the motion part of our video UNet's params.

Two namings, one mechanism (loading.py):
  * diffusers ``MotionAdapter`` folders (config.json + diffusion_pytorch_model.safetensors):
    keys ``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight``, which
    are already our parameter paths (``UNetMotionModel`` uses the same names);
  * original AnimateDiff files (``mm_sd_v15_v2`` style, converted to safetensors):
    ``...motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight``,
    ``norms.0/1``, ``ff_norm``, mapped by ``ORIGINAL_RENAME_RULES``. They carry no config:
    the structure is read from the tensors, the attention heads (not visible in the
    weights) come from the caller (AnimateDiff's released modules use 8, our default).

The frame-position tables (``pos_embed.pe`` / ``pos_encoder.pe`` buffers) are not
parameters: we compute them. They are still accounted for: each must equal our table
for the configured ``max_seq_length``, or loading fails.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from consist_jax import checks
from consist_jax.convert.loading import (
    PICKLE_SUFFIXES,
    CheckpointError,
    apply_rename_rules,
    config_from_file,
    find_weight_files,
    read_state_dict,
    state_dict_to_params,
)
from consist_jax.convert.unet import load_unet, unet_param_shapes
from consist_jax.models.motion import MotionConfig, TemporalTransformer, sinusoidal_positions
from consist_jax.models.unet import UNet, UNetConfig

# Original AnimateDiff names -> diffusers / ours (the order matters only for readability).
ORIGINAL_RENAME_RULES = (
    (r"\.temporal_transformer\.", "."),
    (r"\.attention_blocks\.0\.", ".attn1."),
    (r"\.attention_blocks\.1\.", ".attn2."),
    (r"\.norms\.0\.", ".norm1."),
    (r"\.norms\.1\.", ".norm2."),
    (r"\.ff_norm\.", ".norm3."),
)
# Sinusoidal frame-position buffers (diffusers: one per block; original: one per attention).
POSITION_TABLES = r"\.pos_(embed|encoder)\.pe$"
MOTION_MODULE = re.compile(r"^motion_modules\.\d+$")


# --------------------------------------------------------------------------- structure


def is_motion_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter path lies inside a motion module."""
    return any(MOTION_MODULE.match(part) for part in path)


def motion_param_shapes(config: UNetConfig) -> dict:
    """The motion-module part of ``config``'s UNet parameter tree, as ShapeDtypeStructs."""
    if config.motion is None:
        raise ValueError("this UNetConfig has no motion modules (config.motion is None)")
    # The parameters do not depend on frame sharding, which would need a mesh to trace.
    unsharded = dataclasses.replace(config, motion=dataclasses.replace(config.motion, frames_axis=None))
    return traverse_util.unflatten_dict(dict(_flat_motion_shapes(unsharded)))


@functools.lru_cache(maxsize=16)
def _flat_motion_shapes(config: UNetConfig) -> tuple:
    """Traces the UNet once per config (abstractly); ((path, ShapeDtypeStruct), ...)."""
    flat = traverse_util.flatten_dict(unet_param_shapes(config))
    return tuple((p, v) for p, v in flat.items() if is_motion_path(p))


def adapter_unet_config(
    motion: MotionConfig, block_out_channels: tuple[int, ...], layers_per_block: int
) -> UNetConfig:
    """The smallest UNetConfig whose motion modules are those of an adapter.

    The motion subtree depends only on block widths, layers per block and ``motion``;
    the rest (no attention, no pose encoder) is whatever makes the skeleton cheapest.
    """
    n = len(block_out_channels)
    return UNetConfig(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        attention_heads=tuple(motion.heads(i) for i in range(n)),
        transformer_layers_per_block=(1,) * n,
        cross_attention_dim=8,
        norm_num_groups=motion.norm_num_groups,
        pose_block_out_channels=None,
        motion=motion,
    )


def _count(keys, prefix: str, child: str) -> int:
    """Number of distinct ``{prefix}{child}.{i}.`` indices among keys."""
    pattern = re.compile(re.escape(prefix) + re.escape(child) + r"\.(\d+)\.")
    return len({m.group(1) for k in keys for m in [pattern.match(k)] if m})


def _structure_from_weights(state: Mapping[str, np.ndarray], overrides: dict):
    """(MotionConfig, block_out_channels, layers_per_block) of a config-less file (our names)."""
    keys = list(state)
    n = _count(keys, "", "down_blocks")
    if n == 0:
        raise CheckpointError("no down_blocks.*.motion_modules.* tensors: not a motion-module checkpoint")
    try:
        channels = tuple(state[f"down_blocks.{i}.motion_modules.0.proj_in.weight"].shape[0] for i in range(n))
    except KeyError as e:
        raise CheckpointError(f"motion checkpoint lacks {e.args[0]}") from e
    layers_per_block = _count(keys, "down_blocks.0.", "motion_modules")
    layers = tuple(_count(keys, f"down_blocks.{i}.motion_modules.0.", "transformer_blocks") for i in range(n))
    inferred = dict(
        transformer_layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        use_mid_block=any(k.startswith("mid_block.") for k in keys),
    )
    if inferred["use_mid_block"]:
        inferred["mid_block_transformer_layers"] = _count(keys, "mid_block.motion_modules.0.", "transformer_blocks")
    tables = [v for k, v in state.items() if re.search(POSITION_TABLES, k)]
    if tables:
        inferred["max_seq_length"] = tables[0].shape[-2]
    return MotionConfig(**{**inferred, **overrides}), channels, layers_per_block


def check_position_tables(state: Mapping[str, np.ndarray], max_seq_length: int, source: str) -> None:
    """Every frame-position buffer must be our sinusoidal table (max_seq_length, C)."""
    for key, table in state.items():
        if not re.search(POSITION_TABLES, key):
            continue
        table = np.asarray(table, np.float32)
        expected = sinusoidal_positions(max_seq_length, table.shape[-1])[None]
        if table.shape != expected.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {table.shape}, a max_seq_length of {max_seq_length} "
                f"needs {expected.shape}"
            )
        if not np.allclose(table, expected, atol=1e-3):  # fp16 files round the table
            raise CheckpointError(f"{source}: {key} is not the sinusoidal frame-position table")


# --------------------------------------------------------------------------- loading


def load_motion_adapter(path: str, *, dtype: Any = jnp.float32, **overrides) -> tuple[MotionConfig, dict]:
    """Reads AnimateDiff motion modules into ``(MotionConfig, params)``.

    Args:
      path: a diffusers ``MotionAdapter`` folder (config.json + safetensors weights), or a
        single ``.safetensors`` file of the original AnimateDiff (or diffusers) naming.
        Pickled ``.ckpt`` / ``.pth`` files are refused with the one-line conversion.
      dtype: parameter dtype.
      overrides: MotionConfig fields, e.g. ``frames_axis="frames"``, or
        ``num_attention_heads`` for an original file (default 8, AnimateDiff's).

    Returns:
      The config and the motion subtree of a video UNet's params:
      ``{"down_blocks.0": {"motion_modules.0": {...}}, "mid_block": ..., "up_blocks.0": ...}``;
      merge it into an image UNet's params with ``add_motion_params``.
    """
    if os.path.isdir(path):
        motion, channels, layers_per_block = config_from_file(adapter_structure, path, **overrides)
        files = find_weight_files(path, "diffusion_pytorch_model")
        state = apply_rename_rules(read_state_dict(files), ORIGINAL_RENAME_RULES)
    elif os.path.isfile(path) or path.endswith(PICKLE_SUFFIXES):  # read_state_dict refuses pickles
        files = [path]
        state = apply_rename_rules(read_state_dict(files), ORIGINAL_RENAME_RULES)
        motion, channels, layers_per_block = _structure_from_weights(state, overrides)
    else:
        raise FileNotFoundError(f"motion checkpoint {path!r} does not exist")
    source = ", ".join(files)
    check_position_tables(state, motion.max_seq_length, source)
    reference = motion_param_shapes(adapter_unet_config(motion, channels, layers_per_block))
    params = state_dict_to_params(
        state,
        reference,
        source=source,
        ignore_unexpected=(POSITION_TABLES,),
        dtype=np.dtype(jnp.dtype(dtype)),
    )
    return motion, jax.tree_util.tree_map(jnp.asarray, params)


def adapter_structure(config: dict, **overrides) -> tuple[MotionConfig, tuple[int, ...], int]:
    """A ``MotionAdapter`` config.json -> (MotionConfig, block_out_channels, layers_per_block),
    checked before any weights are read (config_from_file names the file in any error)."""
    motion = MotionConfig.from_diffusers(config, **overrides)
    channels = checks.positive_ints("block_out_channels", config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = config.get("motion_layers_per_block", 2)
    per_block = checks.positive_ints("motion_layers_per_block", layers) if isinstance(layers, (list, tuple)) \
        else (checks.positive_int("motion_layers_per_block", layers),)
    if len(set(per_block)) != 1:
        raise ValueError(f"motion_layers_per_block={layers}: differs between blocks (our UNet's does not)")
    layers_per_block = per_block[0]
    adapter_unet_config(motion, channels, layers_per_block)  # the remaining ranges (layers, heads vs widths)
    return motion, channels, layers_per_block


def _motion_modules(tree: dict, prefix: tuple = ()):
    """Yields (path, subtree) of every motion module in a params tree."""
    for name, child in tree.items():
        if MOTION_MODULE.match(name):
            yield (*prefix, name), child
        elif isinstance(child, dict):
            yield from _motion_modules(child, (*prefix, name))


def init_motion_params(config: UNetConfig, rng: Optional[jax.Array] = None, dtype: Any = jnp.float32) -> dict:
    """Fresh motion modules for ``config``: random, with zero output projections.

    So the video UNet starts equal to the image UNet.
    """
    return _init_like(motion_param_shapes(config), rng, dtype)


def _init_like(shapes: dict, rng: Optional[jax.Array], dtype: Any) -> dict:
    """Initial values for a motion subtree, module by module (no UNet init: a module's
    parameters depend only on its width and depth, so SD's 21 modules need 3 compiles)."""
    rng = jax.random.key(0) if rng is None else rng
    out = {}
    for index, (path, module_shapes) in enumerate(_motion_modules(shapes)):
        width = module_shapes["proj_in"]["kernel"].shape[0]
        depth = sum(name.startswith("transformer_blocks.") for name in module_shapes)
        params = _module_init(width, depth)(jax.random.fold_in(rng, index))
        for leaf_path, value in traverse_util.flatten_dict(params).items():
            out[(*path, *leaf_path)] = value.astype(dtype)
    return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def _module_init(width: int, depth: int):
    """Compiled ``rng -> params`` of one motion module (heads and groups do not change
    the parameters; 1 fits every width)."""
    module = TemporalTransformer(heads=1, num_layers=depth, groups=1)
    frames = jnp.zeros((1, 1, 1, 1, width))
    return jax.jit(lambda rng: module.init(rng, frames)["params"])


def add_motion_params(
    unet_params: dict, config: UNetConfig, motion_params: Optional[dict] = None, rng: Optional[jax.Array] = None
) -> dict:
    """An image UNet's params plus motion modules -> the video UNet's params for ``config``.

    ``motion_params`` (from ``load_motion_adapter``) must fit ``config`` exactly; without
    them the modules initialise (``init_motion_params``), so the video UNet computes
    what the image UNet computes until trained.
    """
    shapes = motion_param_shapes(config)
    expected = traverse_util.flatten_dict(shapes)
    if motion_params is None:
        motion_params = _init_like(shapes, rng, _params_dtype(unet_params))
    given = traverse_util.flatten_dict(motion_params)
    name = ".".join
    problems = {
        "missing": [name(p) for p in expected if p not in given],
        "unexpected": [name(p) for p in given if p not in expected],
        "misshapen": [
            f"{name(p)} {tuple(given[p].shape)} vs {tuple(s.shape)}"
            for p, s in expected.items()
            if p in given and tuple(given[p].shape) != tuple(s.shape)
        ],
    }
    if any(problems.values()):
        raise CheckpointError(
            "the motion modules do not fit this UNet (block widths, layers or depths differ): "
            + "; ".join(f"{len(v)} {k}, e.g. {', '.join(v[:3])}" for k, v in problems.items() if v)
        )
    flat = traverse_util.flatten_dict(unet_params)
    clash = [p for p in flat if is_motion_path(p)]
    if clash:
        raise ValueError(f"unet_params already hold motion modules, e.g. {'.'.join(clash[0])}")
    flat.update(given)
    return traverse_util.unflatten_dict(flat)


def _params_dtype(params: dict) -> Any:
    leaves = jax.tree_util.tree_leaves(params)
    return leaves[0].dtype if leaves else jnp.float32


def load_video_unet(
    unet_folder: str,
    motion_adapter: Optional[str] = None,
    *,
    dtype: Any = jnp.float32,
    rng: Optional[jax.Array] = None,
    motion_options: Optional[Mapping[str, Any]] = None,
    **overrides,
) -> tuple[UNet, dict]:
    """A diffusers image UNet folder plus AnimateDiff motion modules -> ``(UNet, params)``.

    Args:
      unet_folder: as for ``load_unet``.
      motion_adapter: a path for ``load_motion_adapter``; None initialises the motion
        modules (zero output projections: the video model equals the image model).
      motion_options: MotionConfig fields; with an adapter they override its config
        (e.g. ``frames_axis``), without one they configure the fresh modules.
      overrides: UNetConfig fields (SCD options), as for ``load_unet``.
    """
    options = dict(motion_options or {})
    pose_rng, motion_rng = jax.random.split(jax.random.key(0) if rng is None else rng)
    image_unet, params = load_unet(unet_folder, dtype, rng=pose_rng, **overrides)
    if motion_adapter is not None:
        motion, motion_params = load_motion_adapter(motion_adapter, dtype=dtype, **options)
    else:
        motion, motion_params = MotionConfig(**options), None
    config = dataclasses.replace(image_unet.config, motion=motion)
    return UNet(config), add_motion_params(params, config, motion_params, motion_rng)
