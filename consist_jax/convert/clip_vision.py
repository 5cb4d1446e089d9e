"""transformers CLIP folder -> (CLIPVisionModelWithProjection, params), and its
image processor's ``preprocessor_config.json`` -> CLIPPreprocessConfig."""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from consist_jax.convert.loading import config_from_file, load_params_from_folder, read_config, to_jax_params
from consist_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection, clip_vision_param_shapes
from consist_jax.models.image_preprocessing import CLIPPreprocessConfig

# Keys of a checkpoint this model holds no tensor for: a non-persistent buffer older
# transformers saved, and the text half of a full CLIPModel file.
IGNORED_BUFFERS = (r"^vision_model\.embeddings\.position_ids$",)
TEXT_TOWER_KEYS = (r"^text_model\.", r"^text_projection\.", r"^logit_scale$")


def load_image_encoder(folder: str, dtype: Any = jnp.float32) -> tuple[CLIPVisionModelWithProjection, dict]:
    """Reads a transformers CLIP folder into ``(CLIPVisionModelWithProjection, params)``.

    The folder holds ``config.json`` (a ``CLIPVisionConfig``, or a full ``CLIPConfig``
    whose text tower is then skipped) and ``model.safetensors`` (or ``model.fp16.safetensors``,
    or a sharded index). ``dtype`` is the parameter and compute dtype. Apply with
    ``{"params": params}``.
    """
    raw = read_config(folder)
    config = config_from_file(CLIPVisionConfig.from_transformers, folder, dtype=dtype)
    ignored = IGNORED_BUFFERS + (TEXT_TOWER_KEYS if raw.get("model_type") == "clip" else ())
    params = load_params_from_folder(
        folder,
        "model",
        clip_vision_param_shapes(config),
        ignore_unexpected=ignored,
        dtype=np.dtype(jnp.dtype(dtype)),
    )
    return CLIPVisionModelWithProjection(config), to_jax_params(params)


def load_preprocess_config(folder: str) -> CLIPPreprocessConfig:
    """``folder/preprocessor_config.json`` if present, else the OpenAI CLIP defaults."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return CLIPPreprocessConfig()
    return config_from_file(CLIPPreprocessConfig.from_transformers, folder, "preprocessor_config.json")
