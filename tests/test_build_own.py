"""Your own dataset (consist_jax.data.build_own): a folder of videos -> shards train.py reads.

The videos are synthetic people (consist_jax.data.synthetic) written as mp4 files and a
frame folder, with their keypoints as side files, plus a video that cannot be read."""
import json
import os
import subprocess

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from consist_jax.data import build_own, synthetic
from consist_jax.data.source import VideoRecordSource
from consist_jax.poses import PoseSequence, save_poses
from tests import pose_models
from tests.runs import REPO, run_env, train_cmd

SIZE, FRAMES, OUT_SIZE = 32, 8, 24
NAMES = ("dancer_a", "dancer_b", "dancer_c")


def make_videos(rng, root):
    """3 synthetic videos (two mp4 files, one frame folder) with their poses, and one
    broken mp4; returns ({id: synthetic example}, videos dir, poses dir)."""
    config = synthetic.SyntheticConfig(identities=3, frames=FRAMES, size=SIZE,
                                       seed=int(rng.integers(1 << 30)))
    videos, poses = root / "videos", root / "poses"
    videos.mkdir()
    poses.mkdir()
    examples = {}
    for identity, name in enumerate(NAMES):
        example = synthetic.make_video(config, identity, 0)
        examples[name] = example
        if name == "dancer_b":
            (videos / name).mkdir()
            for t, frame in enumerate(example.frames):
                Image.fromarray(frame).save(videos / name / f"{t}.png")
        else:
            imageio.mimwrite(videos / f"{name}.mp4", example.frames, fps=12, quality=10,
                             macro_block_size=16)
        save_poses(poses / f"{name}.npz", PoseSequence(example.keypoints, example.layout,
                                                        SIZE, SIZE))
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    save_poses(poses / "broken.npz", PoseSequence(examples["dancer_a"].keypoints, "openpose18",
                                                  SIZE, SIZE))
    return examples, str(videos), str(poses)


def read_split(out, split):
    source = VideoRecordSource.for_split(out, split)
    return [source[i].decode() for i in range(len(source))]


def check_keypoints_follow_one_crop(built, original):
    """The stored keypoints are the originals under one crop-and-resize: x' = a x + b,
    y' = a y + c with one scale a for the whole video, and inside the stored frame."""
    visible = np.isfinite(built[..., 0]) & (original[..., 2] > 0)
    xy, xy_built = original[visible][:, :2], built[visible][:, :2]
    design = np.zeros((2 * len(xy), 3))
    design[0::2, 0], design[0::2, 1] = xy[:, 0], 1
    design[1::2, 0], design[1::2, 2] = xy[:, 1], 1
    (scale, bx, by), *_ = np.linalg.lstsq(design, xy_built.reshape(-1), rcond=None)
    # float32 keypoints of up to ~32 px: residuals of a few float32 ulps.
    np.testing.assert_allclose(design @ [scale, bx, by], xy_built.reshape(-1), atol=1e-3)
    assert scale > 0
    assert np.all((xy_built >= -0.5) & (xy_built <= OUT_SIZE - 0.5))


