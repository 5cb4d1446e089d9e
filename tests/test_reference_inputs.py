"""The peers' inputs work as they are: real photos as references (any size and aspect
ratio, EXIF orientation, RGBA, grayscale, 16-bit) and a reference and poses of different
canvases (Moore-AnimateAnyone's 463x615 photo with a 512x704 DWPose video), each fitted
to the model's resolution around the person, through the function sample.py uses."""
import logging
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from consist_jax.poses import example_pose
from consist_jax.poses.io import save_poses
from consist_jax.poses.keypoints import PoseSequence
from consist_jax.poses.render import render
from consist_jax.sampling import io
from tests.runs import REPO, run_env, script_cmd
from tests.test_cli_errors import _assert_one_line_refusals, _refusals

# The peers' example pair, (H, W): a 463x615 (WxH) photo and a 512x704 (WxH) pose video.
REFERENCE_SIZE, POSE_SIZE = (615, 463), (704, 512)
RESOLUTION = (32, 32)


def _person(size, frames=1, shift=0.0, scale=1.0):
    """A PoseSequence of the example person standing on a canvas of ``size`` (H, W)."""
    points = example_pose("openpose18", *size)
    points[:, :2] = (points[:, :2] - [size[1] / 2, size[0] / 2]) * scale + [size[1] / 2 + shift, size[0] / 2]
    return PoseSequence(points=np.repeat(points[None], frames, axis=0), layout="openpose18",
                        height=size[0], width=size[1])


