"""The UMT5 encoder against transformers' UMT5EncoderModel, and its loader.

A tiny random UMT5 (every layer with its own position bias) is saved by transformers,
read back by `load_text_encoder`, and must give transformers' last_hidden_state within
1e-4 relative on random token ids with padding (padded rows included).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import relative_error
from safetensors.numpy import load_file, save_file
from transformers import UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention as TorchUMT5Attention

from consist_jax.convert.loading import CheckpointError
from consist_jax.convert.umt5 import load_text_encoder
from consist_jax.models.umt5 import relative_position_buckets

TOLERANCE = 1e-4
TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
# A second architecture: plain (ungated) ReLU feed forward, 3 layers, an odd bucket count.
RELU = dict(TINY, feed_forward_proj="relu", num_layers=3, num_heads=2, d_kv=16,
            relative_attention_num_buckets=10, relative_attention_max_distance=12)
BATCH, LENGTH = 3, 24  # longer than max_distance: the far buckets are used


@pytest.fixture(scope="module")
def encode():
    """A jitted apply shared by the tests (one compile per module and input shape)."""
    return jax.jit(lambda module, params, ids, mask: module.apply({"params": params}, ids, mask),
                   static_argnums=0)


def _save_transformers_model(folder, seed, config=TINY):
    """A random tiny UMT5EncoderModel saved by transformers; returns the torch model."""
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**config)).eval()
    with torch.no_grad():  # the norms initialise to 1: make them non-trivial
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


def _tokens(rng):
    """Random ids (B, L) with each row padded (id 0, mask 0) after a random length >= 1."""
    lengths = rng.integers(1, LENGTH + 1, BATCH)
    lengths[0] = LENGTH  # one row without padding
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, TINY["vocab_size"], (BATCH, LENGTH)) * mask
    return ids, mask


@pytest.fixture
def saved(tmp_path, rng):
    folder = str(tmp_path / "text_encoder")
    model = _save_transformers_model(folder, int(rng.integers(2**31)))
    return folder, model


@pytest.mark.parametrize("config", [TINY, RELU], ids=["gated_gelu", "relu"])
def test_matches_transformers(tmp_path, rng, encode, config):
    folder = str(tmp_path / "text_encoder")
    model = _save_transformers_model(folder, int(rng.integers(2**31)), config)
    ids, mask = _tokens(rng)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    module, params = load_text_encoder(folder)
    actual = encode(module, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    error = relative_error(actual, expected.last_hidden_state.numpy())
    print(f"umt5 relative error {error:.2e}")
    assert error < TOLERANCE


@pytest.mark.parametrize("buckets,max_distance", [(8, 16), (32, 128), (6, 20)])
def test_relative_buckets_match_transformers(buckets, max_distance):
    """Every relative position in [-299, 299], Wan's (32, 128) included: float32 ties at
    distances whose log ratio is an integer (16, 32, 64 there) land in the same bucket."""
    config = UMT5Config(**dict(TINY, relative_attention_num_buckets=buckets,
                               relative_attention_max_distance=max_distance))
    attention = TorchUMT5Attention(config, has_relative_attention_bias=True)
    relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    expected = attention._relative_position_bucket(relative).numpy()
    np.testing.assert_array_equal(relative_position_buckets(300, 300, buckets, max_distance), expected)


def _resave(src, dst, state):
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    save_file(state, os.path.join(dst, "model.safetensors"))


def test_loader_handles_tied_and_sharded_files(saved, tmp_path, rng, encode):
    folder, _ = saved
    state = load_file(os.path.join(folder, "model.safetensors"))
    module, reference = load_text_encoder(folder)
    ids, mask = _tokens(rng)
    expected = np.asarray(encode(module, reference, jnp.asarray(ids), jnp.asarray(mask)))
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    rest = {k: v for k, v in state.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
    # The embedding under the encoder's name only, or under both names.
    for name, variant in (("tied_only", {**rest, "encoder.embed_tokens.weight": embedding}),
                          ("both", {**rest, "shared.weight": embedding,
                                    "encoder.embed_tokens.weight": embedding})):
        dst = str(tmp_path / name)
        _resave(folder, dst, variant)
        module, params = load_text_encoder(dst)
        np.testing.assert_array_equal(np.asarray(encode(module, params, jnp.asarray(ids), jnp.asarray(mask))),
                                      expected)
    # Two shards and an index.
    dst = str(tmp_path / "sharded")
    shutil.copytree(folder, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    full = {**rest, "shared.weight": embedding}
    keys = sorted(full)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: full[k] for k in names}, os.path.join(dst, shard))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: s for s, names in shards.items() for k in names}}, f)
    module, params = load_text_encoder(dst)
    np.testing.assert_array_equal(np.asarray(encode(module, params, jnp.asarray(ids), jnp.asarray(mask))),
                                  expected)


def test_loader_errors_name_the_key(saved, tmp_path):
    folder, _ = saved
    state = load_file(os.path.join(folder, "model.safetensors"))
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    bias_key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != bias_key}, f"1 missing key.*{bias_key}"),
        "unexpected": ({**state, "decoder.final_layer_norm.weight": embedding[0]},
                       "unexpected key.*decoder.final_layer_norm.weight"),
        "untied": ({**state, "shared.weight": embedding, "encoder.embed_tokens.weight": embedding + 1},
                   "encoder.embed_tokens.weight differs from shared.weight"),
    }
    for name, (variant, message) in cases.items():
        dst = str(tmp_path / name)
        _resave(folder, dst, variant)
        with pytest.raises(CheckpointError, match=message) as error:
            load_text_encoder(dst)
        assert "\n" not in str(error.value)
    dst = str(tmp_path / "t5")
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config, "model_type": "t5"}, f)
    with pytest.raises(ValueError, match="config.json.*not a UMT5 config: model_type='t5'"):
        load_text_encoder(dst)


def test_float16_keeps_wo_float32(saved, rng, encode):
    """transformers keeps the feed-forward `wo` in float32 for a float16 model (it overflows
    float16); so do we, and the half-precision output stays within the float16 roundings
    of the model's ~8 rounding stages per layer (2^-11 each) of the float32 output."""
    folder, model = saved
    ids, mask = _tokens(rng)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    module, params = load_text_encoder(folder, dtype=jnp.float16)
    ff = params["encoder"]["block.1.layer.1"]["DenseReluDense"]
    assert ff["wo"]["kernel"].dtype == jnp.float32 and ff["wi_0"]["kernel"].dtype == jnp.float16
    assert params["shared"]["embedding"].dtype == jnp.float16
    actual = encode(module, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert actual.dtype == jnp.float16
    bound = 8 * TINY["num_layers"] * 2.0**-11
    assert relative_error(np.asarray(actual, np.float32), expected.last_hidden_state.numpy()) < bound
