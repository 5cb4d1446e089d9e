"""Captions encoded from a local UMT5 folder (convert/caption_encoder.py): tokenized, encoded and
zero-padded as diffusers' WanPipeline does, against transformers' UMT5EncoderModel; the command
writes the text-embeddings folder the data pipeline and sample.py read."""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from consist_jax.convert import caption_encoder
from consist_jax.data import text_embeddings as te
from tests.test_umt5 import TINY, TOLERANCE, _save_transformers_model

WORDS = ["a", "person", "walks", "waves", "dances", "slowly", "in", "the", "park"]
MAX_LENGTH = 6


def _save_tokenizer(folder):
    """A word-level fast tokenizer with T5's specials (pad 0, EOS 1 appended, unk 2)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def test_captions_encode_as_wans_pipeline_and_the_command_writes_them(tmp_path, rng):
    folder = str(tmp_path / "text_encoder")
    model = _save_transformers_model(folder, int(rng.integers(2**31)))
    _save_tokenizer(folder)
    captions = {"long": "a  person walks slowly in the park &amp; dances", "empty": "",
                "short": " ".join(rng.choice(WORDS, 2))}
    got = caption_encoder.encode_captions(folder, captions, MAX_LENGTH)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    for caption_id, text in captions.items():
        # WanPipeline: prompt_clean, max_length with truncation, the encoder's real tokens zero-padded.
        tokens = tokenizer([caption_encoder.clean_caption(text)], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(tokens.input_ids, tokens.attention_mask).last_hidden_state[0].numpy()
        n = int(tokens.attention_mask.sum())
        expected = np.concatenate([hidden[:n], np.zeros((MAX_LENGTH - n, TINY["d_model"]))])
        assert got[caption_id].shape == (MAX_LENGTH, TINY["d_model"]) and got[caption_id].dtype == np.float32
        error = np.abs(got[caption_id] - expected).max() / np.abs(expected).max()
        assert error < TOLERANCE, (caption_id, error)
        np.testing.assert_array_equal(got[caption_id][n:], 0.0)
    assert caption_encoder.clean_caption(" a\t&amp;amp;  b \n") == "a & b"

    captions_path = tmp_path / "captions.json"
    captions_path.write_text(json.dumps(captions))
    out = str(tmp_path / "embeddings")
    assert caption_encoder.main([f"--text_encoder={folder}", f"--captions={captions_path}", f"--out={out}",
                                 f"--max_length={MAX_LENGTH}", "--dtype=float32", f"--batch_size={len(captions)}"]) == 0
    table = te.TextEmbeddings(out)
    for caption_id in captions:  # the same batch shape: the same compiled encoder, the same numbers
        np.testing.assert_array_equal(table.lookup(caption_id)[0], got[caption_id])


def test_a_folder_without_tokenizer_is_one_line(tmp_path, rng):
    folder = str(tmp_path / "text_encoder")
    _save_transformers_model(folder, int(rng.integers(2**31)))
    with pytest.raises(ValueError, match="has no usable tokenizer files") as error:
        caption_encoder.load_caption_encoder(folder)
    assert "\n" not in str(error.value)
