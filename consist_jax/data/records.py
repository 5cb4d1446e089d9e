"""The per-video record: the one on-disk format every dataset here is written in.

One ArrayRecord entry holds one whole video. The synthetic set, the TFDS-built
TikTok / UBC Fashion sets and the pipeline all use `encode_video` / `decode_video`
from this module and nothing else.

Byte layout of one record (all integers little-endian):

    offset  size  field
    0       8     magic b"SCDVIDEO"
    8       4     uint32 format version (FORMAT_VERSION)
    12      4     uint32 header length N
    16      N     header: UTF-8 JSON object (below)
    16+N    ...   payload: the arrays' bytes, back to back, in header order

Header JSON:
    {"video_id": str, "identity_id": str, "layout": str, "fps": float,
     "num_frames": T, "height": H, "width": W,
     "arrays": [{"name": str, "dtype": "uint8" | "float32", "shape": [...],
                 "encoding": "raw" | "png", "nbytes": int,
                 "frame_nbytes": [int, ...]   # png only: one PNG per frame
                }, ...]}

Arrays (first axis is always the frame axis, T):
    frames        (T, H, W, 3) uint8   required
    keypoints     (T, K, 3)   float32  optional; (x, y, confidence) in pixels of
                                       the stored frames, pixel centres at
                                       integer coordinates. A frame whose pose is
                                       missing has all-NaN keypoints.
    pose_images   (T, H, W, 3) uint8   optional; rendered or external pose images
                                       (a record with pose images only has layout "none")
    masks         (T, H, W)   uint8    optional; 1 on the person
    region_masks  (T, H, W)   uint8    optional; try-on region (1 = inpaint)

A record needs keypoints or pose_images (or both). Decoding never unpickles:
raw arrays are read with np.frombuffer from a dtype whitelist, PNGs with Pillow.
Every length is checked against the header, so a truncated or padded record is
reported as a RecordError instead of being decoded into wrong pixels.

TFDS stores each example as a serialized tf.train.Example; our builders put this
record in its single bytes feature "video_record". `unwrap_record` accepts both
forms (it reads the few protobuf fields by hand, no TensorFlow needed).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
from typing import Sequence

import numpy as np
from PIL import Image

MAGIC = b"SCDVIDEO"
FORMAT_VERSION = 1
TFDS_FEATURE_NAME = "video_record"
NO_KEYPOINTS_LAYOUT = "none"  # the layout of a record that carries pose images only

_PREFIX = struct.Struct("<8sII")
_DTYPES = {"uint8": np.uint8, "float32": np.float32}
_IMAGE_ARRAYS = ("frames", "pose_images", "masks", "region_masks")
# name -> (dtype, number of axes after the frame axis, trailing channels or None)
_ARRAY_SPECS = {
    "frames": ("uint8", 3, 3),
    "keypoints": ("float32", 2, 3),
    "pose_images": ("uint8", 3, 3),
    "masks": ("uint8", 2, None),
    "region_masks": ("uint8", 2, None),
}


class RecordError(ValueError):
    """A record that cannot be decoded (corrupt, truncated, inconsistent)."""


@dataclasses.dataclass(frozen=True)
class VideoExample:
    """One decoded video (or a subset of its frames), arrays as documented above."""

    frames: np.ndarray
    video_id: str
    identity_id: str
    layout: str
    fps: float
    keypoints: np.ndarray | None = None
    pose_images: np.ndarray | None = None
    masks: np.ndarray | None = None
    region_masks: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclasses.dataclass(frozen=True)
class RecordHeader:
    """The parsed header plus where each array's bytes start in the record."""

    video_id: str
    identity_id: str
    layout: str
    fps: float
    num_frames: int
    height: int
    width: int
    arrays: dict  # name -> array entry (dict from the JSON) with "offset" added


IMAGE_ENCODINGS = ("raw", "png")


