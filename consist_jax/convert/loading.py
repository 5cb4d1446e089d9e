"""Checkpoint folders (config.json + safetensors) -> Flax parameter pytrees.

One name-mapping mechanism serves every model (UNet, VAE, CLIP, motion module).
Our Flax modules are named after the PyTorch modules they mirror, with list
children named ``"resnets.0"`` and so on, so a parameter path joined with dots
*is* the PyTorch key, up to the leaf:

    ("down_blocks.0", "resnets.1", "conv1", "kernel")  <->  "down_blocks.0.resnets.1.conv1.weight"

Leaf rules: ``kernel`` <-> ``weight`` (transposed: linear (O, I) -> (I, O), conv
(O, I, kh, kw) -> (kh, kw, I, O), conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)), ``scale`` / ``embedding`` <-> ``weight``,
anything else keeps its name. Checkpoints whose names differ (for example the
original AnimateDiff files) are mapped first by ``rename_rules``: ordered
``(regex, replacement)`` pairs applied to every key in the file.

Every tensor is accounted for: a key the model expects but the file lacks, a key
the file has but the model does not use, and a shape mismatch are all errors that
name the key. Weights are read with ``safetensors.numpy`` only; this module never
unpickles (a pickle can run code).

A weights file is a user's file: before safetensors maps it, ``read_safetensors_header``
reads only its 8-byte length and JSON header and checks every entry (dtype, shape, offsets
that tile the data exactly), so a truncated, corrupt or hostile file is a one-line
CheckpointFormatError naming the file and the tensor, never a crash, a huge allocation or
an array that silently differs from what the header declares.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

_PICKLE_HELP = (
    "consist_jax reads safetensors only (unpickling a file can run arbitrary code). "
    "Convert it once with your own PyTorch: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('IN', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)


# safetensors dtype name -> numpy dtype, for the dtypes ``safetensors.numpy`` reads.
SAFETENSORS_DTYPES = {name: np.dtype(dtype) for name, dtype in [
    ("F64", np.float64), ("F32", np.float32), ("F16", np.float16), ("I64", np.int64),
    ("U64", np.uint64), ("I32", np.int32), ("U32", np.uint32), ("I16", np.int16),
    ("U16", np.uint16), ("I8", np.int8), ("U8", np.uint8), ("BOOL", np.bool_), ("C64", np.complex64)]}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint file (weights, config or shard index) that is not well formed."""


def read_config(folder: str, name: str = "config.json") -> dict:
    """Reads ``folder/config.json`` with an error that names the missing path."""
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} not found: a checkpoint folder needs a {name} next to its safetensors weights"
        )
    return _read_json_object(path)


def _read_json_object(path: str) -> dict:
    """A JSON file that must hold an object; anything else is a CheckpointFormatError."""
    with open(path, "rb") as f:
        try:
            value = json.loads(f.read().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise CheckpointFormatError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path!r} holds a JSON {type(value).__name__}; a config is a JSON object of keys")
    return value


def config_from_file(from_dict: Callable[..., Any], folder: str, name: str = "config.json", **overrides):
    """``from_dict(read_config(folder, name), **overrides)``: a key of the wrong type or
    out of range raises ValueError naming the file and the key."""
    config = read_config(folder, name)
    try:
        return from_dict(config, **overrides)
    except (ValueError, TypeError) as e:  # TypeError: a type the checks did not foresee
        raise ValueError(f"{os.path.join(folder, name)!r}: {e}") from e


