"""consist_jax.videos, the one reader of video files: every frame in order, or an error naming
the file and the frame where decoding failed. Each reader of videos goes through it: the
pose videos of sampling, pose extraction (sample.py --pose_detector, build_own.py) and the
local-video dataset builder, none of which may turn a damaged video into garbage frames."""
import struct

import imageio.v2 as iio2
import numpy as np
import pytest

from consist_jax import videos
from consist_jax.data.tfds import local_videos
from consist_jax.poses import extract
from consist_jax.sampling import io


def _write_mp4(path, rng, frames=20, height=32, width=48):
    """Flat colours per frame (H.264 keeps them closely) -> the colours (F, 3)."""
    colors = rng.integers(16, 240, (frames, 3))
    iio2.mimwrite(path, [np.full((height, width, 3), c, np.uint8) for c in colors], fps=10, codec="libx264",
                  macro_block_size=1, quality=9)
    return colors


def corrupt_mp4(path):
    """Overwrites a quarter of the frame data in the middle, several frames' prefixes included."""
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 4
    size = struct.unpack(">I", data[start - 8:start - 4])[0]
    middle = slice(start + size * 3 // 8, start + size * 5 // 8)
    data[middle] = b"\xff" * (middle.stop - middle.start)
    path.write_bytes(bytes(data))


READERS = {
    "sampling's pose video": lambda path: io.load_pose_images(path),
    "pose extraction": lambda path: [batch for batch in extract.open_frames(path).batches(4)],
    "the local-video dataset builder": lambda path: local_videos._read_mp4(path),
}


def test_frames_stream_in_order(rng, tmp_path):
    path = str(tmp_path / "video.mp4")
    colors = _write_mp4(path, rng, frames=12)
    assert videos.probe(path) == videos.VideoInfo(32, 48, 10.0, 12)
    streamed = iter(videos.iter_frames(path))
    first = next(streamed)
    streamed.close()  # stopping early ends ffmpeg, and raises nothing
    frames = videos.read_frames(path)
    np.testing.assert_array_equal(first, frames[0])
    assert frames.shape == (12, 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.mean(axis=(1, 2)), colors, atol=8)  # YUV 4:2:0 round trip
    source = extract.open_frames(path)
    assert (source.height, source.width, source.num_frames, source.fps) == (32, 48, 12, 10.0)


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_partly_corrupt_video(rng, tmp_path, reader):
    path = tmp_path / "video.mp4"
    _write_mp4(str(path), rng)
    corrupt_mp4(path)
    # Where ffmpeg meets the damage depends on how far it has read when the header is parsed
    # (a race between its decoder and imageio-ffmpeg's probe, seen once in CI): either way one
    # line naming the file and ffmpeg's reason.
    with pytest.raises(ValueError, match=r"video '.*video\.mp4' is corrupt: decoding failed at frame \d+ \(ffmpeg: "
                                         r"|cannot read video '.*video\.mp4': .+"):
        READERS[reader](str(path))
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # its index is gone
    with pytest.raises(ValueError, match=r"cannot read .*video '.*cut\.mp4': \S"):
        READERS[reader](str(tmp_path / "cut.mp4"))