def encode_video(example: VideoExample, *, image_encoding: str = "raw") -> bytes:
    """Serialises a video; image_encoding "png" stores image arrays as per-frame PNGs."""
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}")
    _validate_example(example)
    entries, blobs = [], []
    for name in _ARRAY_SPECS:
        array = getattr(example, name)
        if array is None:
            continue
        dtype = _ARRAY_SPECS[name][0]
        array = np.ascontiguousarray(array, dtype=_DTYPES[dtype])
        entry = {"name": name, "dtype": dtype, "shape": list(array.shape)}
        if image_encoding == "png" and name in _IMAGE_ARRAYS:
            pngs = [_png_bytes(frame) for frame in array]
            entry.update(encoding="png", frame_nbytes=[len(p) for p in pngs])
            blob = b"".join(pngs)
        else:
            entry["encoding"] = "raw"
            blob = array.tobytes()
        entry["nbytes"] = len(blob)
        entries.append(entry)
        blobs.append(blob)
    num_frames, height, width = example.frames.shape[:3]
    header = json.dumps({
        "video_id": str(example.video_id), "identity_id": str(example.identity_id),
        "layout": str(example.layout), "fps": float(example.fps),
        "num_frames": int(num_frames), "height": int(height), "width": int(width),
        "arrays": entries,
    }).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)


