"""User errors of train.py / sample.py / evaluate.py: refused before any compile (before the
checkpoint is even loaded), as one line naming the flag or key and its range, exit code 2."""
import json
import os
import re
import subprocess
import sys

import pytest

from consist_jax import cli
from consist_jax.training.validate import check_run_config
from tests.runs import REPO, run_env, script_cmd

DRIVER = [sys.executable, "tests/cli_driver.py"]
NOWHERE = "/nonexistent/run"  # a refusal after the checkpoint load would name this instead


def _refusals(script, cases, env):
    """[(exit code, stderr)] of ``script``'s main on each argument list, one process, no jit."""
    result = subprocess.run([*DRIVER, script, json.dumps(cases)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [(r["code"], r["stderr"]) for r in json.loads(result.stdout.splitlines()[-1])]


def _assert_one_line_refusals(results, expected):
    for (code, stderr), pattern in zip(results, expected):
        lines = stderr.strip().splitlines()
        assert code == cli.USER_ERROR_EXIT_CODE and len(lines) == 1, (pattern, code, stderr)
        assert lines[0].startswith("error: ") and pattern in lines[0], (pattern, lines[0])


def test_sample_py_refuses_before_loading(tmp_path):
    plain_file = tmp_path / "plain"
    plain_file.write_text("")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "000.png").write_bytes(b"an earlier run's frame")
    base = [f"--checkpoint={NOWHERE}", "--reference=ref.png", "--poses=poses", f"--out={tmp_path}/out.mp4"]
    cases = {
        "--steps=0": "--steps=0: must be an integer >= 1",
        "--steps=-1": "--steps=-1: must be an integer >= 1",
        "--guidance=nan": "--guidance=nan: must be a finite number",
        "--guidance=inf": "--guidance=inf",
        "--fps=0": "--fps=0.0: must be a finite number in [0.001, 1000.0]",
        "--fps=-1": "--fps=-1.0",
        "--fps=1e12": "--fps=1000000000000.0: must be a finite number in [0.001, 1000.0]",  # ffmpeg refuses it
        f"--fps=0 --out={tmp_path}/frames_0": "--fps=0.0: must be a finite number > 0",
        "--window=0": "--window=0: must be an integer >= 1",
        "--overlap=8 --window=8": "--overlap=8: must be in [0, --window=8)",
        "--overlap=-1": "--overlap=-1",
        "--seed=-1": "--seed=-1: must be an integer in [0, 4294967295]",
        "--step=-2": "--step=-2",
        "--out=out.avi": "write .mp4, .gif or a folder of PNGs",
        f"--out={plain_file}": "is a file; PNG frames (no suffix) go to a folder",
        f"--out={plain_file}/x.mp4": f"'{plain_file}' is a file, not a folder",
        f"--out={tmp_path}/folder.mp4": "is a folder; a .mp4 output needs a file name",
        f"--out={tmp_path}/x.gif --fps=1000": "--fps=1000.0: must be a finite number in (0, 100.0]",
        f"--out={tmp_path}/frames": "holds PNG files already: the frames of two runs would mix",
        "": f"'{NOWHERE}' has no checkpoints/ folder",  # the valid flags reach the load
    }
    results = _refusals("sample.py", [base + c.split() for c in cases], run_env(str(tmp_path)))
    _assert_one_line_refusals(results, cases.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.mp4", "frames", "plain"]  # nothing written
    assert os.listdir(tmp_path / "frames") == ["000.png"]


def test_evaluate_py_refuses_before_loading(tmp_path):
    plain_file = tmp_path / "plain"
    plain_file.write_text("")
    base = [f"--checkpoint={NOWHERE}", f"--out={tmp_path}/eval"]
    cases = {
        "--steps=0": "--steps=0: must be an integer >= 1",
        "--guidance=nan": "--guidance=nan",
        "--frames=0": "--frames=0: must be an integer >= 1",
        "--stride=0": "--stride=0",
        "--videos=-1": "--videos=-1: must be an integer >= 0",
        "--first_target=-1": "--first_target=-1",
        "--gifs=-1": "--gifs=-1",
        "--grid_frames=0": "--grid_frames=0: must be an integer >= 1",
        "--curve_videos=-1": "--curve_videos=-1: must be an integer >= 0",
        "--seed=-5": "--seed=-5",
        f"--out={plain_file}": "is a file; evaluate.py writes a folder",
        f"--out={plain_file}/eval": f"'{plain_file}' is a file, not a folder",
        f"--eval_weights={tmp_path}/missing": "--eval_weights=",
        "": f"'{NOWHERE}' has no checkpoints/ folder",
    }
    results = _refusals("evaluate.py", [base + c.split() for c in cases], run_env(str(tmp_path)))
    _assert_one_line_refusals(results, cases.values())
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]


def test_train_py_refuses_before_building(tmp_path, data_dir):
    plain_file = tmp_path / "plain"
    plain_file.write_text("")
    base = ["--config=tests/configs/tiny.py", f"--workdir={tmp_path}/run"]
    cases = {
        "--config.optim.lr=-1e-3": "optim.lr=-0.001: must be a finite number > 0",
        "--config.train.global_batch_size=0": "train.global_batch_size=0: must be an integer >= 1",
        "--config.optim.grad_accum_steps=0": "optim.grad_accum_steps=0",
        "--config.optim.warmup_steps=-1": "optim.warmup_steps=-1: must be an integer >= 0",
        "--config.optim.ema_decay=1.0": "optim.ema_decay=1.0: must be a finite number in [0, 1)",
        "--config.train.drop_reference_prob=1.5": "train.drop_reference_prob=1.5: must be a finite number in [0, 1]",
        "--config.train.num_steps=0": "train.num_steps=0",
        "--config.sample.guidance=nan": "sample.guidance=nan",
        "--config.seed=-1": "seed=-1",
        f"--workdir={plain_file}": "is a file, not a folder",
        "--process_id=3 --num_processes=2": "--process_id=3: must be an integer in [0, 1]",
    }
    # A model folder whose config.json is bad: read before the UNet's init compiles
    # (factory.check_config_files; every folder's reader: tests/test_config_files.py).
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("[]")
    cases[f"--config.model.motion_adapter={adapter}"] = f"{str(adapter / 'config.json')!r}"
    results = _refusals("train.py", [base + c.split() for c in cases], run_env(data_dir))
    _assert_one_line_refusals(results, cases.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "plain"]


def test_traceback_on_request(tmp_path):
    """The real entry point: one line and code 2, or with CONSIST_TRACEBACK=1 / --verbosity=1
    the traceback."""
    cmd = script_cmd("sample.py", f"--checkpoint={NOWHERE}", "--reference=r.png", "--poses=p", "--steps=0")
    plain = subprocess.run(cmd, cwd=REPO, env=run_env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and plain.stderr.strip() == "error: --steps=0: must be an integer >= 1"
    traced = subprocess.run(cmd, cwd=REPO, env=run_env(str(tmp_path), CONSIST_TRACEBACK="1"), capture_output=True,
                            text=True, timeout=300)
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "--steps=0" in traced.stderr
    verbose = subprocess.run([*cmd, "--verbosity=1"], cwd=REPO, env=run_env(str(tmp_path)), capture_output=True,
                             text=True, timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "--steps=0" in verbose.stderr


def test_user_errors_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("CONSIST_TRACEBACK", raising=False)

    def failing(error):
        def main(argv):
            raise error
        return cli.reports_user_errors(main)

    from consist_jax.checkpoints import CheckpointDamagedError

    damaged = CheckpointDamagedError("checkpoint step 8 in w/checkpoints: w/checkpoints/8/state/d/x is 5 bytes, "
                                     "10 were written (cut short?)")
    for error, line in [(ValueError("bad\nvalue"), "error: bad value"), (FileNotFoundError("missing"), "error: missing"),
                        (cli.WriteError("cannot write x"), "error: WriteError: cannot write x"),
                        (damaged, f"error: CheckpointDamagedError: {damaged}")]:
        with pytest.raises(SystemExit) as exit_info:
            failing(error)([])
        assert exit_info.value.code == 2 and capsys.readouterr().err == line + "\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        failing(KeyError("x"))([])
    monkeypatch.setenv("CONSIST_TRACEBACK", "1")
    with pytest.raises(ValueError):
        failing(ValueError("shown in full"))([])


@pytest.mark.parametrize("override, key", [
    ({"optim.lr": 0.0}, "optim.lr"),
    ({"optim.b2": 1.0}, "optim.b2"),
    ({"optim.final_lr_fraction": -0.1}, "optim.final_lr_fraction"),
    ({"diffusion.beta_start": 0.02, "diffusion.beta_end": 0.01}, "diffusion.beta_end"),
    ({"train.reference_timestep": 1000}, "train.reference_timestep"),
    ({"data.pipeline.resolution": (16, 0)}, "data.pipeline.resolution[1]"),
    ({"data.pipeline.crop_scale": (0.9, 0.5)}, "data.pipeline.crop_scale"),
    ({"data.pipeline.flip_probability": float("nan")}, "data.pipeline.flip_probability"),
    ({"sample.overlap": 8, "sample.window": 8}, "sample.overlap"),
    ({"checkpoint.every_steps": -1}, "checkpoint.every_steps"),
    ({"log.every_steps": -1}, "log.every_steps"),
    ({"mesh.cpu_devices": -1}, "mesh.cpu_devices"),
])
def test_run_config_ranges(override, key):
    from tests.configs.tiny import get_config

    config = get_config()
    check_run_config(config)
    for path, value in override.items():
        section, _, name = path.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[name] = value
    with pytest.raises(ValueError, match=f"^{re.escape(key)}="):
        check_run_config(config)
