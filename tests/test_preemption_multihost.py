"""Multi-host preemption (issue 19.5): with two CPU processes (gloo) and SIGTERM sent to one
of them only, both save the same step through JAX's preemption sync point and exit cleanly,
and the resumed run ends equal, bit for bit, to an uninterrupted one."""
import os
import re
import signal
import subprocess
import time

import portpicker

from tests.runs import REPO, run_env, train_cmd
from tests.test_training import assert_trees_equal, final_params

TIMEOUT_S = 600


def _launch(workdir, data_dir, *overrides):
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(train_cmd(workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                             cwd=REPO, env=run_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
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


def _run(workdir, data_dir, *overrides):
    procs = _launch(workdir, data_dir, *overrides)
    outs = _finish(procs, time.time() + TIMEOUT_S)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_sigterm_to_one_process_saves_the_same_step_on_both(data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    common = ["--config.checkpoint.every_steps=0"]
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

    _run(workdir, data_dir, *common, f"--config.train.num_steps={step + 2}")
    reference = str(tmp_path / "uninterrupted")
    _run(reference, data_dir, *common, f"--config.train.num_steps={step + 2}")
    assert_trees_equal(final_params(workdir, step + 2), final_params(reference, step + 2))
    assert_trees_equal(final_params(workdir, step + 2, "ema_params"), final_params(reference, step + 2, "ema_params"))