def read_header(record: bytes) -> RecordHeader:
    """Parses and checks the header; raises RecordError on any inconsistency."""
    record = unwrap_record(record)
    if len(record) < _PREFIX.size:
        raise RecordError(f"record of {len(record)} bytes is shorter than its prefix")
    magic, version, header_len = _PREFIX.unpack_from(record)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise RecordError(f"unsupported record format version {version}")
    start = _PREFIX.size
    if start + header_len > len(record):
        raise RecordError("record truncated inside its header")
    try:
        header = json.loads(record[start:start + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise RecordError(f"record header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise RecordError(f"record header is a JSON {type(header).__name__}, not an object")
    parsed = RecordHeader(
        video_id=_field(header, "video_id", str), identity_id=_field(header, "identity_id", str),
        layout=_field(header, "layout", str), fps=float(_field(header, "fps", float)),
        num_frames=_field(header, "num_frames", int), height=_field(header, "height", int),
        width=_field(header, "width", int),
        arrays=_parse_array_entries(_field(header, "arrays", list), start + header_len))
    if not (parsed.fps > 0 and min(parsed.num_frames, parsed.height, parsed.width) >= 1):
        raise RecordError(f"record header needs fps > 0 and num_frames, height, width >= 1, got "
                          f"{parsed.fps}, {parsed.num_frames}, {parsed.height}, {parsed.width} "
                          f"(video_id={parsed.video_id!r})")
    payload_end = max((a["offset"] + a["nbytes"] for a in parsed.arrays.values()),
                      default=start + header_len)
    if payload_end != len(record):
        kind = "truncated" if payload_end > len(record) else "has trailing bytes"
        raise RecordError(f"record {kind}: header describes {payload_end} bytes, "
                          f"record has {len(record)} (video_id={parsed.video_id!r})")
    _check_shapes(parsed)
    return parsed


def decode_video(record: bytes, frame_indices: Sequence[int] | None = None) -> VideoExample:
    """Decodes a record, optionally only the frames at `frame_indices` (in that order).

    Decoding a subset touches only those frames' bytes (and PNGs), which is what
    makes clip sampling from long videos cheap.
    """
    record = unwrap_record(record)
    header = read_header(record)
    if frame_indices is None:
        frame_indices = np.arange(header.num_frames)
    frame_indices = np.asarray(frame_indices, dtype=np.int64)
    if frame_indices.size and (frame_indices.min() < 0
                               or frame_indices.max() >= header.num_frames):
        raise RecordError(f"frame indices {frame_indices.tolist()} out of range for "
                          f"{header.num_frames} frames (video_id={header.video_id!r})")
    arrays = {name: _decode_array(record, entry, frame_indices, header.video_id)
              for name, entry in header.arrays.items()}
    if "keypoints" in arrays:
        _check_keypoints_finite(arrays["keypoints"], frame_indices, header.video_id)
    return VideoExample(video_id=header.video_id, identity_id=header.identity_id,
                        layout=header.layout, fps=header.fps, **arrays)


def unwrap_record(record: bytes) -> bytes:
    """Returns our record from either itself or a TFDS tf.train.Example around it."""
    record = bytes(record) if not isinstance(record, bytes) else record
    if record[:len(MAGIC)] == MAGIC:
        return record
    try:
        inner = _bytes_feature_from_tf_example(record, TFDS_FEATURE_NAME)
    except (IndexError, ValueError) as error:
        raise RecordError(f"neither a video record nor a tf.train.Example: {error}") from error
    if inner is None:
        raise RecordError(f"record has no magic and no {TFDS_FEATURE_NAME!r} feature")
    return inner


def frames_with_missing_pose(keypoints: np.ndarray) -> np.ndarray:
    """(T, K, 3) -> indices of frames whose pose is missing (all-NaN keypoints)."""
    return np.flatnonzero(np.isnan(keypoints).all(axis=(1, 2)))


# ----------------------------------------------------------------------------- helpers

def _validate_example(example: VideoExample) -> None:
    frames = np.asarray(example.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    if example.keypoints is None and example.pose_images is None:
        raise ValueError("a video needs keypoints or pose_images")
    num_frames, height, width = frames.shape[:3]
    for name, (_, _, channels) in _ARRAY_SPECS.items():
        array = getattr(example, name)
        if array is None or name == "keypoints":
            continue
        expected = (num_frames, height, width) + ((channels,) if channels else ())
        if np.shape(array) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {np.shape(array)}")
    if example.keypoints is not None:
        shape = np.shape(example.keypoints)
        if len(shape) != 3 or shape[0] != num_frames or shape[2] != 3:
            raise ValueError(f"keypoints must be ({num_frames}, K, 3), got {shape}")


def _check_keypoints_finite(keypoints: np.ndarray, frame_indices: np.ndarray, video_id: str) -> None:
    """(N, K, 3): each frame's keypoints are all finite, or all NaN (a missing pose)."""
    finite = np.isfinite(keypoints).all(axis=(1, 2)) | np.isnan(keypoints).all(axis=(1, 2))
    if not finite.all():
        frames = sorted(set(frame_indices[~finite].tolist()))
        raise RecordError(f"keypoints of frame(s) {frames[:8]} hold NaN or infinite values "
                          f"(a missing pose is all-NaN; video {video_id!r})")


def _png_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: PNG here is about size on disk, decode speed matters more.
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _field(mapping: dict, key: str, kind: type, where: str = "record header"):
    """``mapping[key]`` if it is a ``kind`` (int: not a bool; float: any finite number), else
    RecordError. Strict on purpose: ``str(None)`` or ``int(2.7)`` would decode a wrong record."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise RecordError(f"{where} has no {key!r}")
    value = mapping[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise RecordError(f"{where}: {key} must be a{'n' if kind is int else ''} "
                          f"{'finite number' if kind is float else kind.__name__}, got {value!r:.60}")
    return value


def _counts(mapping: dict, key: str, where: str) -> list[int]:
    """``mapping[key]`` as a list of non-negative ints (a shape or per-frame sizes)."""
    values = _field(mapping, key, list, where)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise RecordError(f"{where}: {key} must be a list of non-negative integers, got {values!r:.60}")
    return values


def _parse_array_entries(entries: list, payload_start: int) -> dict:
    arrays, offset = {}, payload_start
    for entry in entries:
        name = _field(entry, "name", str, "record array entry")
        if name not in _ARRAY_SPECS or name in arrays:
            raise RecordError(f"unknown or repeated array {name!r}")
        dtype = _field(entry, "dtype", str, name)
        if dtype != _ARRAY_SPECS[name][0]:
            raise RecordError(f"{name} has dtype {dtype!r}, expected {_ARRAY_SPECS[name][0]!r}")
        shape = _counts(entry, "shape", name)
        if len(shape) != _ARRAY_SPECS[name][1] + 1:  # checked first: bounds the product below
            raise RecordError(f"{name} shape {shape!r:.80} needs {_ARRAY_SPECS[name][1] + 1} axes")
        nbytes, encoding = _field(entry, "nbytes", int, name), _field(entry, "encoding", str, name)
        if encoding == "raw":
            expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: exact
            if nbytes != expected:
                raise RecordError(f"{name}: {nbytes} bytes for shape {shape}")
        elif encoding == "png" and name in _IMAGE_ARRAYS:
            frame_nbytes = _counts(entry, "frame_nbytes", name)
            if not shape or len(frame_nbytes) != shape[0] or sum(frame_nbytes) != nbytes:
                raise RecordError(f"{name}: PNG frame sizes disagree with the header")
        else:
            raise RecordError(f"{name}: unsupported encoding {encoding!r}")
        arrays[name] = dict(entry, shape=shape, nbytes=nbytes, offset=offset)
        offset += nbytes
    return arrays


def _check_shapes(header: RecordHeader) -> None:
    if "frames" not in header.arrays:
        raise RecordError("record has no frames")
    if "keypoints" not in header.arrays and "pose_images" not in header.arrays:
        raise RecordError("record has neither keypoints nor pose_images")
    for name, entry in header.arrays.items():
        _, axes, channels = _ARRAY_SPECS[name]
        shape = entry["shape"]
        if len(shape) != axes + 1 or shape[0] != header.num_frames:
            raise RecordError(f"{name} shape {shape} disagrees with {header.num_frames} frames")
        if channels is not None and shape[-1] != channels:
            raise RecordError(f"{name} shape {shape} needs {channels} channels")
        if name in _IMAGE_ARRAYS and shape[1:3] != [header.height, header.width]:
            raise RecordError(f"{name} shape {shape} disagrees with "
                              f"{header.height}x{header.width}")


def _decode_array(record: bytes, entry: dict, frame_indices: np.ndarray,
                  video_id: str) -> np.ndarray:
    shape, dtype = entry["shape"], _DTYPES[entry["dtype"]]
    if entry["encoding"] == "raw":
        full = np.frombuffer(record, dtype=dtype, count=int(np.prod(shape)),
                             offset=entry["offset"]).reshape(shape)
        return full[frame_indices]  # fancy indexing copies: the result is writable
    starts = entry["offset"] + np.concatenate([[0], np.cumsum(entry["frame_nbytes"])])
    frames = [_decode_png(record[starts[i]:starts[i + 1]], shape[1:], entry["name"],
                          video_id) for i in frame_indices]
    return np.stack(frames) if frames else np.zeros([0] + shape[1:], dtype)


def _decode_png(data: bytes, frame_shape: Sequence[int], name: str,
                video_id: str) -> np.ndarray:
    expected_mode = "RGB" if len(frame_shape) == 3 else "L"
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        # Checked before decoding: a corrupt size must not allocate a huge frame.
        if image.size != (frame_shape[1], frame_shape[0]) or image.mode != expected_mode:
            raise RecordError(f"{name}: PNG of {image.size[0]}x{image.size[1]} {image.mode}, expected "
                              f"{frame_shape[1]}x{frame_shape[0]} {expected_mode} (video {video_id!r})")
        frame = np.asarray(image)
    except RecordError:
        raise
    except Exception as error:  # Pillow raises several types for corrupt data
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecordError(f"{name}: undecodable PNG in video {video_id!r}: {reason}") from error
    if list(frame.shape) != list(frame_shape) or frame.dtype != np.uint8:
        raise RecordError(f"{name}: PNG of shape {frame.shape} {frame.dtype}, "
                          f"expected {list(frame_shape)} uint8 (video {video_id!r})")
    return frame


# A minimal reader of the protobuf wire format, enough for
# Example{features: Features{feature: map<string, Feature{bytes_list: {value}}>}}.

def _bytes_feature_from_tf_example(data: bytes, key: str) -> bytes | None:
    for field, value in _proto_fields(data):            # Example
        if field != 1:
            continue
        for f_field, entry in _proto_fields(value):     # Features
            if f_field != 1:
                continue
            entry_fields = dict(_proto_fields(entry))   # map entry: key=1, value=2
            if entry_fields.get(1, b"").decode("utf-8", "replace") != key:
                continue
            for kind, values in _proto_fields(entry_fields.get(2, b"")):  # Feature
                if kind == 1:                                             # bytes_list
                    for v_field, item in _proto_fields(values):
                        if v_field == 1:
                            return item
    return None


def _proto_fields(data: bytes):
    """Yields (field number, bytes) for the length-delimited fields of a message."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("length-delimited field runs past the message")
            yield field, data[position:position + length]
            position += length
        elif wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
