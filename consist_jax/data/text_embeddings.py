"""Precomputed caption embeddings: the text encoder runs once per caption, not per step.

At scale (UMT5-XXL for Wan: 5.7B parameters, 4096-wide outputs) encoding every caption at
every training step would cost more than the step. `compute_text_embeddings` encodes a
set of captions once, in fixed-size batches; `write_text_embeddings` stores them; the
data pipeline reads one caption's embedding per example with `TextEmbeddings.lookup`,
choosing each video's caption with `VideoCaptions` (a captions file {video_id: caption id},
a default caption id, or the video_id itself).

Folder layout (safetensors only; nothing here unpickles):

    text_embeddings.json                  {"format": 1, "max_length": L, "dim": D,
                                           "dtype": "float16" | "float32",
                                           "shards": ["text_embeddings-00000.safetensors", ...]}
    text_embeddings-00000.safetensors, ...
        one tensor per caption, named by its caption id (e.g. the record's video_id):
        (n, D), the encoder's output on the caption's n real tokens (padding dropped).

`lookup` returns the embedding zero-padded to (L, D) with its (L,) mask: Wan's pipeline
trims the encoder output to the real tokens and zero-pads it to max_length the same way,
so a batch of looked-up embeddings is exactly the context Wan's transformer was trained on.
This module imports neither JAX nor a model (grain workers read embeddings); computing
them takes the caller's jitted encoder function.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from consist_jax import files

INDEX_NAME = "text_embeddings.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


class TextEmbeddingError(ValueError):
    """A text-embeddings folder is missing, malformed or lacks a caption id."""


def shard_name(index: int) -> str:
    return f"text_embeddings-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------
# Computing
# ----------------------------------------------------------------------------------


def compute_text_embeddings(encode: Callable, tokenize: Callable, captions: Mapping[str, str],
                            batch_size: int = 16) -> Iterator[tuple[str, np.ndarray]]:
    """Encode every caption once: yields (caption id, (n, D) float32 embedding of its n tokens).

    encode(input_ids (B, L) int32, attention_mask (B, L) int32) -> (B, L, D), e.g.
        jax.jit(lambda i, m: text_encoder.apply({"params": params}, i, m)).
    tokenize(list of B captions) -> (input_ids (B, L), attention_mask (B, L)) numpy, padded
        to one fixed L (Wan: UMT5's tokenizer, max_length 512, padding="max_length",
        truncation=True), so every batch has one shape and `encode` compiles once.
    The last batch is filled up with repeats of its last caption (same shape again).
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    ids = list(captions)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        texts = [captions[i] for i in chunk]
        texts += [texts[-1]] * (batch_size - len(texts))
        input_ids, mask = (np.asarray(a) for a in tokenize(texts))
        outputs = np.asarray(encode(input_ids.astype(np.int32), mask.astype(np.int32)), np.float32)
        for row, caption_id in enumerate(chunk):
            yield caption_id, outputs[row, : int(mask[row].sum())]


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------


def write_text_embeddings(folder: str, embeddings: Iterable[tuple[str, np.ndarray]], max_length: int,
                          dtype: str = "float16", captions_per_shard: int = 4096) -> int:
    """Write (caption id, (n, D)) pairs as a text-embeddings folder; returns the caption count.

    max_length: L, the padded length `lookup` returns (the tokenizer's max_length).
    dtype: storage dtype (float16 halves the size; UMT5's normed outputs fit it).
    Every file is written atomically; a repeated caption id or a shape that differs
    from the first one's D (or n > L) is a TextEmbeddingError naming the id.
    """
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise TextEmbeddingError(f"dtype={dtype!r}: must be one of {DTYPES}")
    files.ensure_folder(folder)
    names, shard, seen, dim = [], {}, set(), None

    def flush():  # one shard on disk at a time: the whole set need not fit in memory
        names.append(shard_name(len(names)))
        with files.atomic_path(os.path.join(folder, names[-1])) as tmp:
            save_file(shard, tmp)
        shard.clear()

    for caption_id, embedding in embeddings:
        embedding = np.asarray(embedding)
        dim = embedding.shape[-1] if dim is None else dim
        if caption_id in seen:
            raise TextEmbeddingError(f"caption id {caption_id!r} appears twice")
        if embedding.ndim != 2 or embedding.shape[1] != dim or embedding.shape[0] > max_length:
            raise TextEmbeddingError(f"caption id {caption_id!r}: embedding shape {embedding.shape}, "
                                     f"expected (n <= {max_length}, {dim})")
        seen.add(caption_id)
        shard[caption_id] = np.ascontiguousarray(embedding.astype(dtype))
        if len(shard) == captions_per_shard:
            flush()
    if not seen:
        raise TextEmbeddingError(f"no captions to write to {folder!r}")
    if shard:
        flush()
    files.write_json(os.path.join(folder, INDEX_NAME),
                     {"format": FORMAT_VERSION, "max_length": max_length, "dim": dim, "dtype": dtype,
                      "shards": names})
    return len(seen)


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------


def pad_embedding(tokens: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) embedding of a caption's n tokens -> ((L, D) float32 zero-padded to L = max_length,
    (L,) bool mask of the real tokens), as Wan's pipeline pads its text context."""
    n = tokens.shape[0]
    if n > max_length:
        raise TextEmbeddingError(f"a caption of {n} tokens does not fit max_length={max_length}")
    embedding = np.zeros((max_length, tokens.shape[1]), np.float32)
    embedding[:n] = tokens
    return embedding, np.arange(max_length) < n