def _photo(rng, size):
    """A noisy photo with a flat-coloured person-sized block in its middle."""
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    image[size[0] // 4:3 * size[0] // 4, size[1] // 4:3 * size[1] // 4] = (200, 40, 90)
    return image


def _drawn(frames):
    return (frames > io.DRAWN_LEVEL).any(axis=-1)


@pytest.fixture(scope="module")
def peers_pair(tmp_path_factory):
    """(reference photo, its keypoints on its canvas, a 2-frame 704x512 pose video) paths."""
    folder = tmp_path_factory.mktemp("peers")
    rng = np.random.default_rng(0)
    reference = folder / "reference.png"
    Image.fromarray(_photo(rng, REFERENCE_SIZE)).save(reference)
    reference_pose = folder / "reference_pose.npz"
    save_poses(reference_pose, _person(REFERENCE_SIZE))
    video = folder / "poses.mp4"
    io.write_video(str(video), render(_person(POSE_SIZE, frames=2, scale=0.8)), fps=8)
    return str(reference), str(reference_pose), str(video)


def test_peers_pair_is_fitted_each_on_its_own(peers_pair, caplog):
    reference_path, reference_pose_path, video = peers_pair
    with caplog.at_level(logging.WARNING):
        reference, reference_pose, poses = io.read_sample_inputs(
            reference_path, video, RESOLUTION, reference_pose_path=reference_pose_path)
    assert reference.shape == RESOLUTION + (3,) and reference_pose.shape == RESOLUTION + (3,)
    assert poses.shape == (2,) + RESOLUTION + (3,)
    (warning,) = [r.getMessage() for r in caplog.records
                  if "different canvases of different aspect ratios" in r.getMessage()]
    assert "615x463" in warning and "704x512" in warning and "\n" not in warning
    # The whole person in every pose frame: drawn, and not touching the frame's edge.
    drawn = _drawn(poses)
    assert drawn.any(axis=(1, 2)).all() and not drawn[:, [0, -1]].any() and not drawn[:, :, [0, -1]].any()
    # The reference's person (its keypoints) is whole too: its skeleton lies inside the frame.
    assert _drawn(reference_pose).any() and not _drawn(reference_pose)[[0, -1]].any()


def test_keypoints_of_another_canvas_are_aligned_to_the_reference(tmp_path, caplog):
    """Keypoint poses of another person on another canvas: fitted on their own, then their
    neck put on the reference's neck and their torso scaled to it (global alignment)."""
    reference = tmp_path / "reference.png"
    Image.fromarray(np.full(REFERENCE_SIZE + (3,), 128, np.uint8)).save(reference)
    save_poses(tmp_path / "reference.npz", _person(REFERENCE_SIZE, shift=-60, scale=0.7))
    save_poses(tmp_path / "poses.npz", _person(POSE_SIZE, frames=3, shift=90, scale=0.9))
    with caplog.at_level(logging.WARNING):
        _, reference_pose, poses = io.read_sample_inputs(
            str(reference), str(tmp_path / "poses.npz"), RESOLUTION, reference_pose_path=str(tmp_path / "reference.npz"))
    assert any("aligned to the reference person (global)" in r.getMessage() for r in caplog.records)
    # The same person at the same place and size: the same drawing up to the rounding of
    # the aligned coordinates (which may move an anti-aliased edge pixel by a level).
    assert _drawn(reference_pose).mean() > 0.05
    assert np.abs(poses[0].astype(int) - reference_pose).mean() < 1.0


def test_poses_on_the_reference_canvas_share_its_box(rng, tmp_path):
    """Pose images of the reference's own video stay in register with it (one box)."""
    size = (24, 40)  # padded to 40x40: the model's size, so nothing is resampled
    skeleton = render(_person(size, shift=8))[0]
    skeleton[0, 0] = skeleton[-1, -1] = 255  # drawn from corner to corner: nothing may be cut
    Image.fromarray(skeleton).save(tmp_path / "reference.png")
    os.makedirs(tmp_path / "poses")
    Image.fromarray(skeleton).save(tmp_path / "poses" / "000.png")
    reference, reference_pose, poses = io.read_sample_inputs(
        str(tmp_path / "reference.png"), str(tmp_path / "poses"), (40, 40),
        reference_pose_path=str(tmp_path / "reference.png"))
    np.testing.assert_array_equal(poses[0], reference_pose)
    inside = slice(8, 32)  # the canvas' rows; outside them the photo is padded white
    np.testing.assert_array_equal(reference[inside], poses[0][inside])
    assert (reference[:8] == io.REFERENCE_FILL).all() and (poses[0][:8] == io.POSE_FILL).all()


def _save_with_orientation(path, upright_image, orientation):
    """A JPEG stored rotated, with the EXIF orientation tag that turns it upright."""
    stored = {6: np.rot90(upright_image, 1), 8: np.rot90(upright_image, -1), 3: np.rot90(upright_image, 2)}
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored[orientation])).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_phone_photo_is_turned_upright(tmp_path, orientation):
    upright = np.zeros((48, 32, 3), np.uint8)
    upright[:24] = (220, 30, 30)  # red top half, blue bottom half
    upright[24:] = (30, 30, 220)
    path = str(tmp_path / "photo.jpg")
    _save_with_orientation(path, upright, orientation)
    image = io.load_image(path, "reference image")
    assert image.shape == upright.shape
    # JPEG is lossy; the halves' colours are far apart (190 levels), its error a few levels.
    np.testing.assert_allclose(image[4:20].mean(axis=(0, 1)), (220, 30, 30), atol=12)
    np.testing.assert_allclose(image[28:44].mean(axis=(0, 1)), (30, 30, 220), atol=12)


def test_rgba_reference_is_composited_on_white(rng, tmp_path, caplog):
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0  # the top half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ref.png")
    with caplog.at_level(logging.WARNING):
        image, _ = io.read_reference(str(tmp_path / "ref.png"), (16, 16))
    assert (image[:8] == 255).all()
    np.testing.assert_array_equal(image[8:], rgba[8:, :, :3])
    assert any("has transparency: composited on white" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_grayscale_and_16_bit_references(rng, tmp_path, mode):
    gray = rng.integers(0, 256 if mode == "L" else 65536, (16, 16)).astype(np.uint8 if mode == "L" else np.uint16)
    Image.fromarray(gray).save(tmp_path / "ref.png")
    image, _ = io.read_reference(str(tmp_path / "ref.png"), (16, 16))
    expected = gray if mode == "L" else np.round(gray / 257.0)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], expected)


@pytest.mark.parametrize("size, expected_box", [
    ((40, 20), (-10, 0, 30, 40)),   # portrait on a square model, no person known: padded
    ((20, 20), (0, 0, 20, 20)),     # the model's aspect ratio: all of it
])
def test_fit_box_never_cuts_without_a_person(size, expected_box):
    assert io.fit_box(*size, (16, 16)) == expected_box


