"""The CLIP ViT image encoder (transformers' ``CLIPVisionModelWithProjection``) in Flax.

SCD replaces SD's text encoder with this tower: the UNet's cross-attention context is
either the projected image embedding (one token) or the projected patch tokens.

Inputs are NHWC ``pixel_values`` (B, S, S, 3), already CLIP-normalised
(``consist_jax.models.image_preprocessing.preprocess_images``). With T = 1 + (S / patch)^2
tokens (the class token first) the model returns:

  * ``image_embeds`` (B, P): post_layernorm(class token) @ visual_projection, exactly
    transformers' ``image_embeds``;
  * ``last_hidden_state`` (B, T, hidden): the last encoder layer's output (no final norm),
    transformers' ``last_hidden_state``;
  * ``projected_tokens`` (B, T, P), on request: post_layernorm + visual_projection applied
    to every token (row 0 equals ``image_embeds``). These are the "patch tokens as
    context" of IP-Adapter-style use, in the same space as the image embedding;
  * ``hidden_states``, on request: a tuple of num_hidden_layers + 1 arrays (B, T, hidden),
    the encoder input (after pre_layrnorm) then each layer's output, as transformers'
    ``output_hidden_states`` (IP-Adapter Plus reads ``hidden_states[-2]``).

Parameter names mirror transformers' (``vision_model.encoder.layers.3.self_attn.q_proj``),
so ``model.safetensors`` maps onto them by ``consist_jax.convert.clip_vision.load_image_encoder``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from consist_jax import checks
from consist_jax.models.image_preprocessing import CLIP_MEAN, CLIP_STD
from consist_jax.models.attention import dot_product_attention

Dtype = Any

# transformers' ACT2FN names -> the same functions.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower (transformers names; defaults: ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "num_channels", "image_size", "patch_size"):
            checks.positive_int(name, getattr(self, name))
        checks.positive_number("layer_norm_eps", self.layer_norm_eps)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIP hidden_act={self.hidden_act!r} not supported: one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP hidden_size={self.hidden_size} not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIP image_size={self.image_size} not divisible by patch_size={self.patch_size}"
            )

    @property
    def num_tokens(self) -> int:
        """1 (class token) + patches."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: dict, **overrides) -> "CLIPVisionConfig":
        """From a ``CLIPVisionConfig`` dict, or a full ``CLIPConfig`` dict (its vision_config).

        Missing keys take transformers' defaults (``save_pretrained`` may omit them).
        A full CLIPConfig's top-level ``projection_dim`` sizes ``visual_projection``.
        """
        model_type = config.get("model_type")
        if model_type == "clip":
            vision = dict(config.get("vision_config") or {})
            if "projection_dim" in config:
                vision["projection_dim"] = config["projection_dim"]
        elif model_type == "clip_vision_model":
            vision = dict(config)
        else:
            raise ValueError(
                f"not a CLIP vision config: model_type={model_type!r}"
                f"{_class_hint(config)}; expected 'clip_vision_model' or 'clip'"
            )
        kwargs = {f.name: vision[f.name] for f in dataclasses.fields(cls) if f.name in vision}
        for key in ("image_size", "patch_size"):
            if key in kwargs:
                kwargs[key] = _square(key, kwargs[key])
        kwargs.update(overrides)
        return cls(**kwargs)


def _class_hint(config: dict) -> str:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    return f" (config of {name})" if name else ""


