"""Multi-host preemption (issue 19.5): with two CPU processes (gloo) and SIGTERM sent to one
of them only, both save the same step through JAX's preemption sync point and exit cleanly,
and the resumed run ends equal, bit for bit, to an uninterrupted one.

Where the time goes (2 cores): compiling the model's init and train step, in every process
of every run (on CPU only process 0 reads the persistent cache back), ~4x a 1-process run.
So the processes compile with LLVM's optimizations off (XLA_FLAGS below: the same programs,
built ~2.5x faster; every run here uses them, so the bit-for-bit comparison is unaffected),
and the resumed and uninterrupted runs go side by side: each one's process 1 compiles
while its process 0 waits on a cache hit, so together they fill both cores."""
import os
import re
import signal
import subprocess
import time

import portpicker

from tests.runs import REPO, run_env, train_cmd
from tests.test_training import assert_trees_equal, final_params

TIMEOUT_S = 600
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The tiny UNet with one level (its cross-attention block: reference and targets still meet
# in self-attention) and no checkpoint but the preemption save: a third less to compile.
COMMON = ["--config.checkpoint.every_steps=0", "--config.model.unet.block_out_channels=(8,)",
          '--config.model.unet.down_block_types=("CrossAttnDownBlock2D",)',
          '--config.model.unet.up_block_types=("CrossAttnUpBlock2D",)', "--config.model.unet.attention_heads=(2,)",
          "--config.model.unet.transformer_layers_per_block=(1,)"]


def _launch(workdir, data_dir, *overrides):
    port = portpicker.pick_unused_port()
    env = run_env(data_dir, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    return [subprocess.Popen(train_cmd(workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs, deadline):
    """(stdout, stderr) of each process; all are killed if one is still running at the deadline."""
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _run_side_by_side(data_dir, *runs):
    """Runs each (workdir, *overrides) as two processes, all at once; asserts all exit 0.
    Returns each run's [(stdout, stderr)] of its two processes."""
    procs = [p for workdir, *overrides in runs for p in _launch(workdir, data_dir, *overrides)]
    outs = _finish(procs, time.time() + TIMEOUT_S)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [outs[i:i + 2] for i in range(0, len(outs), 2)]


def test_sigterm_to_one_process_saves_the_same_step_on_both(data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    common = COMMON
    procs = _launch(workdir, data_dir, *common, "--config.train.num_steps=100000")
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
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    saved = [re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", out) for out, _ in outs]
    assert saved[0] and saved[0] == saved[1], [out[-2000:] for out, _ in outs]
    step = int(saved[0][0])
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]

    reference = str(tmp_path / "uninterrupted")
    resumed, _ = _run_side_by_side(data_dir, (workdir, *common, f"--config.train.num_steps={step + 2}"),
                                   (reference, *common, f"--config.train.num_steps={step + 2}"))
    assert all(f"resumed from step {step} " in out for out, _ in resumed), [out[-2000:] for out, _ in resumed]
    assert_trees_equal(final_params(workdir, step + 2), final_params(reference, step + 2))
    assert_trees_equal(final_params(workdir, step + 2, "ema_params"), final_params(reference, step + 2, "ema_params"))
