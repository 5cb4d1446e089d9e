"""sampling.io reads what the files hold: 16-bit images scaled (not clipped, not cut to
their low byte), references too small for the model refused, corrupt or short pose
videos refused naming the file and frame, keypoints without a canvas on the reference's."""
import json
import struct
import zlib

import imageio.v2 as iio2
import numpy as np
import pytest
from PIL import Image

from consist_jax.poses import example_pose
from consist_jax.sampling import io
from tests.test_videos import corrupt_mp4

RESOLUTION = (16, 16)


def _write_png16(path, array):
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the channel count), written by hand:
    PIL cannot write 16-bit colour."""
    array = np.asarray(array, np.uint16)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_images_are_scaled_to_8_bits(rng, tmp_path, channels):
    shape = (12, 10) if channels == 1 else (12, 10, channels)
    values = rng.integers(0, 65536, shape)
    image = io.load_image(_write_png16(tmp_path / "ref16.png", values))
    gray = values if channels == 1 else values[..., 0]
    color = values[..., :3] if channels >= 3 else gray[..., None]
    alpha = values[..., -1:] / 65535.0 if channels in (2, 4) else 1.0  # composited on black
    expected = np.broadcast_to(color / 257.0 * alpha, image.shape)
    assert image.dtype == np.uint8 and image.shape == (12, 10, 3)
    # PIL cuts 16-bit colour to its high byte, we round 16-bit gray: either is within 1;
    # alpha cut to its high byte and the 8-bit composite's rounding add at most 1.5.
    np.testing.assert_allclose(image, expected, atol=1.0 if channels in (1, 3) else 2.5)


def test_16_bit_gray_reference_and_pose_images_are_not_white_or_blank(rng, tmp_path):
    gray = rng.integers(256, 65280, (16, 16)).astype(np.uint16)  # a real 16-bit image
    Image.fromarray(gray).save(tmp_path / "ref.png")  # PIL writes mode I;16
    reference = io.read_image(str(tmp_path / "ref.png"), RESOLUTION)
    np.testing.assert_allclose(reference[..., 0], gray / 257.0, atol=0.5)
    folder = tmp_path / "poses"
    folder.mkdir()
    skeleton = np.zeros((16, 16), np.uint16)
    skeleton[4:12, 7:9] = 65535  # one white limb on black, 16-bit
    Image.fromarray(skeleton).save(folder / "000.png")
    poses = io.read_pose_images(str(folder), RESOLUTION)
    np.testing.assert_array_equal(poses[0, ..., 0], np.where(skeleton > 0, 255, 0))


@pytest.mark.parametrize("size, refusal", [((1, 1), r"is 1x1 .* at least 4x4"), ((3, 40), "over 50% of it padding"),
                                           ((4, 4), None), ((5, 40), "over 50% of it padding"), ((6, 9), None)])
def test_references_too_small_or_too_elongated_are_refused(rng, tmp_path, size, refusal):
    path = str(tmp_path / "tiny.png")
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    if refusal is None:
        image, canvas = io.read_reference(path, RESOLUTION)
        assert image.shape == RESOLUTION + (3,) and canvas == size
        return
    with pytest.raises(ValueError, match=rf"tiny\.png' {refusal}" if "1x1" in refusal else refusal):
        io.read_reference(path, RESOLUTION)


def _write_mp4(path, rng, frames=20, height=32, width=48):
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    iio2.mimwrite(path, list(video), fps=10, codec="libx264", macro_block_size=1, quality=9)
    return video


def test_pose_video_decodes_every_frame_in_order(rng, tmp_path):
    path = str(tmp_path / "poses.mp4")
    colors = rng.integers(16, 240, (12, 3))  # a flat colour per frame: H.264 keeps it closely
    iio2.mimwrite(path, [np.full((32, 48, 3), c, np.uint8) for c in colors], fps=10, codec="libx264",
                  macro_block_size=1, quality=9)
    frames = io.read_pose_images(path, (32, 48))
    assert frames.shape == (12, 32, 48, 3)
    # YUV 4:2:0 round trip and quantisation: a few levels, far below the colours' spread.
    np.testing.assert_allclose(frames.mean(axis=(1, 2)), colors, atol=8)


def test_partly_corrupt_pose_video_names_file_and_frame(rng, tmp_path):
    path = tmp_path / "poses.mp4"
    _write_mp4(str(path), rng)
    corrupt_mp4(path)
    with pytest.raises(ValueError, match=r"poses\.mp4' is corrupt: decoding failed at frame \d+ \(ffmpeg: "):
        io.read_pose_images(str(path), (32, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the index at the end is gone
    with pytest.raises(ValueError, match=r"cannot read pose video '.*poses\.mp4': "):
        io.read_pose_images(str(path), (32, 48))


def test_pose_video_shorter_than_its_header_is_refused(rng, tmp_path, monkeypatch):
    import imageio_ffmpeg

    path = str(tmp_path / "poses.mp4")
    _write_mp4(path, rng, frames=10)
    read_frames = imageio_ffmpeg.read_frames

    def doubled_duration(*args, **kwargs):  # a header that promises 20 frames
        reader = read_frames(*args, **kwargs)
        meta = next(reader)
        reader.close()
        yield dict(meta, duration=2 * meta["duration"])

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", doubled_duration)
    with pytest.raises(ValueError, match=r"poses\.mp4' decoded to 10 frames but its header promises 20"):
        io.read_pose_images(path, (32, 48))


def test_keypoints_without_a_canvas_are_on_the_reference(tmp_path):
    """Plain OpenPose JSON records no image size: the CLI passes the reference's."""
    pose = example_pose("openpose18", 64, 48)
    path = tmp_path / "poses.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": pose.ravel().tolist()}]}))
    images, poses = io.read_poses(str(path), (32, 24), canvas=(64, 48))
    # Halved about pixel centres: x -> (x + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(poses.points[0, :, :2], (pose[:, :2] + 0.5) / 2 - 0.5, atol=1e-3)
    assert images.shape == (1, 32, 24, 3) and images.any()
    with pytest.raises(ValueError, match=r"poses\.json: the file does not record the image size"):
        io.read_poses(str(path), (32, 24))


