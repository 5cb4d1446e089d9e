"""Bounded fuzzing of the safetensors reader (convert/loading.py): whatever the bytes of a
weights file, reading it either gives exactly the arrays its header declares or raises one
CheckpointFormatError, on one line, naming the file; never another exception, a hang, or a
huge allocation for a huge declared size."""
import itertools
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save

from consist_jax.convert.loading import (SAFETENSORS_DTYPES, CheckpointFormatError,
                                         find_weight_files, read_state_dict)
from tests.fuzzing import JSON, bounded, damaged

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                "U64": np.uint64, "I32": np.int32, "U32": np.uint32, "I16": np.int16,
                "U16": np.uint16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
                "C64": np.complex64}
# What a header's dtype means (the oracle): safetensors' numpy writer has no bfloat16, so
# only mutated headers declare BF16; our reader maps it to ml_dtypes.bfloat16.
DECLARED_DTYPES = {**NUMPY_DTYPES, "BF16": ml_dtypes.bfloat16}
_names = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_safetensors")


def _write(folder, data: bytes) -> str:
    # A fresh name per example: safetensors maps files, and rewriting a mapped file in
    # place would pull the pages from under the previous example's arrays.
    path = os.path.join(folder, f"case{next(_names)}.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    return path


@st.composite
def valid_files(draw) -> bytes:
    """A well-formed file of 0-3 small tensors of any supported dtype, by safetensors itself."""
    tensors = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = NUMPY_DTYPES[draw(st.sampled_from(sorted(NUMPY_DTYPES)))]
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        raw = draw(st.binary(min_size=math.prod(shape) * np.dtype(dtype).itemsize,
                             max_size=math.prod(shape) * np.dtype(dtype).itemsize))
        tensors[f"t{i}"] = np.frombuffer(raw, np.uint8).view(dtype).reshape(shape)
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    if not tensors and metadata == {}:
        metadata = None  # safetensors 0.8 writes this case as invalid JSON (its reader refuses it too)
    return save(tensors, metadata=metadata)


def _split(data: bytes) -> tuple[dict, bytes]:
    header_len = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + header_len]), data[8 + header_len:]


def _join(header, payload: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


ENTRY_VALUES = {
    "dtype": st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["BF16", "F8_E4M3", "f32", "", "I4"]) | JSON,
    "shape": st.lists(st.integers(-2, 2**64) | st.sampled_from([0, 1, 2, 2**31, 2**63, 10**4000]),
                      max_size=4) | st.just([2**63] * 65) | JSON,
    "data_offsets": st.lists(st.integers(-1, 2**64) | st.integers(0, 64), min_size=0, max_size=3) | JSON,
}


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file with one hostile change: to its bytes, its length prefix or its header."""
    data = draw(valid_files())
    kind = draw(st.sampled_from(["bytes", "length", "entry", "drop", "metadata", "json", "raw_header"]))
    if kind == "bytes":
        return draw(damaged(data))
    if kind == "length":
        length = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data) + 8))
        return struct.pack("<Q", length) + data[8:]
    header, payload = _split(data)
    if kind == "raw_header":
        return _join(draw(st.binary(max_size=40)), payload)
    if kind == "json":
        return _join(draw(JSON), payload)
    if kind == "metadata":
        header["__metadata__"] = draw(JSON)
        return _join(header, payload)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        header[draw(st.text(max_size=4))] = draw(JSON)
        return _join(header, payload)
    name = draw(st.sampled_from(names))
    if kind == "drop":
        del header[name]
    else:
        field = draw(st.sampled_from(sorted(ENTRY_VALUES)))
        header[name][field] = draw(ENTRY_VALUES[field])
    return _join(header, payload)


def _declared_arrays(data: bytes) -> dict:
    """The oracle: what a (readable) file's header says its tensors are, byte for byte."""
    header, payload = _split(data)
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        out[name] = (DECLARED_DTYPES[entry["dtype"]], tuple(entry["shape"]), payload[begin:end])
    return out


def _check_read(path: str, data: bytes) -> None:
    try:
        state = read_state_dict([path])
    except CheckpointFormatError as error:
        message = str(error)
        assert path in message and "\n" not in message, message
        return
    declared = _declared_arrays(data)
    assert sorted(state) == sorted(declared)
    for name, (dtype, shape, raw) in declared.items():
        assert state[name].dtype == dtype and state[name].shape == shape, name
        assert state[name].tobytes() == raw, name


@bounded(200)
@given(data=valid_files())
def test_valid_files_read_exactly(folder, data):
    path = _write(folder, data)
    state = read_state_dict([path])
    assert sorted(state) == sorted(_declared_arrays(data))
    _check_read(path, data)


@bounded(200)
@given(data=mutated_files())
def test_mutated_files_read_exactly_or_fail_naming_the_file(folder, data):
    _check_read(_write(folder, data), data)


def test_huge_declared_sizes_fail_without_reading(folder):
    """A header length or a tensor size far beyond the file fails from the header alone."""
    tiny = _join({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4)
    huge = _join({"a": {"dtype": "F32", "shape": [10**4000] * 64, "data_offsets": [0, 4]}}, b"\0" * 4)
    for data, expected in [(struct.pack("<Q", 2**63) + b"{}", "header length"),
                           (tiny, "needs 4835703278458516698824704 bytes"),
                           (huge, "needs over 10\\^30 bytes")]:
        with pytest.raises(CheckpointFormatError, match=expected):
            read_state_dict([_write(folder, data)])


def _index_folder(folder, index: bytes) -> str:
    """A checkpoint folder holding one shard file, a.safetensors, and the given index."""
    index_dir = os.path.join(folder, f"index{next(_names)}")
    os.makedirs(index_dir)
    with open(os.path.join(index_dir, "a.safetensors"), "wb") as f:
        f.write(save({}))
    with open(os.path.join(index_dir, "model.safetensors.index.json"), "wb") as f:
        f.write(index)
    return index_dir


def test_bad_shard_index_names_the_index(folder):
    for index in [b"{", b"[]", b'{"weight_map": {"a": "../x.safetensors"}}', b'{"weight_map": 3}',
                  b"\xff", b"[" * 100_000]:
        with pytest.raises(CheckpointFormatError, match="model.safetensors.index.json"):
            find_weight_files(_index_folder(folder, index), "model")


SHARD_NAMES = st.sampled_from(["a.safetensors", "b.safetensors", "../a.safetensors", "/etc/passwd",
                               ".", "..", "", "sub/a.safetensors"]) | JSON


@bounded(200)
@given(index=st.one_of(st.binary(max_size=30), JSON.map(lambda v: json.dumps(v).encode()),
                       st.dictionaries(st.text(max_size=3), SHARD_NAMES, max_size=3).map(
                           lambda m: json.dumps({"weight_map": m}).encode())))
def test_fuzzed_shard_index_lists_files_of_the_folder_or_fails_naming_it(folder, index):
    index_dir = _index_folder(folder, index)
    try:
        paths = find_weight_files(index_dir, "model")
    except CheckpointFormatError as error:
        assert "model.safetensors.index.json" in str(error) and "\n" not in str(error)
    except FileNotFoundError as error:  # a listed shard that is not there
        assert "is missing" in str(error) and index_dir in str(error)
    else:
        assert paths and all(os.path.dirname(p) == index_dir and os.path.isfile(p) for p in paths)