def test_fit_box_around_the_person():
    # The person fits in the largest square of a landscape: the square slides over them.
    assert io.fit_box(20, 60, (16, 16), person=(40, 2, 50, 18)) == (35, 0, 55, 20)
    # ...up to the image's edge.
    assert io.fit_box(20, 60, (16, 16), person=(50, 2, 60, 18)) == (40, 0, 60, 20)
    # A person wider than the largest square: the smallest square around them (padded).
    assert io.fit_box(20, 60, (16, 16), person=(10, 5, 40, 15)) == (10, -5, 40, 25)


def test_refusals_name_the_file(tmp_path, peers_pair):
    reference_path, _, video = peers_pair
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match=r"reference pose '.*other.png' is on a 10x12 canvas .* reference "
                                         r"image is 615x463"):
        io.read_sample_inputs(reference_path, video, RESOLUTION, reference_pose_path=str(tmp_path / "other.png"))
    Image.fromarray(np.zeros((8, 64, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"reference image '.*strip.png' is 8x64 \(HxW\): .* over 50% of it padding"):
        io.read_sample_inputs(str(tmp_path / "strip.png"), video, RESOLUTION)
    with pytest.raises(ValueError, match="--align_poses needs keypoints"):
        io.read_sample_inputs(reference_path, video, RESOLUTION, align="global")


def test_sample_py_with_the_peers_pair(peers_pair, uninterrupted_run, data_dir, tmp_path):
    """sample.py on a 615x463 photo and a 704x512 pose video: a video, and one warning line."""
    reference, reference_pose, video = peers_pair
    out = tmp_path / "out"
    result = subprocess.run(
        script_cmd("sample.py", f"--checkpoint={uninterrupted_run}", f"--reference={reference}",
                   f"--reference_pose={reference_pose}", f"--poses={video}", f"--out={out}", "--steps=2",
                   "--window=2", "--overlap=0"),
        cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(out)) == 2
    warnings = [line for line in result.stderr.splitlines() if "different canvases" in line]
    assert len(warnings) == 1, result.stderr[-3000:]


def test_sample_py_input_refusals_are_one_line(peers_pair, uninterrupted_run, data_dir, tmp_path):
    """Refused inputs after the checkpoint load: one line, exit code 2, before any compile."""
    from tests.test_videos import _write_mp4, corrupt_mp4

    reference, reference_pose, video = peers_pair
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "other.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    _write_mp4(str(tmp_path / "corrupt.mp4"), np.random.default_rng(0))
    corrupt_mp4(tmp_path / "corrupt.mp4")
    base = [f"--checkpoint={uninterrupted_run}", f"--out={tmp_path}/out.mp4"]
    cases = {
        f"--poses={video} --reference={reference} --reference_pose={tmp_path}/other.png": "is on a 10x12 canvas (HxW)",
        f"--poses={video} --reference={tmp_path}/broken.png": "cannot read",
        f"--poses={reference_pose} --reference={tmp_path}/dot.png": "is 1x1 (HxW), too small for the model's",
        f"--poses={tmp_path}/corrupt.mp4 --reference={reference}": "corrupt.mp4' is corrupt: decoding failed at frame",
    }
    results = _refusals("sample.py", [base + c.split() for c in cases], run_env(data_dir))
    _assert_one_line_refusals(results, cases.values())


def test_sample_py_refusal_after_the_load_is_one_line(peers_pair, uninterrupted_run, data_dir, tmp_path):
    """The real entry point: a partly corrupt pose video is refused in exactly one line on
    stderr (no orbax note from the checkpoint load, no JAX at-fork warning from ffmpeg's start)."""
    from tests.test_videos import _write_mp4, corrupt_mp4

    reference, _, _ = peers_pair
    _write_mp4(str(tmp_path / "corrupt.mp4"), np.random.default_rng(0))
    corrupt_mp4(tmp_path / "corrupt.mp4")
    result = subprocess.run(
        script_cmd("sample.py", f"--checkpoint={uninterrupted_run}", f"--reference={reference}",
                   f"--poses={tmp_path}/corrupt.mp4", f"--out={tmp_path}/out.mp4"),
        cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: pose video '{tmp_path}/corrupt.mp4' is corrupt: decoding failed at frame ")
    assert os.listdir(tmp_path) == ["corrupt.mp4"]
