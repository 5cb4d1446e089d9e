"""Shared test setup: small thread counts (CI has 2 cores), a persistent compilation
cache shared with the test's subprocesses, and fresh random seeds."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # tests import tests.configs.* and configs.*
os.environ.setdefault("OMP_NUM_THREADS", "2")
# libtpu is installed for the ahead-of-time TPU compiles (test_compile_report.py), which
# only describe TPUs; jax itself stays on the CPU (export JAX_PLATFORMS= on a TPU or GPU
# host to run the accelerator tests there), and test processes may load libtpu together.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compiled programs are cached on disk, so subprocesses (train.py runs, multi-device
# scripts) that build the same program skip XLA's compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The partitionable threefry takes ~10x longer to compile a random draw on CPU;
# the library does not depend on the choice.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed per test (never test on zeros).

    The seed is printed so a failure can be replayed with CONSIST_TEST_SEED=<seed>.
    """
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"[{request.node.name}] seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tiny synthetic dataset (16x16, 12 identities), generated once per session."""
    from consist_jax.data import synthetic
    from tests.runs import TINY_DATA

    out = str(tmp_path_factory.mktemp("tiny_data"))
    synthetic.generate(out, TINY_DATA)
    return out


@pytest.fixture(scope="session")
def uninterrupted_run(data_dir, tmp_path_factory):
    """A full 8-step train.py run of the tiny config: the reference for the resume tests
    and the checkpoint the sampling CLI tests load."""
    import subprocess

    from tests.runs import REPO, run_env, train_cmd

    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = subprocess.run(train_cmd(workdir), cwd=REPO, env=run_env(data_dir), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 8/8" in result.stdout
    return workdir
