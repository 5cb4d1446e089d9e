"""Parity metrics used by the oracle tests."""
import numpy as np

EPS32 = 2.0**-24  # float32 unit roundoff: one rounding moves a value by at most EPS32 relative


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_params(shapes, seed, scale=0.2):
    """Random normal values for a tree of shapes (every parameter non-trivial: zero-init
    output layers included), float32 jax arrays."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    )