def test_keypoints_without_a_canvas_that_miss_the_reference(rng, tmp_path):
    """Keypoints of a larger image that record no size are taken to be on the reference's
    canvas: the error says so and how to fix the file (sample.py has no size flags). A
    reference below the stated minimum is refused first, naming the reference, not the poses."""
    pose = example_pose("openpose18", 64, 48)
    path = tmp_path / "poses.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": pose.ravel().tolist()}]}))
    reference = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(reference)
    with pytest.raises(ValueError, match=r"poses\.json: frame 0: .* off the 16x12 \(HxW\) canvas as pixels coordinates; the file "
                                         r"records no image size, so this default one was assumed: write the size "
                                         r".*'canvas_height'/'canvas_width'") as error:
        io.read_sample_inputs(str(reference), str(path), RESOLUTION)
    assert "height=" not in str(error.value)  # no hint at arguments the command line lacks
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"reference image '.*dot\.png' is 1x1 \(HxW\), too small for the "
                                         r"model's 16x16: it must be at least 4x4"):
        io.read_sample_inputs(str(tmp_path / "dot.png"), str(path), RESOLUTION, reference_pose_path=str(path))


def test_keypoints_are_fitted_around_the_person(tmp_path):
    """A person moving across a wide canvas stays in every frame (no centre crop cuts them)."""
    pose = example_pose("openpose18", 64, 48)
    frames = [pose.copy(), pose.copy()]
    frames[0][:, 0] += 56  # frame 0 in the middle of a 64x160 canvas,
    frames[1][:, 0] += 110  # frame 1 at its far right
    path = tmp_path / "wide.npz"
    np.savez(path, keypoints=np.stack(frames), height=64, width=160)
    images, poses = io.read_poses(str(path), (32, 32))
    assert images.shape == (2, 32, 32, 3) and all(frame.any() for frame in images)
    visible = poses.visible()
    assert (poses.xy[visible] >= -0.5).all() and (poses.xy[visible] <= 31.5).all()


def test_gif_pose_video_and_single_pose_image(rng, tmp_path):
    frames = rng.integers(0, 2, (3, 16, 16, 1)) * rng.integers(0, 256, (3, 1, 1, 3))  # flat colours
    frames = frames.astype(np.uint8)
    io.write_video(str(tmp_path / "poses.gif"), frames)
    np.testing.assert_array_equal(io.read_pose_images(str(tmp_path / "poses.gif"), (16, 16)), frames)
    Image.fromarray(frames[1]).save(tmp_path / "pose.png")
    np.testing.assert_array_equal(io.read_pose_images(str(tmp_path / "pose.png"), (16, 16)), frames[1:2])


def test_dataset_builder_reads_16_bit_frames_scaled(tmp_path, rng):
    """The local-video dataset reader decodes 16-bit grayscale frames as load_image does."""
    from PIL import Image

    from consist_jax.data.tfds import local_videos

    gray = rng.integers(0, 65536, size=(6, 5), dtype=np.uint16)
    path = tmp_path / "0000.png"
    Image.fromarray(gray).save(path)
    frame = local_videos._read_image(path, "RGB")
    expected = np.round(gray / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(frame, np.repeat(expected[..., None], 3, axis=-1))
    np.testing.assert_array_equal(local_videos._read_image(path, "L"), expected)
