"""Bounded fuzzing of the video record reader (data/records.py) and of the step that turns a
record into a training clip (data/clips.make_clip): whatever the bytes, decoding gives
exactly the arrays the record's header declares or raises one RecordError on one line, and
make_clip returns a clip or a BadExample naming the record, never raises."""
import io
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from consist_jax.data import records
from consist_jax.data.clips import BadExample, ClipOptions, make_clip
from consist_jax.data.source import RawVideoRecord
from tests.fuzzing import JSON, bounded, damaged
from tests.test_data_records import _tf_example

OPTIONS = ClipOptions(clip_length=2, height=4, width=4, crop_scale=(0.5, 1.0))
PREFIX = struct.Struct("<8sII")


@st.composite
def valid_records(draw) -> bytes:
    """A well-formed record of a tiny random video (1-3 frames, up to 5x5 pixels)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    with_keypoints = draw(st.booleans())
    keypoints = np.concatenate([rng.uniform(0, [w, h], (t, 18, 2)), rng.uniform(0, 1, (t, 18, 1))],
                               axis=-1).astype(np.float32)
    images = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    video = records.VideoExample(
        frames=images(t, h, w, 3), video_id="v", identity_id="p",
        layout="openpose18" if with_keypoints else records.NO_KEYPOINTS_LAYOUT, fps=10.0,
        keypoints=keypoints if with_keypoints else None,
        pose_images=images(t, h, w, 3) if not with_keypoints or draw(st.booleans()) else None,
        masks=images(t, h, w) % 2 if draw(st.booleans()) else None,
        region_masks=images(t, h, w) % 2 if draw(st.booleans()) else None)
    return records.encode_video(video, image_encoding=draw(st.sampled_from(["raw", "png"])))


def _split(record: bytes) -> tuple[dict, bytes]:
    _, _, header_len = PREFIX.unpack_from(record)
    return json.loads(record[PREFIX.size:PREFIX.size + header_len]), record[PREFIX.size + header_len:]


def _join(header, payload: bytes, version: int = records.FORMAT_VERSION) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(records.MAGIC, version, len(raw)) + raw + payload


NUMBERS = st.integers(-2, 8) | st.sampled_from([0, 2**31, 2**32 + 1, 2**63, 2**64 + 3]) | st.floats(-2, 8)
HEADER_VALUES = st.one_of(JSON, NUMBERS, st.sampled_from(["openpose18", "none", "dwpose134", ""]))
ENTRY_VALUES = {
    "name": st.sampled_from(["frames", "keypoints", "pose_images", "masks", "region_masks", "x"]) | JSON,
    "dtype": st.sampled_from(["uint8", "float32", "int64", "float64", "object", "<f4"]) | JSON,
    "shape": st.lists(NUMBERS, max_size=5) | JSON,
    "encoding": st.sampled_from(["raw", "png", "jpeg"]) | JSON,
    "nbytes": NUMBERS | JSON,
    "frame_nbytes": st.lists(NUMBERS, max_size=4) | JSON,
}


@st.composite
def mutated_records(draw) -> tuple[bytes, bytes]:
    """(bytes to decode, the record inside them): a valid record with one hostile change."""
    data = draw(valid_records())
    kind = draw(st.sampled_from(["bytes", "prefix", "header_field", "entry_field", "reshape",
                                 "drop_entry", "reorder", "json", "raw_header", "tf_example", "garbage"]))
    if kind == "bytes":
        return (draw(damaged(data)),) * 2
    if kind == "garbage":
        return (draw(st.binary(max_size=64)),) * 2
    header, payload = _split(data)
    if kind == "prefix":
        version = draw(st.integers(0, 2**32 - 1) | st.just(records.FORMAT_VERSION))
        raw = json.dumps(header).encode()
        length = draw(st.integers(0, 2**32 - 1) | st.integers(0, len(raw) + 8))
        data = PREFIX.pack(records.MAGIC, version, length) + raw + payload
    elif kind == "raw_header":
        data = _join(draw(st.binary(max_size=40)), payload)
    elif kind == "json":
        data = _join(draw(JSON), payload)
    elif kind == "header_field":
        key = draw(st.sampled_from(["video_id", "identity_id", "layout", "fps", "num_frames",
                                    "height", "width", "arrays"]))
        if draw(st.booleans()):
            header[key] = draw(HEADER_VALUES)
        else:
            del header[key]
        data = _join(header, payload)
    elif kind == "entry_field":
        entry = draw(st.sampled_from(header["arrays"]))
        key = draw(st.sampled_from(sorted(ENTRY_VALUES)))
        entry[key] = draw(ENTRY_VALUES[key])
        data = _join(header, payload)
    elif kind == "reshape":  # an array of another, self-consistent shape (e.g. 17 keypoints)
        data = _reshaped(header, payload, draw)
    elif kind == "drop_entry":
        header["arrays"].pop(draw(st.integers(0, len(header["arrays"]) - 1)))
        data = _join(header, payload)
    elif kind == "reorder":
        header["arrays"] = draw(st.permutations(header["arrays"]))
        data = _join(header, payload)
    else:  # tf_example: the TFDS envelope around a valid record, perhaps cut short
        wrapped = _tf_example({"video_id": b"v", records.TFDS_FEATURE_NAME: data})
        return wrapped[:draw(st.integers(0, len(wrapped)))] if draw(st.booleans()) else wrapped, data
    return data, data


def _reshaped(header: dict, payload: bytes, draw) -> bytes:
    """``header``'s record with one raw array given a new shape (and random bytes to match)."""
    blobs, offset = [], 0
    for entry in header["arrays"]:
        blobs.append(payload[offset:offset + entry["nbytes"]])
        offset += entry["nbytes"]
    i = draw(st.integers(0, len(header["arrays"]) - 1))
    entry = header["arrays"][i]
    shape = list(entry["shape"])
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = draw(st.integers(0, 20))
    if draw(st.booleans()):  # or drop / add an axis
        shape = shape[:-1] if draw(st.booleans()) else shape + [draw(st.integers(0, 3))]
    itemsize = np.dtype(entry["dtype"]).itemsize
    entry.update(shape=shape, encoding="raw", nbytes=math.prod(shape) * itemsize)
    entry.pop("frame_nbytes", None)
    blobs[i] = draw(st.binary(min_size=entry["nbytes"], max_size=entry["nbytes"]))
    return _join(header, b"".join(blobs))


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _assert_as_declared(video: records.VideoExample, record: bytes) -> None:
    """The oracle: the decoded arrays are, byte for byte, what the record's header declares."""
    header, payload = _split(record)
    num_frames, height, width = header["num_frames"], header["height"], header["width"]
    assert video.frames.shape == (num_frames, height, width, 3)
    assert (video.video_id, video.layout, video.fps) == (header["video_id"], header["layout"], header["fps"])
    offset, declared = 0, set()
    for entry in header["arrays"]:
        array, declared = getattr(video, entry["name"]), declared | {entry["name"]}
        assert array.dtype == np.dtype(entry["dtype"]) and array.shape == tuple(entry["shape"])
        blob = payload[offset:offset + entry["nbytes"]]
        if entry["encoding"] == "raw":
            assert array.tobytes() == blob
        else:
            starts = np.cumsum([0] + entry["frame_nbytes"])
            for i, frame in enumerate(array):
                np.testing.assert_array_equal(frame, _png(blob[starts[i]:starts[i + 1]]))
        offset += entry["nbytes"]
    assert offset == len(payload)
    for name in ("keypoints", "pose_images", "masks", "region_masks"):
        assert name in declared or getattr(video, name) is None


