"""Damaged and mismatched checkpoints, and a save that fails (issue 19.7, 20.1): each is one
clear error naming the file, leaf or step, and a damaged latest step gives way to the
newest intact one without being deleted."""
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from consist_jax.checkpoints import CheckpointDamagedError, restore_params, verify_step
from consist_jax.sampling.pipeline import SCDPipeline
from consist_jax.training.checkpoint import CheckpointMismatchError, Checkpointer
from tests.runs import REPO, run_env, script_cmd, train_cmd
from tests.test_training import assert_trees_equal, final_params


def _copy(workdir, tmp_path, name="copy"):
    out = str(tmp_path / name)
    shutil.copytree(workdir, out)
    return out


def _cut_in_half(workdir, step):
    """Cuts the largest array file of ``step`` to half its size; returns its path and size."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(root, n) for root, _, names in os.walk(state) for n in names
             if os.sep + "d" + os.sep in os.path.join(root, n)]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return path, size


def test_damaged_latest_step_is_named_and_passed_over(uninterrupted_run, tmp_path, capsys):
    workdir = _copy(uninterrupted_run, tmp_path)
    path, size = _cut_in_half(workdir, 8)
    with pytest.raises(CheckpointDamagedError, match=rf"step 8 .*{os.path.basename(path)} is {size // 2} bytes, "
                                                     rf"{size} were written"):
        restore_params(workdir, 8)
    params, _, step = restore_params(workdir)
    assert step == 6
    assert os.path.basename(path) in capsys.readouterr().out
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, params), final_params(uninterrupted_run, 6, "ema_params"))
    assert os.path.getsize(path) == size // 2  # the damaged step is kept as it is
    pipe = SCDPipeline.from_checkpoint(workdir)
    assert pipe.step == 6 and "using step 6" in capsys.readouterr().out


def test_step_missing_its_meta_item(uninterrupted_run, tmp_path):
    workdir = _copy(uninterrupted_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8", "meta"))
    with pytest.raises(CheckpointDamagedError, match=r"step 8 .* lacks its 'meta' item .*8/meta is missing"):
        verify_step(os.path.join(workdir, "checkpoints"), 8)
    with pytest.raises(CheckpointDamagedError, match="lacks its 'meta' item"):
        restore_params(workdir, 8)
    assert restore_params(workdir)[2] == 6


def _saved_tree(workdir, step):
    """The checkpoint's state as a tree of ShapeDtypeStructs (what a run's abstract state is)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(saved))


def test_another_config_names_the_first_differing_leaf(uninterrupted_run):
    checkpointer = Checkpointer(uninterrupted_run, every_steps=0, keep=5)
    try:
        tree = _saved_tree(uninterrupted_run, 8)
        kernel = tree["params"]["conv_in"]["kernel"]
        tree["params"]["conv_in"]["kernel"] = jax.ShapeDtypeStruct(kernel.shape[:-1] + (kernel.shape[-1] + 8,),
                                                                   kernel.dtype)
        with pytest.raises(CheckpointMismatchError, match=r"params/conv_in/kernel is \(.*\) in the checkpoint, "
                                                          r"\(.*\) in this run"):
            checkpointer.restore(8, tree)
        tree = _saved_tree(uninterrupted_run, 8)
        tree["params"]["extra_layer"] = {"kernel": jax.ShapeDtypeStruct((2, 2), np.float32)}
        with pytest.raises(CheckpointMismatchError, match="params/extra_layer/kernel .* is not in the checkpoint"):
            checkpointer.restore(8, tree)
    finally:
        checkpointer.close()


