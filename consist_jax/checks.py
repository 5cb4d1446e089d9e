"""Range checks for numbers a user gives (flags, run-config keys, config.json keys).

Each returns the value it checked and raises ``ValueError`` with one line that names
the flag or key, the value and the allowed range, e.g.

    --steps=0: must be an integer >= 1
    optim.lr=-0.001: must be a finite number > 0
"""
from __future__ import annotations

import math
import numbers
from typing import Optional


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_number(name: str, value, low=None, high=None, *, integer: bool = False,
                 low_open: bool = False, high_open: bool = False):
    """``value`` if it is a finite number (an int with ``integer``) within the bounds.

    ``low_open`` / ``high_open`` exclude the bound itself. Raises ValueError naming ``name``.
    """
    kind = "an integer" if integer else "a finite number"
    text = " ".join(filter(None, [kind, _range_text(low, high, low_open, high_open)]))
    if not (_is_int(value) if integer else _is_finite(value)):
        raise ValueError(f"{name}={value!r}: must be {text}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name}={value!r}: must be {text}")
    return value


def positive_int(name: str, value, high: Optional[int] = None) -> int:
    return check_number(name, value, 1, high, integer=True)


def non_negative_int(name: str, value, high: Optional[int] = None) -> int:
    return check_number(name, value, 0, high, integer=True)


def positive_number(name: str, value) -> float:
    return check_number(name, value, 0, low_open=True)


def non_negative_number(name: str, value) -> float:
    return check_number(name, value, 0)


def finite_number(name: str, value) -> float:
    return check_number(name, value)


def probability(name: str, value) -> float:
    return check_number(name, value, 0, 1)


def fraction_below_one(name: str, value) -> float:
    """A decay or momentum: [0, 1) (1 would never move)."""
    return check_number(name, value, 0, 1, high_open=True)


SEED_RANGE = (0, 2**32 - 1)  # what jax.random.key keeps without wrapping


def seed(name: str, value) -> int:
    return check_number(name, value, *SEED_RANGE, integer=True)


def positive_ints(name: str, values) -> tuple:
    """A non-empty sequence of integers >= 1 (channel lists, resolutions)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"{name}={values!r}: must be a non-empty list of integers >= 1")
    for i, v in enumerate(values):
        positive_int(f"{name}[{i}]", v)
    return tuple(values)


_seed_in_range = seed  # check_sample_settings' ``seed`` argument shadows the check


def check_sample_settings(prefix: str, *, steps: Optional[int], guidance: Optional[float],
                          window: Optional[int] = None,
                          overlap: Optional[int] = None, seed: Optional[int] = None,
                          guidance_rescale: float = 0.0) -> None:
    """Sampling numbers: steps >= 1, a finite guidance, 0 <= overlap < window, a seed in
    range. ``prefix`` names them: "sample" gives "sample.steps", "--" gives "--steps", ""
    gives "steps". None: not given (a CLI flag left to the run config's ``sample`` value,
    checked when that config was)."""

    def name(key):
        return f"{prefix}{key}" if prefix.startswith("-") or not prefix else f"{prefix}.{key}"

    if steps is not None:
        positive_int(name("steps"), steps)
    if guidance is not None:
        finite_number(name("guidance"), guidance)
    probability(name("guidance_rescale"), guidance_rescale)
    if window is not None:
        positive_int(name("window"), window)
    if overlap is not None:
        non_negative_int(name("overlap"), overlap)
        if window is not None and overlap >= window:
            raise ValueError(f"{name('overlap')}={overlap}: must be in [0, {name('window')}={window})")
    if seed is not None:
        _seed_in_range(name("seed"), seed)
