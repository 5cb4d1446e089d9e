"""sample.py / evaluate.py / SCDPipeline on a trained tiny checkpoint: bad inputs fail with
a clear error before any compile, and sample.py reproduces an evaluated video bit for bit."""
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from consist_jax.sampling import io
from consist_jax.sampling.pipeline import SCDPipeline
from tests.configs.tiny import get_config as tiny_config
from tests.runs import REPO, run_env, script_cmd


# Runs argv[2:] with writes past argv[1] bytes failing (EFBIG), as on a full disk.
LIMITED_FILE_SIZE = ("import os, resource, sys; limit = int(sys.argv[1]); "
                     "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])")


@pytest.fixture(scope="module")
def pipe(uninterrupted_run, monkeypatch_module):
    """The tiny run's pipeline with compiling forbidden: every error must come first."""
    pipe = SCDPipeline.from_checkpoint(uninterrupted_run)

    def no_compile(*args, **kwargs):
        raise AssertionError("the input check came after a compile")

    monkeypatch_module.setattr(pipe, "_compiled", no_compile)
    return pipe


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        SCDPipeline.from_checkpoint(str(tmp_path / "nowhere"))


def test_unreadable_reference_image(tmp_path):
    bad = tmp_path / "ref.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*ref.png"):
        io.read_image(str(bad), (16, 16))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        io.read_image(str(tmp_path / "missing.png"), (16, 16))


def test_zero_poses(pipe, rng, tmp_path):
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="F >= 1"):
        pipe(reference, np.zeros((0, 16, 16, 3), np.uint8), reference_pose=reference)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        io.read_poses(str(tmp_path / "empty"), (16, 16))


def test_poses_of_another_resolution(pipe, rng, tmp_path):
    folder = tmp_path / "poses"
    folder.mkdir()
    _save(folder / "000.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    _save(folder / "001.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="001.png is 20x24"):
        io.read_poses(str(folder), (16, 16))
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="model's resolution is \\(16, 16\\)"):
        pipe(reference, rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8), reference_pose=reference)
    with pytest.raises(ValueError, match="injects the reference pose"):
        pipe(reference, rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))


def test_keypoints_with_the_wrong_number_of_joints(tmp_path):
    frame = {"people": [{"pose_keypoints_2d": list(np.random.default_rng(0).uniform(0, 16, 3 * 15))}],
             "canvas_height": 16, "canvas_width": 16}
    path = tmp_path / "poses.json"
    path.write_text(json.dumps(frame))  # one OpenPose frame with 15 body points
    with pytest.raises(ValueError, match="poses.json.*45 numbers"):
        io.read_poses(str(path), (16, 16))


def test_sample_py_reproduces_an_evaluated_video(uninterrupted_run, data_dir, tmp_path):
    """Both CLIs sample with the run config's steps and guidance unless told otherwise."""
    out = tmp_path / "eval"
    env = run_env(data_dir)
    protocol = ["--videos=1", "--frames=2", "--first_target=2", "--stride=2", "--gifs=1", "--seed=3"]
    result = subprocess.run(script_cmd("evaluate.py", f"--checkpoint={uninterrupted_run}", f"--out={out}",
                                       *protocol), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    sample_config = tiny_config().sample
    assert (report["protocol"]["steps"], report["protocol"]["guidance"]) == (sample_config.steps, sample_config.guidance)
    assert set(report["methods"]) == {"scd", "copy_reference", "no_reference"}
    assert "SCD vs copy_reference" in result.stdout
    (example,) = (out / "examples").iterdir()
    result = subprocess.run(
        script_cmd("sample.py", f"--checkpoint={uninterrupted_run}", f"--reference={example}/reference.png",
                   f"--reference_pose={example}/reference_pose.png", f"--poses={example}/poses",
                   f"--out={example}/resampled", "--window=2", "--overlap=0", "--seed=3"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    generated = sorted(os.listdir(example / "generated"))
    assert generated == sorted(os.listdir(example / "resampled")) and len(generated) == 2
    for name in generated:
        np.testing.assert_array_equal(np.asarray(Image.open(example / "resampled" / name)),
                                      np.asarray(Image.open(example / "generated" / name)), err_msg=name)


def test_sample_py_on_a_full_disk(uninterrupted_run, data_dir, tmp_path):
    """The write fails after sampling (a file-size limit stands in for a full disk): exit
    code 2 naming the path, no "wrote", no file left. Same program as above: a cached compile."""
    rng = np.random.default_rng(0)
    reference, poses = tmp_path / "reference.png", tmp_path / "poses"
    poses.mkdir()
    _save(reference, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for i in range(2):
        _save(poses / f"{i:03d}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = tmp_path / "out" / "video.mp4"
    cmd = script_cmd("sample.py", f"--checkpoint={uninterrupted_run}", f"--reference={reference}",
                     f"--reference_pose={reference}", f"--poses={poses}", f"--out={out}",
                     "--window=2", "--overlap=0", "--side_by_side")
    result = subprocess.run([cmd[0], "-c", LIMITED_FILE_SIZE, "512", *cmd], cwd=REPO, env=run_env(data_dir),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: WriteError: cannot write '{out}'" in result.stderr.strip().splitlines()[-1]
    assert "wrote" not in result.stdout and os.listdir(out.parent) == []
