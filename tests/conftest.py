"""Shared test setup: small thread counts (CI has 2 cores) and fresh random seeds."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed per test (never test on zeros).

    The seed is printed so a failure can be replayed with CONSIST_TEST_SEED=<seed>.
    """
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"[{request.node.name}] seed={seed}")
    return np.random.default_rng(seed)