def _square(key: str, value: Any) -> int:
    """transformers allows (h, w) sizes; the position table here assumes square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"CLIP {key}={value} not supported (square only)")
        return int(value[0])
    return int(value)


# --------------------------------------------------------------------------- modules


def _layer_norm(config: CLIPVisionConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm computes it.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.dtype, use_fast_variance=False, name=name
    )


class CLIPVisionEmbeddings(nn.Module):
    """pixel_values (B, S, S, C) -> tokens (B, T, hidden): [class ; patches] + positions."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        patches = nn.Conv(
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=c.dtype, name="patch_embedding",
        )(pixel_values)
        b = patches.shape[0]
        # Row-major over the (h, w) grid: the order torch's flatten(2) gives.
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size))
        tokens = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(c.num_tokens, c.hidden_size, dtype=c.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(c.num_tokens))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections: (B, T, D) -> (B, T, D)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        heads = c.num_attention_heads

        def project(name):
            return nn.Dense(d, dtype=c.dtype, name=name)(x).reshape(b, t, heads, d // heads)

        out = dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"))
        return nn.Dense(d, dtype=c.dtype, name="out_proj")(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    """fc1, activation, fc2: (B, T, D) -> (B, T, D)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=c.dtype, name="fc1")(x)
        x = ACTIVATIONS[c.hidden_act](x)
        return nn.Dense(c.hidden_size, dtype=c.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: (B, T, D) -> (B, T, D)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.config, name="self_attn")(_layer_norm(self.config, "layer_norm1")(x))
        return x + CLIPMLP(self.config, name="mlp")(_layer_norm(self.config, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The layer stack: (B, T, D) -> tuple of num_hidden_layers + 1 states (input first)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, name=f"layers.{i}")(states[-1]))
        return tuple(states)


class CLIPVisionTransformer(nn.Module):
    """pixel_values (B, S, S, C) -> (encoder states (input first), post_layernorm of every token)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        x = CLIPVisionEmbeddings(self.config, name="embeddings")(pixel_values)
        x = _layer_norm(self.config, "pre_layrnorm")(x)  # sic: transformers' spelling
        states = CLIPEncoder(self.config, name="encoder")(x)
        # LayerNorm is per token, so norming all tokens and reading row 0 equals
        # transformers' post_layernorm(last_hidden_state[:, 0]).
        return states, _layer_norm(self.config, "post_layernorm")(states[-1])


@flax.struct.dataclass
class CLIPVisionOutput:
    """See the module docstring for shapes; optional fields are None unless requested."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    projected_tokens: Optional[jax.Array] = None
    hidden_states: Optional[tuple[jax.Array, ...]] = None


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection``: pixel_values (B, S, S, C) -> CLIPVisionOutput."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(
        self,
        pixel_values: jax.Array,
        output_projected_tokens: bool = False,
        output_hidden_states: bool = False,
    ) -> CLIPVisionOutput:
        _check_pixel_values(self.config, pixel_values)
        states, normed = CLIPVisionTransformer(self.config, name="vision_model")(
            pixel_values.astype(self.config.dtype)
        )
        project = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=self.config.dtype, name="visual_projection"
        )
        projected = project(normed if output_projected_tokens else normed[:, :1])
        return CLIPVisionOutput(
            image_embeds=projected[:, 0],
            last_hidden_state=states[-1],
            projected_tokens=projected if output_projected_tokens else None,
            hidden_states=states if output_hidden_states else None,
        )


def _check_pixel_values(config: CLIPVisionConfig, pixel_values: jax.Array) -> None:
    """Shape and dtype checks (static, so they hold under jit)."""
    expected = (config.image_size, config.image_size, config.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"CLIP pixel_values: expected NHWC (B, {', '.join(map(str, expected))}), got "
            f"{tuple(pixel_values.shape)}; resize and crop with preprocess_images first"
        )
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise TypeError(
            f"CLIP pixel_values: expected floating CLIP-normalised values, got {pixel_values.dtype}; "
            "use preprocess_images on uint8 images"
        )


# --------------------------------------------------------------------------- loading


def clip_vision_param_shapes(config: CLIPVisionConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation)."""
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    module = CLIPVisionModelWithProjection(config)
    return jax.eval_shape(lambda r, x: module.init(r, x)["params"], jax.random.key(0), pixels)


@functools.partial(jax.jit, static_argnames=("module", "output_projected_tokens", "output_hidden_states"))
def encode_images(
    module: CLIPVisionModelWithProjection,
    params: dict,
    pixel_values: jax.Array,
    output_projected_tokens: bool = False,
    output_hidden_states: bool = False,
) -> CLIPVisionOutput:
    """Jitted ``module.apply``: pixel_values (B, S, S, C) -> CLIPVisionOutput."""
    return module.apply(
        {"params": params},
        pixel_values,
        output_projected_tokens=output_projected_tokens,
        output_hidden_states=output_hidden_states,
    )


def embed_images(
    module: CLIPVisionModelWithProjection,
    params: dict,
    images: jax.Array,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> CLIPVisionOutput:
    """images (B, H, W, 3) in [-1, 1] -> CLIPVisionOutput, preprocessed in JAX (usable in jit).

    For frames already square-cropped by the data pipeline: an antialiased bicubic
    resize to the encoder's size (jax.image.resize; PIL's resampling differs by its
    filter, see ``preprocess_images`` for the host path that matches transformers),
    then CLIP's normalisation.
    """
    size = module.config.image_size
    b = images.shape[0]
    unit = (images.astype(jnp.float32) + 1.0) / 2.0
    resized = jax.image.resize(unit, (b, size, size, images.shape[-1]), "bicubic", antialias=True)
    pixels = (resized - jnp.asarray(mean)) / jnp.asarray(std)
    return module.apply({"params": params}, pixels)
