"""Precomputed caption embeddings: computed once with the (tiny) UMT5 encoder, written as
safetensors shards, read back per caption id exactly as the encoder produced them."""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist_jax.data import text_embeddings as te
from consist_jax.models.umt5 import UMT5Encoder, UMT5EncoderConfig

CONFIG = UMT5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16)
MAX_LENGTH = 12
BATCH = 2


def _tokenize(texts):
    """A stand-in tokenizer: one id per character (+ EOS 1), padded to MAX_LENGTH."""
    ids = np.zeros((len(texts), MAX_LENGTH), np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = [2 + ord(ch) % 60 for ch in text][: MAX_LENGTH - 1] + [1]
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return ids, mask


@pytest.fixture(scope="module")
def encoder():
    module = UMT5Encoder(CONFIG)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, MAX_LENGTH), jnp.int32))["params"]
    return jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))


def _captions(rng, count):
    letters = np.array(list("abcdefghij "))
    return {f"video_{i:03d}": "".join(rng.choice(letters, rng.integers(0, 15))) for i in range(count)}


@pytest.mark.parametrize("dtype", te.DTYPES)
def test_round_trip_equals_the_encoder(tmp_path, rng, encoder, dtype):
    captions = _captions(rng, 5)  # odd count: the last batch is filled up
    folder = str(tmp_path / "embeddings")
    count = te.write_text_embeddings(folder, te.compute_text_embeddings(encoder, _tokenize, captions, BATCH),
                                     MAX_LENGTH, dtype=dtype, captions_per_shard=2)
    assert count == 5 and len(os.listdir(folder)) == 3 + 1  # three shards and the index
    table = pickle.loads(pickle.dumps(te.TextEmbeddings(folder)))  # as a grain worker gets it
    assert sorted(table.caption_ids) == sorted(captions) and len(table) == 5
    for caption_id, text in captions.items():
        ids, mask = _tokenize([text] * BATCH)  # the batch shape already compiled
        expected = np.asarray(encoder(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))[0]
        embedding, got_mask = table.lookup(caption_id)
        np.testing.assert_array_equal(got_mask, mask[0] == 1)
        n = int(mask[0].sum())
        # Batched and single-row encodes agree to float32 rounding; storage rounds to dtype.
        np.testing.assert_allclose(embedding[:n], expected[:n].astype(dtype), rtol=1e-3 if dtype == "float16"
                                   else 1e-5, atol=1e-5)
        np.testing.assert_array_equal(embedding[n:], 0.0)


def test_missing_caption_and_bad_folders_are_one_line_errors(tmp_path, rng):
    folder = str(tmp_path / "embeddings")
    te.write_text_embeddings(folder, [("a", rng.standard_normal((3, 4))), ("b", rng.standard_normal((5, 4)))],
                             max_length=6)
    table = te.TextEmbeddings(folder)
    assert "a" in table and "c" not in table
    with pytest.raises(te.TextEmbeddingError, match="caption id 'c' is not in the text embeddings at .* "
                                                     r"\(2 captions\)") as error:
        table.lookup("c")
    assert "\n" not in str(error.value)
    with pytest.raises(te.TextEmbeddingError, match="caption id 'a' appears twice"):
        te.write_text_embeddings(str(tmp_path / "twice"), [("a", np.zeros((1, 4)))] * 2, max_length=6)
    with pytest.raises(te.TextEmbeddingError, match=r"caption id 'long': embedding shape \(7, 4\)"):
        te.write_text_embeddings(str(tmp_path / "long"), [("long", np.zeros((7, 4)))], max_length=6)
    with pytest.raises(te.TextEmbeddingError, match="not a text-embeddings folder"):
        te.TextEmbeddings(str(tmp_path / "nowhere"))
    index_path = os.path.join(folder, te.INDEX_NAME)
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump({**index, "shards": ["../escape.safetensors"]}, f)
    with pytest.raises(te.TextEmbeddingError, match="not a .safetensors file name in the folder"):
        te.TextEmbeddings(folder)