def _check(data: bytes, record: bytes, seed: int) -> None:
    try:
        video = records.decode_video(data)
    except records.RecordError as error:
        assert "\n" not in str(error), str(error)
    else:
        _assert_as_declared(video, record)
        indices = np.random.default_rng(seed).integers(0, video.num_frames, 3)
        subset = records.decode_video(data, indices)
        np.testing.assert_array_equal(subset.frames, video.frames[indices])
    raw = RawVideoRecord(index=7, path="/data/train-00003.array_record", position=2, data=data)
    try:
        raw.decode()
    except records.RecordError as error:
        assert str(error).startswith("record 7 (train-00003.array_record, position 2): ")
    clip = make_clip(raw, OPTIONS, np.random.default_rng(seed))
    if isinstance(clip, BadExample):
        assert "train-00003.array_record" in clip.message() and "\n" not in clip.message()
    else:
        assert clip["target"].shape == (OPTIONS.clip_length, OPTIONS.height, OPTIONS.width, 3)


@bounded(200)
@given(data=valid_records(), seed=st.integers(0, 2**32 - 1))
def test_valid_records_decode_as_declared(data, seed):
    _assert_as_declared(records.decode_video(data), data)
    _check(data, data, seed)


@bounded(200)
@given(case=mutated_records(), seed=st.integers(0, 2**32 - 1))
def test_mutated_records_decode_as_declared_or_fail_as_record_errors(case, seed):
    _check(*case, seed)


