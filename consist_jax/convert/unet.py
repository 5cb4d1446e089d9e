"""diffusers UNet folder -> (UNet module, params)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from consist_jax.convert.loading import config_from_file, load_params_from_folder, to_jax_params
from consist_jax.models.pose_encoder import PoseEncoder
from consist_jax.models.unet import UNet, UNetConfig

# Weights SCD adds to a pretrained UNet; they initialise when a checkpoint lacks them.
NEW_WEIGHTS = (r"^pose_encoder\.",)


def init_unet_params(config: UNetConfig, rng: jax.Array) -> dict:
    """Random initial parameters of a UNet (pose encoder included): a plain pytree; with
    ``config.self_attention_key_init="query"`` each self-attention's keys start as its
    queries (``keys_start_as_queries``)."""
    sample, t, context, kwargs = _example_inputs(config)
    params = jax.jit(lambda r: UNet(config).init(r, sample, t, context, **kwargs)["params"])(rng)
    if config.self_attention_key_init == "query":
        params = keys_start_as_queries(params)
    return params


def keys_start_as_queries(params: dict) -> dict:
    """``params`` with every self-attention's (``attn1``) to_k kernel a copy of its to_q kernel.

    The score of a query token x against a key token y is then x^T W W^T y: from the first
    step it is largest where the two tokens' features are alike, so a target token attends
    to the reference tokens that look like it, the copy SCD's target has to learn (the
    background, the clothes). Measured on the demo: BENCHMARKS.md, "Keys that start as the
    queries". Cross-attention (attn2) and motion modules keep their own initialisation.
    """
    flat = traverse_util.flatten_dict(params)
    for path in flat:
        motion = any(part.startswith("motion_modules.") for part in path)  # their temporal attn1 too
        if path[-2] == "to_k" and "attn1" in path and not motion:
            flat[path] = jnp.copy(flat[path[:-2] + ("to_q", path[-1])])
    return traverse_util.unflatten_dict(flat)


def init_pose_encoder_params(config: UNetConfig, rng: jax.Array | None = None) -> dict:
    """Initial pose-encoder parameters alone (cheap: no UNet compile)."""
    encoder = PoseEncoder(config.block_out_channels[0], config.pose_block_out_channels)
    size = encoder.downsample_factor
    pose = jnp.zeros((1, size, size, 3), jnp.float32)
    return encoder.init(rng if rng is not None else jax.random.key(0), pose)["params"]


def _example_inputs(config: UNetConfig):
    """The smallest inputs that create every parameter (pose encoder included)."""
    size = config.downsample_factor
    sample = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    kwargs = {}
    if config.pose_block_out_channels is not None:
        pose_size = size * 2 ** (len(config.pose_block_out_channels) - 1)
        kwargs["target_pose"] = jnp.zeros((1, pose_size, pose_size, 3), jnp.float32)
    return sample, jnp.zeros((1,), jnp.int32), context, kwargs


def unet_param_shapes(config: UNetConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation)."""
    sample, t, context, kwargs = _example_inputs(config)
    return jax.eval_shape(
        lambda r: UNet(config).init(r, sample, t, context, **kwargs)["params"], jax.random.key(0)
    )


def load_unet(folder: str, dtype: Any = jnp.float32, *, rng: jax.Array | None = None, **overrides):
    """Reads a diffusers UNet folder (config.json + diffusion_pytorch_model[.fp16].safetensors
    or a sharded index) into ``(UNet module, params)``.

    ``overrides`` set UNetConfig fields (SCD options such as ``attention_rule``).
    Weights new to SCD (the pose encoder) initialise from ``rng`` when absent.
    ``dtype`` is the parameter dtype and the compute dtype.
    """
    config = config_from_file(UNetConfig.from_diffusers, folder, dtype=dtype, **overrides)
    reference = unet_param_shapes(config)
    if config.pose_block_out_channels is not None:
        # Only the new weights need real values; the rest come from the file.
        reference = dict(reference, pose_encoder=init_pose_encoder_params(config, rng))
    params = load_params_from_folder(
        folder,
        "diffusion_pytorch_model",
        reference,
        may_be_missing=NEW_WEIGHTS,
        dtype=np.dtype(jnp.dtype(dtype)),
    )
    return UNet(config), to_jax_params(params)
