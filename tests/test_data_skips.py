"""Skipped bad examples are visible (issue 20.4): the first few are printed by name with the
running count, the progress line carries the count, and too many of them is an error."""
import numpy as np
import pytest

from consist_jax.data import pipeline
from consist_jax.data.clips import BadExample
from consist_jax.training.trainer import _progress_line


def _clip(i):
    return {"reference": np.zeros((2, 2, 3), np.uint8), "reference_pose": np.zeros((2, 2, 3), np.uint8),
            "target": np.zeros((1, 2, 2, 3), np.uint8), "target_pose": np.zeros((1, 2, 2, 3), np.uint8),
            "target_mask": np.ones((1, 2, 2, 1), np.uint8), "video_index": np.int64(i),
            "frame_indices": np.zeros((1,), np.int32), "reference_frame_index": np.int32(0)}


def _stream(rng, blocks, bad_per_block):
    """Blocks of 10 examples, ``bad_per_block`` of each at random places."""
    items = []
    for b in range(blocks):
        bad = set(rng.choice(10, bad_per_block, replace=False).tolist())
        for k in range(10):
            i = 10 * b + k
            items.append(BadExample(i, f"record {i} of shard-{b}", f"video-{i}", "missing pose") if k in bad
                         else _clip(i))
    return items


def _iterator(items, fraction=0.25):
    return pipeline.ClipBatchIterator(items, batch_size=4, on_bad_example="skip", drop_remainder=False,
                                      max_skipped_fraction=fraction)


def test_first_skips_named_with_the_running_count(rng, capsys):
    items = _stream(rng, 30, 2)
    iterator = _iterator(items)
    batches = list(iterator)
    bad = [x for x in items if isinstance(x, BadExample)]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert len(printed) == pipeline.SKIPS_NAMED
    for n, (line, example) in enumerate(zip(printed, bad), start=1):
        assert example.where in line and f"({n} skipped of" in line
    assert "further skips are only counted" in printed[-1]
    stats = iterator.stats()
    assert stats["skipped"] == len(bad) and stats["examples"] == sum(len(b["video_index"]) for b in batches)
    assert stats["first_skipped"] == [x.message() for x in bad[: pipeline.SKIPS_NAMED]]


def test_too_many_skips_fail_naming_the_fraction(rng):
    with pytest.raises(pipeline.BadExampleError, match=r"of 1\d\d examples read were bad .* "
                                                         r"max_skipped_fraction=0.25; the first: \[.bad example: record"):
        list(_iterator(_stream(rng, 30, 3)))
    assert len(list(_iterator(_stream(rng, 30, 3), fraction=0.35))) > 0


def test_skip_state_survives_a_checkpoint():
    iterator = _iterator([BadExample(0, "record 0", None, "unreadable"), _clip(1)])
    iterator._examples = _Resumable(iterator._examples)
    assert len(next(iterator)["video_index"]) == 1
    restored = _iterator([])
    restored._examples = _Resumable(iter([]))
    restored.set_state(iterator.get_state())
    assert restored.stats()["first_skipped"] == iterator.stats()["first_skipped"] != []


class _Resumable:
    """An iterator with grain's get_state/set_state (state is not needed here)."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def get_state(self):
        return b"{}"

    def set_state(self, state):
        pass


def test_progress_line_shows_the_count():
    metrics = {"loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "step_time_s": 0.1, "samples_per_s": 80.0}
    assert "skipped" not in _progress_line(3, 8, dict(metrics, **{"data/skipped": 0.0}))
    assert "30 bad examples skipped" in _progress_line(3, 8, dict(metrics, **{"data/skipped": 30.0}))


def test_the_count_reaches_tensorboard(uninterrupted_run):
    """train.py logs the running count with every logged step (0 for clean data), so the
    skips are visible in TensorBoard, not only in the checkpoint's metadata."""
    from tests.runs import tensorboard_scalars

    assert tensorboard_scalars(uninterrupted_run, "train/data/skipped") == [(step, 0.0) for step in range(1, 9)]


def test_fraction_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"max_skipped_fraction must be in \[0, 1\], got 1.5"):
        _iterator([], fraction=1.5)