def test_keypoints_of_another_layout_are_a_bad_example(rng):
    """Found by the fuzzer: 17 keypoints under an 18-point layout reached the renderer."""
    from tests.test_data_records import random_video

    data = records.encode_video(random_video(rng, num_keypoints=17))
    clip = make_clip(RawVideoRecord(0, "/data/train-00000.array_record", 0, data), OPTIONS, rng)
    assert isinstance(clip, BadExample) and "layout 'openpose18' has 18" in clip.reason


def test_non_finite_keypoints_are_a_record_error(rng):
    from tests.test_data_records import random_video

    video = random_video(rng)
    video.keypoints[1, 3, 0] = np.inf
    video.keypoints[2] = np.nan  # a missing pose: fine
    with pytest.raises(records.RecordError, match=r"frame\(s\) \[1\] hold NaN or infinite"):
        records.decode_video(records.encode_video(video))
    assert records.decode_video(records.encode_video(video), [0, 2]).num_frames == 2


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    """One small ArrayRecord shard of four distinct records."""
    from consist_jax.data.shards import write_records

    path = str(tmp_path_factory.mktemp("fuzz_shard") / "train.array_record-00000-of-00001")
    write_records(path, [bytes([i]) * (100 + 50 * i) for i in range(4)])
    return path


@bounded(40)
@given(data=st.data())
def test_mutated_shards_fail_naming_the_file_or_read_intact(shard, data):
    """A damaged shard is refused as a whole (RecordError naming it), or each record reads
    back intact or as a read error the pipeline reports or skips, never as other bytes."""
    from consist_jax.data.source import VideoRecordSource

    with open(shard, "rb") as f:
        original = f.read()
    # The file is mostly zero padding: flip bytes where the chunks are, or at its ends.
    content = [i for i, byte in enumerate(original) if byte] + [0, len(original) - 1]
    path = shard.replace("train.", "damaged.")
    with open(path, "wb") as f:
        f.write(data.draw(damaged(original, content)))
    try:
        source = VideoRecordSource([path])
    except records.RecordError as error:
        assert path in str(error) and "\n" not in str(error)
        return
    assert len(source) == 4
    for index in range(4):
        record = source[index]
        assert record.data == bytes([index]) * (100 + 50 * index) or (
            record.data is None and record.read_error)


def test_unreadable_record_names_its_shard():
    raw = RawVideoRecord(3, "/data/train-00001.array_record", 5, None, "RuntimeError: bad chunk")
    with pytest.raises(records.RecordError,
                       match=r"^record 3 \(train-00001.array_record, position 5\): unreadable: RuntimeError"):
        raw.decode()
