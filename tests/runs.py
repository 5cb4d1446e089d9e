"""Helpers for tests that run train.py / sample.py / evaluate.py as subprocesses on the
tiny config (tests/configs/tiny.py) and its generated dataset."""
import glob
import os
import struct
import sys

from consist_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = synthetic.SyntheticConfig(identities=12, frames=8, size=16, seed=0)


def run_env(data_dir, **extra):
    env = dict(os.environ)
    env.update(CONSIST_TEST_DATA=data_dir, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
    return env


def script_cmd(script, *args):
    return [sys.executable, os.path.join(REPO, script), *args]


def train_cmd(workdir, *overrides):
    return script_cmd("train.py", "--config=tests/configs/tiny.py", f"--workdir={workdir}", *overrides)


def tensorboard_scalars(workdir, tag):
    """[(step, value)] of ``tag`` in a run's TensorBoard event files (TFRecord framing: length,
    its CRC, the Event, its CRC), read with tensorboardX's protos (tensorboard is not installed)."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            found += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
            at += 16 + length
    return found
