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


def assert_within_rounding(actual, expected, scale, ulps, what="values"):
    """|actual - expected| <= ulps * EPS32 * scale, elementwise, in float64.

    scale: the magnitude of the terms the float32 computation rounds (e.g. |a x| + |b y|
    for a x + b y, divided by |d| for a division by d), so the bound follows from the
    number of roundings and holds for every input, not just the seed that was tried.
    """
    actual, expected, scale = (np.asarray(v, dtype=np.float64) for v in (actual, expected, scale))
    diff = np.abs(actual - expected)
    bound = ulps * EPS32 * np.broadcast_to(scale, diff.shape)
    if np.all(diff <= bound):
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        worst = np.nanmax(np.where(diff > bound, diff / bound, 0.0))
    raise AssertionError(f"{what}: worst |difference| is {worst:.3g} x the {ulps}-rounding bound")