class TextEmbeddings:
    """Random access to a text-embeddings folder by caption id (picklable: grain workers
    reopen the shards themselves).

        table = TextEmbeddings(folder)
        context, mask = table.lookup(example["video_id"])   # (L, D) float32, (L,) bool
    """

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise TextEmbeddingError(f"{index_path!r} not found: not a text-embeddings folder "
                                     f"(write one with write_text_embeddings)")
        with open(index_path, "rb") as f:
            try:
                index = json.loads(f.read().decode("utf-8"))
            except ValueError as e:
                raise TextEmbeddingError(f"{index_path!r} is not valid JSON ({e})") from None
        if not (isinstance(index, dict) and index.get("format") == FORMAT_VERSION
                and isinstance(index.get("max_length"), int) and isinstance(index.get("dim"), int)
                and index.get("dtype") in DTYPES and isinstance(index.get("shards"), list)):
            raise TextEmbeddingError(f"{index_path!r} needs format {FORMAT_VERSION}, integer max_length "
                                     f"and dim, dtype in {DTYPES} and a list of shards")
        self.max_length, self.dim = index["max_length"], index["dim"]
        self.shards = [self._shard_path(name) for name in index["shards"]]
        self._shard_of = None  # caption id -> shard path, built on first use
        self._handles = {}

    def _shard_path(self, name) -> str:
        if not (isinstance(name, str) and os.path.basename(name) == name and name.endswith(".safetensors")):
            raise TextEmbeddingError(f"{os.path.join(self.folder, INDEX_NAME)!r}: shard {name!r:.80} is "
                                     f"not a .safetensors file name in the folder")
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            raise TextEmbeddingError(f"shard {path!r} listed in {INDEX_NAME} is missing")
        return path

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def _open(self, path: str):
        from safetensors import safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="np")
            except Exception as e:  # safetensors' own error types; keep the path in the message.
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TextEmbeddingError(f"{path!r} is not a readable safetensors file: {reason}") from e
        return self._handles[path]

    def _index(self) -> dict:
        if self._shard_of is None:
            self._shard_of = {key: path for path in self.shards for key in self._open(path).keys()}
        return self._shard_of

    @property
    def caption_ids(self) -> Sequence[str]:
        return sorted(self._index())

    def __len__(self) -> int:
        return len(self._index())

    def __contains__(self, caption_id: str) -> bool:
        return caption_id in self._index()

    def lookup(self, caption_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(embedding (L, D) float32 zero-padded after the caption's n tokens, mask (L,) bool)."""
        path = self._index().get(caption_id)
        if path is None:
            raise TextEmbeddingError(f"caption id {caption_id!r:.200} is not in the text embeddings at "
                                     f"{self.folder!r} ({len(self)} captions)")
        tokens = self._open(path).get_tensor(caption_id)
        n = tokens.shape[0] if tokens.ndim == 2 else -1
        if tokens.ndim != 2 or tokens.shape[1] != self.dim or n > self.max_length:
            raise TextEmbeddingError(f"{path!r}: caption id {caption_id!r:.200} has shape {tokens.shape}, "
                                     f"expected (n <= {self.max_length}, {self.dim})")
        return pad_embedding(tokens, self.max_length)


# ----------------------------------------------------------------------------------
# Which caption goes with which video
# ----------------------------------------------------------------------------------


def read_captions_file(path: str) -> dict[str, str]:
    """A captions file: one JSON object {video_id: caption id} (str -> str)."""
    if not os.path.isfile(path):
        raise TextEmbeddingError(f"captions file {path!r} not found")
    with open(path, "rb") as f:
        try:
            captions = json.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise TextEmbeddingError(f"captions file {path!r} is not valid JSON ({e})") from None
    if not (isinstance(captions, dict) and all(isinstance(v, str) for v in captions.values())):
        raise TextEmbeddingError(f"captions file {path!r} must be one JSON object {{video_id: caption id}} "
                                 f"with string values")
    return captions


class VideoCaptions:
    """The caption embedding of each video: the data pipeline's text context (picklable).

    folder: a text-embeddings folder (write_text_embeddings).
    captions_file: "" or a JSON file {video_id: caption id} (read_captions_file).
    default_caption: "" or the caption id of every video the captions file does not name
      (with no captions file: of every video).
    With neither, a video's caption id is its own video_id (the folder was written keyed
    by video id). A video the captions file does not name, without a default, is a
    TextEmbeddingError naming the video and the file; so is a caption id not in the folder.
    """

    def __init__(self, folder: str, captions_file: str = "", default_caption: str = ""):
        self.table = TextEmbeddings(folder)
        self.captions_file = captions_file
        self.caption_of = read_captions_file(captions_file) if captions_file else {}
        self.default_caption = default_caption
        if default_caption and default_caption not in self.table:  # checked once, not per example
            self.table.lookup(default_caption)

    def caption_id(self, video_id: str) -> str:
        if video_id in self.caption_of:
            return self.caption_of[video_id]
        if self.default_caption:
            return self.default_caption
        if self.captions_file:
            raise TextEmbeddingError(f"video {video_id!r:.200} has no caption id in the captions file "
                                     f"{self.captions_file!r} (and no default caption)")
        return video_id

    def context(self, video_id: str) -> np.ndarray:
        """(L, D) float32: the video's caption embedding, zero-padded as `lookup` pads."""
        return self.table.lookup(self.caption_id(video_id))[0]
