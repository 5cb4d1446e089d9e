"""Shared pieces of the bounded fuzz tests (tests/test_fuzz_*.py): their settings, arbitrary
JSON, and byte-level damage to a valid file."""
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def bounded(max_examples: int) -> settings:
    """Reproducible and bounded for CI: the same examples on every run, no example database,
    no per-example deadline (the machine is shared), a fixed number of examples
    (times CONSIST_FUZZ_SCALE, for a longer search by hand)."""
    scale = int(os.environ.get("CONSIST_FUZZ_SCALE", "1"))
    return settings(max_examples=max_examples * scale, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


# Any JSON value, small: what a corrupt or hostile header field may hold instead of the real one.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)


@st.composite
def damaged(draw, data: bytes, positions=None) -> bytes:
    """``data`` truncated, extended by a few bytes, or with 1-3 bytes flipped (at one of
    ``positions`` if given, else anywhere)."""
    kind = draw(st.sampled_from(["truncate", "extend", "flip"]))
    if kind == "truncate" or not data:
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.sampled_from(positions) if positions else st.integers(0, len(data) - 1))
        out[position] ^= draw(st.integers(1, 255))
    return bytes(out)
