"""Multi-host preemption (issue 19.5): with two CPU processes (gloo) and SIGTERM sent to one
of them only, both save the same step through JAX's preemption sync point and exit cleanly,
and resuming equals not stopping, bit for bit.

The preempted run is itself the uninterrupted run: it trained from step 0 to the step s it
saved when preempted, with periodic saves on the way. A run resumed from the first periodic
save, stopping at s, must save exactly what the preemption save holds: every leaf
of the train state (params, EMA, optimizer state) and every process's data-iterator state.
So the preemption save is complete and right, and resuming reproduces the trajectory.

Where the time goes (2 cores): starting and compiling train.py (model init and train step),
in every process of every run, since on CPU only process 0's compiles are read back from
the persistent cache (the other processes' cache keys hold their own view of the devices).
Hence two runs rather than three, LLVM's optimizations off (XLA_FLAGS below: the same
programs built ~2.5x faster; both runs use them, so the comparison is unaffected) and a
one-level tiny UNet."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import portpicker

from consist_jax.checkpoints import finished_steps, verify_step
from tests.runs import REPO, run_env, train_cmd
from tests.test_training import assert_trees_equal

TIMEOUT_S = 600
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The tiny UNet with one level (its cross-attention block: reference and targets still meet
# in self-attention), saved every 2 steps (the resumed run starts from one of those saves).
COMMON = ["--config.checkpoint.every_steps=2", "--config.checkpoint.keep=100",
          "--config.model.unet.block_out_channels=(8,)",
          '--config.model.unet.down_block_types=("CrossAttnDownBlock2D",)',
          '--config.model.unet.up_block_types=("CrossAttnUpBlock2D",)', "--config.model.unet.attention_heads=(2,)",
          "--config.model.unet.transformer_layers_per_block=(1,)"]


def _launch(workdir, data_dir, *overrides):
    port = portpicker.pick_unused_port()
    env = run_env(data_dir, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    return [subprocess.Popen(train_cmd(workdir, *COMMON, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs, deadline):
    """(stdout, stderr) of each process, which must all exit 0; all are killed if one is still
    running at the deadline."""
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _saved(workdir, step):
    """(train state as numpy, every process's data-iterator state) of checkpoint ``step``."""
    from consist_jax.checkpoints import read_state

    step_dir = os.path.join(workdir, "checkpoints", str(step))
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["step"] == step and len(meta["data_states"]) == 2
    return read_state(os.path.join(step_dir, "state")), meta["data_states"]


def test_sigterm_to_one_process_saves_the_same_step_on_both(data_dir, tmp_path):
    preempted = str(tmp_path / "preempted")
    procs = _launch(preempted, data_dir, "--config.train.num_steps=100000")
    deadline = time.time() + TIMEOUT_S
    try:
        line = ""
        while "step 3/" not in line:  # both are training (every step is a collective)
            line = procs[1].stdout.readline()
            assert line or procs[1].poll() is None, procs[1].stderr.read()[-3000:]
            assert time.time() < deadline, "no step 3 in time"
        procs[1].send_signal(signal.SIGTERM)  # process 0 never sees a signal
    finally:
        outs = _finish(procs, deadline)
    saved = [re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", out) for out, _ in outs]
    assert saved[0] and saved[0] == saved[1], [out[-2000:] for out, _ in outs]
    step = int(saved[0][0])
    directory = os.path.join(preempted, "checkpoints")
    steps = finished_steps(directory)
    assert steps[-1] == step and steps[:-1] == list(range(2, step, 2)), steps
    verify_step(directory, step)  # complete: every file as large as written

    resumed = str(tmp_path / "resumed")
    start = steps[0]  # the first periodic save: the resumed run retraces most of the way
    shutil.copytree(os.path.join(directory, str(start)), os.path.join(resumed, "checkpoints", str(start)))
    outs = _finish(_launch(resumed, data_dir, f"--config.train.num_steps={step}"), time.time() + TIMEOUT_S)
    assert all(f"resumed from step {start} " in out for out, _ in outs), [out[-2000:] for out, _ in outs]
    (state, data_states), (expected_state, expected_data_states) = _saved(resumed, step), _saved(preempted, step)
    assert_trees_equal(state, expected_state)
    assert data_states == expected_data_states
