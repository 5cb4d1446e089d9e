"""Pose extraction (consist_jax.poses.extract) end to end on CPU, with tiny ONNX models of
the published models' signatures whose outputs are known (tests/pose_models.py): the
detector reports a box around a white cross, the pose model puts every point on it."""
import json
import os

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from consist_jax.poses import extract, load_poses
from tests import pose_models

SIZES = (48, 64, 80, 96)  # multiples of 16: ffmpeg's macro blocks keep the frame size


@pytest.fixture(scope="module")
def pose_model(tmp_path_factory):
    return pose_models.make_pose_model(tmp_path_factory.mktemp("models") / "pose.onnx")


def person_clip(rng, num_frames):
    """Frames with a white cross inside one person box, one black frame, the detector that
    sees that box (plus a suppressed duplicate and a non-person), and what to expect."""
    height, width = (int(rng.choice(SIZES)) for _ in range(2))
    x0, y0 = rng.integers(2, 10), rng.integers(2, 10)
    x1, y1 = width - rng.integers(2, 10), height - rng.integers(2, 10)
    crosses = np.stack([rng.integers(x0 + 3, x1 - 3, num_frames),
                        rng.integers(y0 + 3, y1 - 3, num_frames)], axis=1)
    frames = np.stack([pose_models.draw_cross(height, width, x, y) for x, y in crosses])
    black = int(rng.integers(num_frames))
    frames[black] = 0
    ratio = min(640 / height, 640 / width)
    table = pose_models.yolox_output([
        (x0, y0, x1, y1, 0.9, 0.95, 0),               # the person
        (x0 + 1, y0, x1 + 1, y1, 0.8, 0.9, 0),        # the same person again: NMS drops it
        (0, 0, width / 3, height / 3, 0.99, 0.99, 5),  # not a person
    ], ratio)
    box = np.array([x0, y0, x1, y1], np.float64)
    return frames, crosses, black, table, box


def check_poses(poses, frames, crosses, black, box, codec_blur):
    """Every point of every frame with a cross lies on it; the black frame has no person.

    The pose model's argmax picks the first crop column on the 3-pixel bar, within
    1 pixel of its centre plus one crop pixel (``scale`` frame pixels); a lossy codec
    blurs the bar's edges by up to ``codec_blur`` more pixels.
    """
    assert poses.layout == "dwpose134"
    assert (poses.height, poses.width) == frames.shape[1:3]
    assert len(poses) == len(frames)
    scale = extract.crop_matrix(box, pose_models.POSE_HW)[0, 0]
    tolerance = 1 + scale + codec_blur
    for t, (x, y) in enumerate(crosses):
        if t == black:
            assert not np.any(poses.points[t, :, 2] > 0)
            continue
        np.testing.assert_allclose(poses.points[t, :, 2], 1.0)  # the stand-in's peak
        assert np.abs(poses.points[t, :, :2] - [x, y]).max() <= tolerance, t


def test_decode_yolox_keeps_the_person_box(rng):
    frames, _, _, table, box = person_clip(rng, 2)
    ratio = min(640 / frames.shape[1], 640 / frames.shape[2])
    boxes = extract.decode_yolox(table, (640, 640), ratio)
    assert boxes.shape == (1, 5)
    # float32 table entries: the box edges carry float32 rounding of values up to ~100 px.
    np.testing.assert_allclose(boxes[0, :4], box, atol=1e-3)
    np.testing.assert_allclose(boxes[0, 4], 0.9 * 0.95, rtol=1e-6)