def test_sample_cli_names_the_damaged_step_file(uninterrupted_run, data_dir, tmp_path):
    workdir = _copy(uninterrupted_run, tmp_path)
    path, _ = _cut_in_half(workdir, 8)
    result = subprocess.run(script_cmd("sample.py", f"--checkpoint={workdir}", "--step=8", "--reference=unused.png",
                                       "--poses=unused"),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert "CheckpointDamagedError" in result.stderr and path in result.stderr


def test_resume_passes_over_a_damaged_latest_step(uninterrupted_run, data_dir, tmp_path):
    """train.py resumes from step 6, moves the damaged step 8 aside (kept) and ends equal to
    the uninterrupted run, bit for bit."""
    workdir = _copy(uninterrupted_run, tmp_path)
    path, size = _cut_in_half(workdir, 8)
    result = subprocess.run(train_cmd(workdir), cwd=REPO, env=run_env(data_dir), capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.basename(path) in result.stdout and "resumed from step 6" in result.stdout
    kept = path.replace(os.path.join("checkpoints", "8"), os.path.join("checkpoints_damaged", "8"))
    assert os.path.getsize(kept) == size // 2
    assert_trees_equal(final_params(workdir, 8), final_params(uninterrupted_run, 8))
    verify_step(os.path.join(workdir, "checkpoints"), 8)


# Runs argv[2:] with files limited to argv[1] bytes; SIGXFSZ ignored (it survives exec) makes a
# write past the limit fail with EFBIG instead of killing the process.
_WITH_FILE_SIZE_LIMIT = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                         "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
                         "os.execv(sys.argv[2], sys.argv[2:])")


@pytest.mark.parametrize("cpu_devices", [0, 2])
def test_failed_save_stops_the_run_with_one_message(uninterrupted_run, data_dir, tmp_path, cpu_devices):
    """A disk that takes no more (a per-process file size limit: writes fail with an OSError
    inside orbax's background writer, as on a full disk) stops the run with one error naming
    the step and its folder; the last good checkpoint stays intact. On 2 devices too, where
    writers of other arrays are still writing into the partial step when the error arrives."""
    workdir = _copy(uninterrupted_run, tmp_path)
    for step in (6, 8):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    _, largest = _cut_in_half(_copy(workdir, tmp_path, "probe"), 4)
    result = subprocess.run([sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(largest // 2),
                             *train_cmd(workdir, f"--config.mesh.cpu_devices={cpu_devices}")],
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 2, result.stderr[-3000:]  # the CLIs' exit code for a user's error
    errors = [line for line in result.stderr.splitlines() if "CheckpointSaveError:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    step_dir = os.path.join(workdir, "checkpoints", "6")
    assert f"CheckpointSaveError: saving checkpoint step 6 to {step_dir} failed:" in errors[0]
    assert "File too large" in errors[0] and "The last good checkpoint (step 4) is kept" in errors[0]
    # orbax's writer threads log the failure too (which thread first varies from run to run):
    # their lines stay, their tracebacks (one per array or per thread) do not.
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr[-3000:]
    # Nor is the failed step's partial folder (orbax's "6.orbax-checkpoint-tmp") left on the full disk.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    verify_step(os.path.join(workdir, "checkpoints"), 4)


def test_orbax_error_lines_keep_their_message_not_their_traceback():
    """Which of orbax's writer threads logs a failed save first varies from run to run; each
    such line keeps its message (nothing silent) and loses the traceback that the one
    CheckpointSaveError would repeat; lines of other libraries are untouched."""
    from consist_jax.training.checkpoint import _SaveErrorEchoes

    try:
        raise OSError(27, "File too large")
    except OSError:
        exc_info = sys.exc_info()

    def record(pathname):
        return logging.LogRecord("absl", logging.ERROR, pathname, 1, "writer thread failed: %s", ("x",), exc_info)

    orbax = record(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "future.py"))
    assert _SaveErrorEchoes().filter(orbax) and orbax.exc_info is None and orbax.getMessage().endswith("x")
    other = record(os.path.join(os.sep, "site-packages", "tensorboardX", "writer.py"))
    assert _SaveErrorEchoes().filter(other) and other.exc_info is exc_info
