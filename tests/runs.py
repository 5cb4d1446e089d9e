"""Helpers for tests that run train.py / sample.py / evaluate.py as subprocesses on the
tiny config (tests/configs/tiny.py) and its generated dataset."""
import os
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
