"""Wan's caption encoder from a local folder: UMT5 plus its tokenizer, as (encode, tokenize)
for data/text_embeddings.py's `compute_text_embeddings`; and the command that writes a
text-embeddings folder from a captions file (the encoder runs once per caption).

    python -m consist_jax.convert.caption_encoder --text_encoder=DIR --captions=captions.json \
        --out=data/my_videos_text [--max_length=512] [--dtype=float16] [--batch_size=16]

captions.json: one JSON object {caption id: caption text}; the caption ids are what
data.pipeline.captions maps each video to (or the videos' own ids). DIR: a transformers
UMT5EncoderModel folder (config.json + safetensors) holding its fast tokenizer's files too
(tokenizer.json, tokenizer_config.json, special_tokens_map.json: e.g. Wan2.1's text_encoder/
with its tokenizer/ files copied in); nothing is downloaded, torch is not imported.
Text is cleaned and tokenized as diffusers' WanPipeline does (prompt_clean: ftfy when
installed, HTML unescaping, whitespace; max_length tokens with truncation).
"""
from __future__ import annotations

import html
import json
import re
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from consist_jax import cli
from consist_jax.convert.umt5 import load_text_encoder

WAN_MAX_LENGTH = 512  # Wan's text length: its context is always zero-padded to 512 tokens


def clean_caption(text: str) -> str:
    """diffusers' Wan prompt_clean: ftfy.fix_text (when installed, as there), HTML entities
    unescaped twice, runs of whitespace to one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_caption_encoder(folder: str, max_length: int = WAN_MAX_LENGTH, dtype=jnp.float32
                         ) -> tuple[Callable, Callable]:
    """(encode, tokenize) for `compute_text_embeddings` from a local UMT5 folder with its tokenizer.

    encode(input_ids (B, L) int32, attention_mask (B, L) int32) -> (B, L, D), jitted;
    tokenize(list of B captions) -> (input_ids, attention_mask) (B, max_length) numpy.
    """
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer would import torch

    module, params = load_text_encoder(folder, dtype)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"text encoder folder {folder!r} has no usable tokenizer files ({reason:.200})") from None

    def tokenize(texts):
        out = tokenizer([clean_caption(t) for t in texts], padding="max_length", max_length=max_length,
                        truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="np")
        return out["input_ids"], out["attention_mask"]

    encode = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))
    return encode, tokenize


def encode_captions(folder: str, captions: dict, max_length: int = WAN_MAX_LENGTH) -> dict:
    """{id: text} -> {id: (max_length, D) float32}, zero-padded as a text-embeddings folder's
    lookup returns them (one encoder batch of all the captions)."""
    from consist_jax.data import text_embeddings as te

    encode, tokenize = load_caption_encoder(folder, max_length)
    pairs = te.compute_text_embeddings(encode, tokenize, captions, batch_size=max(len(captions), 1))
    return {caption_id: te.pad_embedding(tokens, max_length)[0] for caption_id, tokens in pairs}


@cli.reports_user_errors
def main(argv) -> int:
    import argparse

    from consist_jax.data import text_embeddings as te

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_encoder", required=True, help="local UMT5 folder with its tokenizer files")
    parser.add_argument("--captions", required=True, help="JSON {caption id: caption text}")
    parser.add_argument("--out", required=True, help="the text-embeddings folder to write")
    parser.add_argument("--max_length", type=int, default=WAN_MAX_LENGTH)
    parser.add_argument("--dtype", choices=te.DTYPES, default="float16")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    with open(args.captions, "rb") as f:
        try:
            captions = json.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"--captions={args.captions!r} is not valid JSON ({e})") from None
    if not (isinstance(captions, dict) and all(isinstance(t, str) for t in captions.values())):
        raise ValueError(f"--captions={args.captions!r} must be one JSON object {{caption id: caption text}}")
    encode, tokenize = load_caption_encoder(args.text_encoder, args.max_length)
    count = te.write_text_embeddings(args.out, te.compute_text_embeddings(encode, tokenize, captions, args.batch_size),
                                     args.max_length, dtype=args.dtype)
    print(f"wrote {count} caption embeddings to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
