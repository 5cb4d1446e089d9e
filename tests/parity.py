"""Parity metrics used by the oracle tests."""
import numpy as np


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
