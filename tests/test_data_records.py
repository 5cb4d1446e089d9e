"""The per-video record format: round trips, partial decoding, and refusing bad bytes."""
import numpy as np
import pytest

from consist_jax.data import records


def random_video(rng, frames=5, height=12, width=10, num_keypoints=17, **overrides):
    fields = dict(
        frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        keypoints=rng.normal(5, 3, (frames, num_keypoints, 3)).astype(np.float32),
        pose_images=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        masks=rng.integers(0, 2, (frames, height, width), dtype=np.uint8),
        region_masks=rng.integers(0, 2, (frames, height, width), dtype=np.uint8),
        video_id="vid-7", identity_id="person-3", layout="openpose18", fps=12.5)
    fields.update(overrides)
    return records.VideoExample(**fields)


def assert_same_video(a, b, frame_indices=slice(None)):
    for name in ("frames", "keypoints", "pose_images", "masks", "region_masks"):
        expected = getattr(a, name)
        if expected is None:
            assert getattr(b, name) is None
        else:
            np.testing.assert_array_equal(getattr(b, name), expected[frame_indices], err_msg=name)
    assert (b.video_id, b.identity_id, b.layout, b.fps) == (a.video_id, a.identity_id, a.layout, a.fps)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_round_trip_and_frame_subset(rng, encoding):
    video = random_video(rng)
    data = records.encode_video(video, image_encoding=encoding)
    assert_same_video(video, records.decode_video(data))
    subset = [4, 0, 2, 2]
    assert_same_video(video, records.decode_video(data, subset), subset)
    header = records.read_header(data)
    assert (header.num_frames, header.height, header.width) == (5, 12, 10)


def test_optional_arrays_may_be_absent(rng):
    video = random_video(rng, pose_images=None, masks=None, region_masks=None)
    decoded = records.decode_video(records.encode_video(video))
    assert_same_video(video, decoded)


def test_needs_keypoints_or_pose_images(rng):
    with pytest.raises(ValueError, match="keypoints or pose_images"):
        records.encode_video(random_video(rng, keypoints=None, pose_images=None))
    with pytest.raises(ValueError, match="masks"):
        records.encode_video(random_video(rng, masks=np.zeros((5, 3, 3), np.uint8)))


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_truncated_or_padded_record_is_refused(rng, encoding):
    data = records.encode_video(random_video(rng), image_encoding=encoding)
    for bad in (data[:-1], data[: len(data) // 2], data[:20], data + b"\0"):
        with pytest.raises(records.RecordError):
            records.decode_video(bad)


def test_garbage_and_lying_headers_are_refused(rng):
    with pytest.raises(records.RecordError):
        records.decode_video(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    data = records.encode_video(random_video(rng))
    # A header claiming another dtype than the format's is refused, not reinterpreted.
    lying = data.replace(b'"dtype": "uint8"', b'"dtype": "int64"', 1)
    with pytest.raises(records.RecordError, match="dtype"):
        records.decode_video(lying)
    with pytest.raises(records.RecordError, match="out of range"):
        records.decode_video(data, [5])


def _length_delimited(field, payload):
    """Protobuf wire format of one length-delimited field (what TFDS's writer produces)."""
    tag, length, out = (field << 3) | 2, len(payload), bytearray()
    for value in (tag, length):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def _tf_example(features):
    """tf.train.Example{features{feature: {key: Feature{bytes_list{value}}}}}, by hand."""
    entries = b"".join(
        _length_delimited(1, _length_delimited(1, key.encode())
                          + _length_delimited(2, _length_delimited(1, _length_delimited(1, value))))
        for key, value in features.items())
    return _length_delimited(1, entries)


def test_tfds_example_envelope_is_unwrapped(rng):
    video = random_video(rng)
    inner = records.encode_video(video)
    wrapped = _tf_example({"video_id": b"vid-7", records.TFDS_FEATURE_NAME: inner})
    assert records.unwrap_record(wrapped) == inner
    assert_same_video(video, records.decode_video(wrapped))
    with pytest.raises(records.RecordError, match=records.TFDS_FEATURE_NAME):
        records.decode_video(_tf_example({"other": inner}))


def test_missing_pose_frames(rng):
    keypoints = rng.normal(size=(4, 18, 3)).astype(np.float32)
    keypoints[2] = np.nan
    keypoints[3, 5] = np.nan  # one missing point is not a missing pose
    assert records.frames_with_missing_pose(keypoints).tolist() == [2]