def test_bilinear_warp_matches_integer_shifts_and_resizes(rng):
    image = rng.integers(0, 256, (7, 9, 3)).astype(np.float32)
    dx, dy = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
    shifted = extract.bilinear_warp(image, np.array([[1.0, 0, dx], [0, 1.0, dy]]), 7, 9, border="zero")
    expected = np.zeros_like(image)
    ys, xs = np.mgrid[0:7, 0:9]
    inside = (ys + dy >= 0) & (ys + dy < 7) & (xs + dx >= 0) & (xs + dx < 9)
    expected[inside] = image[(ys + dy)[inside], (xs + dx)[inside]]
    np.testing.assert_array_equal(shifted, expected)
    # Halving a size by 2 with half-pixel centres averages each 2x2 block.
    halved = extract.letterbox(np.repeat(np.repeat(image, 2, 0), 2, 1).astype(np.uint8), 7, 9)
    np.testing.assert_array_equal(halved[0], np.round(image))
    assert halved[1] == 0.5


def test_extract_video_cli(rng, tmp_path, pose_model, capsys):
    frames, crosses, black, table, box = person_clip(rng, 5)
    video = str(tmp_path / "dance.mp4")
    imageio.mimwrite(video, frames, fps=10, quality=10, macro_block_size=16)
    detector = pose_models.make_detector(tmp_path / "det.onnx", table)
    out = tmp_path / "dance_poses.json"
    extract.main([f"--video={video}", f"--out={out}", f"--detector={detector}",
                  f"--pose_model={pose_model}", "--batch_size=2"])
    assert "wrote 5 poses" in capsys.readouterr().out
    poses = load_poses(out)
    # yuv420p halves the chroma resolution and blurs edges by about a pixel.
    check_poses(poses, frames, crosses, black, box, codec_blur=1.0)
    assert json.loads(out.read_text())["fps"] == 10


def test_extract_image_folder(rng, tmp_path, pose_model):
    frames, crosses, black, table, box = person_clip(rng, 3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames):  # natural order: frame2 before frame10
        Image.fromarray(frame).save(folder / f"frame{t * 5}.png")
    detector = pose_models.make_detector(tmp_path / "det.onnx", table)
    poses = extract.extract_to_file(str(folder), str(tmp_path / "poses.npz"), detector,
                                    pose_model, batch_size=4, progress=False)
    check_poses(poses, frames, crosses, black, box, codec_blur=0.0)
    check_poses(load_poses(tmp_path / "poses.npz"), frames, crosses, black, box, codec_blur=0.0)


def test_sample_extracts_poses_of_a_real_video(rng, tmp_path, pose_model):
    frames, crosses, black, table, box = person_clip(rng, 2)
    video = str(tmp_path / "real.mp4")
    imageio.mimwrite(video, frames, fps=10, quality=10, macro_block_size=16)
    detector = pose_models.make_detector(tmp_path / "det.onnx", table)
    out = str(tmp_path / "result.mp4")
    path = extract.poses_for_sampling(video, detector, pose_model, out)
    assert path == str(tmp_path / "result.poses.json")
    check_poses(load_poses(path), frames, crosses, black, box, codec_blur=1.0)
    assert extract.poses_for_sampling(path, None, None, out) == path  # no models: as it is
    with pytest.raises(ValueError, match="--poses=.*keypoints file"):
        extract.poses_for_sampling(path, detector, pose_model, out)
    with pytest.raises(ValueError, match="needs both --pose_detector and --pose_model"):
        extract.poses_for_sampling(video, detector, None, out)


def test_bad_models_are_one_line_errors(tmp_path, pose_model, capsys):
    frames = np.zeros((1, 32, 32, 3), np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(frames[0]).save(folder / "0.png")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    cases = [
        (str(tmp_path / "missing.onnx"), pose_model, "--detector=.*missing.onnx.*no such file"),
        (str(garbage), pose_model, "--detector=.*not a loadable ONNX model"),
        # The pose model where the detector belongs: its output is not YOLOX's.
        (pose_model, pose_model, "--detector=.*expected YOLOX"),
    ]
    for detector, model, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            extract.main([f"--images={folder}", f"--out={tmp_path / 'p.json'}",
                          f"--detector={detector}", f"--pose_model={model}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert __import__("re").search(message, err), err
    assert not os.path.exists(tmp_path / "p.json")