def test_build_skips_bad_videos_and_resumes_without_duplicates(rng, tmp_path, monkeypatch):
    examples, videos, poses = make_videos(rng, tmp_path)
    out = str(tmp_path / "data")
    settings = build_own.BuildSettings(size=OUT_SIZE, test_fraction=0.34, seed=1, fps=12)  # of dancer_b/
    real_build, calls = build_own.build_example, []

    def interrupted_on_the_third_video(video_id, *args):
        calls.append(video_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's ^C between videos
        return real_build(video_id, *args)

    monkeypatch.setattr(build_own, "build_example", interrupted_on_the_third_video)
    with pytest.raises(KeyboardInterrupt):
        build_own.build_dataset(videos, out, settings, poses_dir=poses)
    assert calls == ["broken", "dancer_a", "dancer_b"]  # natural order
    assert not os.path.exists(os.path.join(out, "dataset_info.json"))

    calls.clear()
    with pytest.raises(ValueError, match="unfinished build of other videos or flags"):
        build_own.build_dataset(videos, out, build_own.BuildSettings(size=OUT_SIZE + 1),
                                poses_dir=poses)
    report = build_own.build_dataset(videos, out, settings, poses_dir=poses)
    assert calls == ["dancer_b", "dancer_c"]  # the finished ones are not redone
    assert list(report.skipped) == ["broken"] and "broken.mp4" in report.skipped["broken"]
    assert not os.path.exists(os.path.join(out, build_own.WORK_FOLDER))

    info = json.loads(open(os.path.join(out, "dataset_info.json")).read())
    assert info["skipped"] == report.skipped
    ids = []
    for split in ("train", "test"):
        stored = read_split(out, split)
        assert [v.video_id for v in stored] == report.written[split]
        ids += [v.video_id for v in stored]
        for video in stored:
            assert video.frames.shape == (FRAMES, OUT_SIZE, OUT_SIZE, 3)
            assert video.layout == "openpose18" and video.fps == 12
            check_keypoints_follow_one_crop(video.keypoints, examples[video.video_id].keypoints)
    assert sorted(ids) == list(NAMES) and len(report.written["test"]) == 1

    # A finished dataset is never overwritten.
    with pytest.raises(FileExistsError, match="finished dataset"):
        build_own.build_dataset(videos, out, settings, poses_dir=poses)


def test_build_extracts_poses_with_the_models(rng, tmp_path):
    frames = np.stack([pose_models.draw_cross(48, 64, int(x), int(y))
                       for x, y in zip(rng.integers(20, 44, 3), rng.integers(16, 32, 3))])
    videos = tmp_path / "videos"
    videos.mkdir()
    imageio.mimwrite(videos / "cross.mp4", frames, fps=10, quality=10, macro_block_size=16)
    detector = pose_models.make_detector(tmp_path / "det.onnx", pose_models.yolox_output(
        [(4, 4, 60, 44, 0.9, 0.9, 0)], ratio=10.0))
    model = pose_models.make_pose_model(tmp_path / "pose.onnx")
    out = str(tmp_path / "data")
    report = build_own.build_dataset(str(videos), out, build_own.BuildSettings(
        size=OUT_SIZE, test_fraction=0.0), detector=detector, pose_model=model)
    assert report.written == {"train": ["cross"], "test": []} and not report.skipped
    (video,) = read_split(out, "train")
    assert video.layout == "dwpose134" and video.keypoints.shape == (3, 134, 3)
    assert video.frames.shape == (3, OUT_SIZE, OUT_SIZE, 3) and video.fps == 10


def test_cli_refusals_are_one_line(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    for argv, message in [
        ([f"--videos={tmp_path / 'videos'}", f"--out={tmp_path / 'd'}"],
         "give --poses_dir, or both --detector and --pose_model"),
        ([f"--videos={tmp_path / 'videos'}", f"--out={tmp_path / 'd'}", f"--poses_dir={tmp_path}"],
         "no video files"),
        ([f"--videos={tmp_path / 'nope'}", f"--out={tmp_path / 'd'}", f"--poses_dir={tmp_path}"],
         "not a folder"),
        ([f"--videos={tmp_path}", f"--out={tmp_path / 'd'}", f"--poses_dir={tmp_path}", "--size=0"],
         "--size"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            build_own.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert message in err, err


def test_train_runs_on_an_own_dataset(rng, tmp_path):
    _, videos, poses = make_videos(rng, tmp_path)
    out = str(tmp_path / "data")
    build_own.main([f"--videos={videos}", f"--out={out}", f"--poses_dir={poses}",
                    f"--size={OUT_SIZE}", "--test_fraction=0.34"])
    # Only the data folder differs from the tiny synthetic run (tests/configs/tiny.py).
    result = subprocess.run(train_cmd(str(tmp_path / "run"), "--config.train.num_steps=2"),
                            cwd=REPO, env=run_env(out), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints") or os.listdir(tmp_path / "run")
    assert "weights nothing here" in result.stdout  # the demo's figure weight: own videos carry no masks