def find_weight_files(folder: str, weights_name: str) -> list[str]:
    """Safetensors files of ``folder`` holding ``weights_name`` (single, fp16 variant or sharded).

    Looks, in order, for ``{weights_name}.safetensors``, ``{weights_name}.fp16.safetensors``
    and a ``{weights_name}.safetensors.index.json`` shard index.
    """
    candidates = [f"{weights_name}.safetensors", f"{weights_name}.fp16.safetensors"]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
    index_path = os.path.join(folder, f"{weights_name}.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(s, str) and s and os.path.basename(s) == s and s not in (".", "..")
            for s in weight_map.values()
        ):
            raise CheckpointFormatError(
                f"{index_path!r} needs a non-empty 'weight_map' object of tensor name -> shard "
                f"file name (a file in {folder!r})")
        paths = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"shard {p!r} listed in {index_path!r} is missing")
        return paths
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    pickled = [p for p in present if p.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise FileNotFoundError(
            f"{folder!r} holds only pickled weights {pickled}. {_PICKLE_HELP}"
        )
    raise FileNotFoundError(
        f"no {candidates[0]!r} (or fp16 variant, or sharded index) in {folder!r}; found {present}"
    )


def read_state_dict(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads safetensors files into one ``{key: array}`` dict (keys must not repeat)."""
    state: dict[str, np.ndarray] = {}
    for path in paths:
        if path.endswith(PICKLE_SUFFIXES):
            raise CheckpointFormatError(f"{path!r} is a pickled checkpoint. {_PICKLE_HELP}")
        header = read_safetensors_header(path)
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own types; keep the path in the message.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointFormatError(f"{path!r} is not a readable safetensors file: {reason}") from e
        _check_read_as_declared(path, header, tensors)
        for key, value in tensors.items():
            if key in state:
                raise CheckpointError(f"key {key!r} appears in more than one shard ({path!r})")
            state[key] = value
    return state


def read_safetensors_header(path: str) -> dict[str, dict]:
    """Reads and checks the header of a safetensors file, not its tensors.

    Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data.
    The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
    (offsets into the data), plus an optional ``"__metadata__"`` of string -> string.

    Returns:
      ``{name: {"dtype": str, "shape": [int, ...], "data_offsets": [int, int]}}``.

    Raises:
      CheckpointFormatError naming the file (and the tensor) for anything safetensors would
      refuse or read differently: a short file, a header past the end, bad JSON, repeated
      names, an unknown dtype, a shape whose size disagrees with its offsets, offsets that
      leave gaps, overlap or run past the data.
    """
    def fail(reason: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path!r} is not a valid safetensors file: {reason}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise fail(f"{size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise fail(f"header length {header_len} runs past the end of the file ({size} bytes) "
                       f"or over {MAX_HEADER_BYTES} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, repeats
        raise fail(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ must be an object of string values")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        problem = _header_entry_problem(entry)
        if problem:
            raise fail(f"tensor {name!r}: {problem}")
    position = 0  # the tensors must tile the data section, in offset order
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != position or end > data_size:
            raise fail(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a gap, overlap another "
                       f"tensor or run past the {data_size} data bytes")
        position = end
    if position != data_size:
        raise fail(f"{data_size - position} data bytes after the last tensor")
    return header


def _check_read_as_declared(path: str, header: Mapping[str, dict],
                            tensors: Mapping[str, np.ndarray]) -> None:
    """Every tensor safetensors returned is the one the checked header declares."""
    if set(tensors) != set(header):
        raise CheckpointFormatError(f"{path!r}: safetensors read tensors {_preview(list(tensors))}, "
                                    f"the header declares {_preview(list(header))}")
    for key, value in tensors.items():
        dtype, shape = header[key]["dtype"], tuple(header[key]["shape"])
        if value.shape != shape or value.dtype != SAFETENSORS_DTYPES[dtype]:
            raise CheckpointFormatError(f"{path!r}: tensor {key!r} read as {value.dtype} {value.shape}, "
                                        f"the header declares {dtype} {shape}")


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: a repeated name is an error (json.loads would keep the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"repeated name {key!r:.80}")
        out[key] = value
    return out


def _header_entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "entry needs dtype, shape and data_offsets"
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in SAFETENSORS_DTYPES:
        hint = (" (numpy has no bfloat16 / float8: save the weights as F16 or F32)"
                if entry["dtype"] in ("BF16", "F8_E4M3", "F8_E5M2") else "")
        return f"dtype {entry['dtype']!r:.40} is not one of {sorted(SAFETENSORS_DTYPES)}{hint}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    # At most numpy's 64 axes: also bounds the size product below (no huge-integer hang).
    if not (isinstance(shape, list) and len(shape) <= 64 and all(is_count(d) for d in shape)):
        return f"shape {shape!r:.80} is not a list of at most 64 non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r:.80} is not [begin, end] with 0 <= begin <= end"
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize  # Python ints: exact
    if offsets[1] - offsets[0] != nbytes:
        # (Python refuses to print integers of over 4300 digits, and nobody wants to read one.)
        needs = nbytes if nbytes < 10**30 else "over 10^30"
        return (f"shape {shape!r:.80} of {entry['dtype']} needs {needs} bytes, "
                f"data_offsets {offsets!r:.80} hold {offsets[1] - offsets[0]}")
    return None


def torch_key(path: Sequence[str]) -> str:
    """Our parameter path -> the PyTorch state-dict key it mirrors."""
    *modules, leaf = path
    leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    return ".".join([*modules, leaf])


def torch_to_flax_layout(path: Sequence[str], tensor: np.ndarray) -> np.ndarray:
    """Transposes a PyTorch weight into the layout of our parameter at ``path``."""
    if path[-1] != "kernel":
        return tensor
    if tensor.ndim == 2:  # Linear (O, I) -> Dense (I, O)
        return tensor.T
    if tensor.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 3:  # Conv1d (O, I, k) -> (k, I, O)
        return tensor.transpose(2, 1, 0)
    if tensor.ndim == 5:  # Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)
        return tensor.transpose(2, 3, 4, 1, 0)
    raise CheckpointError(f"cannot map a {tensor.ndim}-d kernel at {'.'.join(path)}")


def apply_rename_rules(
    state: Mapping[str, np.ndarray], rules: Iterable[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """Renames checkpoint keys by ordered ``(regex, replacement)`` rules."""
    compiled = [(re.compile(p), r) for p, r in rules]
    renamed: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in compiled:
            new = pattern.sub(replacement, new)
        if new in renamed:
            raise CheckpointError(f"rename rules map two keys onto {new!r} (one of them {key!r})")
        renamed[new] = value
    return renamed


def _preview(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    reference_params: Any,
    *,
    source: str = "checkpoint",
    may_be_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = (),
    dtype: Any = np.float32,
) -> dict:
    """Maps a PyTorch state dict onto the structure of ``reference_params``.

    Args:
      state: ``{torch_key: array}`` (after any rename rules).
      reference_params: our params pytree (arrays or ``jax.ShapeDtypeStruct``s, e.g.
        from ``jax.eval_shape(module.init, ...)``), giving the expected paths and
        shapes. Where a path matches ``may_be_missing`` and the file lacks it, the
        value from ``reference_params`` is kept (so pass real initial values there).
      source: names the file(s) in error messages.
      may_be_missing: regexes over torch keys of weights new to this project
        (pose encoder, motion module) that initialise when absent.
      ignore_unexpected: regexes over torch keys that may be present and unused
        (for example buffers such as ``position_ids``).
      dtype: parameter dtype; fp16 / bf16 checkpoints are cast.

    Returns:
      A nested params dict with numpy arrays.

    Raises:
      CheckpointError naming every missing, unexpected or misshapen key.
    """
    flat_ref = traverse_util.flatten_dict(reference_params)
    missing_ok = [re.compile(p) for p in may_be_missing]
    unexpected_ok = [re.compile(p) for p in ignore_unexpected]
    flat_out, used, missing, misshapen = {}, set(), [], []
    for path, ref in flat_ref.items():
        key = torch_key(path)
        if key not in state:
            if any(p.search(key) for p in missing_ok):
                if not hasattr(ref, "__array__"):
                    raise CheckpointError(
                        f"{key} is absent from {source} and no initial value was given for it"
                    )
                flat_out[path] = np.asarray(ref).astype(dtype)
                continue
            missing.append(key)
            continue
        used.add(key)
        value = torch_to_flax_layout(path, np.asarray(state[key]))
        if tuple(value.shape) != tuple(ref.shape):
            misshapen.append(
                f"{key}: file has {tuple(state[key].shape)}, model expects "
                f"{tuple(ref.shape)} (our layout)"
            )
            continue
        # copy=False: a layout view of the file's array, not a second copy of the model.
        flat_out[path] = value.astype(dtype, copy=False)
    unexpected = [
        k for k in state if k not in used and not any(p.search(k) for p in unexpected_ok)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen key(s): {_preview(misshapen)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    return traverse_util.unflatten_dict(flat_out)


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """The inverse mapping: our params -> a PyTorch-layout state dict (for export and tests)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            if value.ndim == 2:
                value = value.T
            elif value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 3:
                value = value.transpose(2, 1, 0)
            elif value.ndim == 5:
                value = value.transpose(4, 3, 0, 1, 2)
        out[torch_key(path)] = np.ascontiguousarray(value)
    return out


def load_params_from_folder(
    folder: str,
    weights_name: str,
    reference_params: Any,
    *,
    rename_rules: Iterable[tuple[str, str]] = (),
    may_be_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = (),
    dtype: Any = np.float32,
) -> dict:
    """Reads ``folder``'s safetensors weights and maps them onto ``reference_params``."""
    paths = find_weight_files(folder, weights_name)
    state = apply_rename_rules(read_state_dict(paths), rename_rules)
    return state_dict_to_params(
        state,
        reference_params,
        source=", ".join(paths),
        may_be_missing=may_be_missing,
        ignore_unexpected=ignore_unexpected,
        dtype=dtype,
    )


def to_jax_params(params: dict) -> dict:
    """Numpy params (from ``state_dict_to_params``) -> jax arrays, converted in place.

    Each numpy leaf is replaced (and so freed) as soon as its device copy exists, so the
    host peak is about one copy of the model plus one tensor, not two copies.
    """
    import jax.numpy as jnp  # here, so the mapping above stays usable without jax.

    for key, value in params.items():
        params[key] = to_jax_params(value) if isinstance(value, dict) else jnp.asarray(value)
    return params
