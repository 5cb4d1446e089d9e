"""transformers UMT5EncoderModel folder -> (UMT5Encoder module, params)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from consist_jax.convert.loading import (CheckpointError, config_from_file, find_weight_files,
                                         read_state_dict, state_dict_to_params, to_jax_params,
                                         torch_key, torch_to_flax_layout)
from consist_jax.models.umt5 import UMT5Encoder, UMT5EncoderConfig

SHARED_KEY = "shared.weight"
# transformers ties the encoder's token embedding to `shared`; a file may hold either or both.
TIED_KEY = "encoder.embed_tokens.weight"
FLOAT32_MODULE = "wo"  # transformers' UMT5 _keep_in_fp32_modules (float16 models only)


def umt5_param_shapes(config: UMT5EncoderConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda r: UMT5Encoder(config).init(r, ids)["params"], jax.random.key(0))


def _untie_embedding(state: dict, source: str) -> dict:
    """The state with the token embedding under `shared.weight` only.

    A file may store it as `shared.weight`, as `encoder.embed_tokens.weight`, or both
    (then they must be equal: they are one tied tensor in transformers).
    """
    if TIED_KEY not in state:
        return state
    state = dict(state)
    tied = state.pop(TIED_KEY)
    if SHARED_KEY not in state:
        state[SHARED_KEY] = tied
    elif state[SHARED_KEY].shape != tied.shape or not np.array_equal(state[SHARED_KEY], tied):
        raise CheckpointError(f"{source}: {TIED_KEY} differs from {SHARED_KEY}; UMT5 ties them "
                              f"(one token embedding), so the file is inconsistent")
    return state


def load_text_encoder(folder: str, dtype: Any = jnp.float32, **overrides):
    """Reads a transformers UMT5EncoderModel folder (config.json + model.safetensors, its
    fp16 variant or a sharded index) into ``(UMT5Encoder module, params)``.

    Every tensor is accounted for (missing, unexpected and misshapen keys are one-line
    CheckpointErrors naming them). ``dtype`` is the parameter and compute dtype (with
    float16 the feed-forward output projections ``wo`` stay float32, as in transformers);
    ``overrides`` set UMT5EncoderConfig fields. Apply with
    ``module.apply({"params": params}, input_ids, attention_mask)``.
    """
    config = config_from_file(UMT5EncoderConfig.from_transformers, folder, dtype=dtype, **overrides)
    paths = find_weight_files(folder, "model")
    source = ", ".join(paths)
    state = _untie_embedding(read_state_dict(paths), source)
    params = state_dict_to_params(state, umt5_param_shapes(config), source=source,
                                  dtype=np.dtype(jnp.dtype(dtype)))
    return UMT5Encoder(config), to_jax_params(_float32_modules_from_state(params, state, config))


def _float32_modules_from_state(params: dict, state: dict, config: UMT5EncoderConfig) -> dict:
    """`params` with the feed-forward `wo` weights re-read from the file in
    `config.wo_dtype` (float32 for a float16 model, as transformers keeps them)."""
    if jnp.dtype(config.wo_dtype) == jnp.dtype(config.dtype):
        return params
    flat = traverse_util.flatten_dict(params)
    wo_dtype = np.dtype(jnp.dtype(config.wo_dtype))
    for path in flat:
        if FLOAT32_MODULE in path:
            flat[path] = torch_to_flax_layout(path, state[torch_key(path)]).astype(wo_dtype)
    return traverse_util.unflatten_dict(flat)
