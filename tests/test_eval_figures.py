"""The evaluation's pictures: the grid of held-out people (layout and exact cells from small
arrays) and the metric curve that evaluate.py writes into metrics.json and plots."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from consist_jax.eval import figures
from tests.runs import REPO, run_env, script_cmd
from tests.test_checkpoint_damage import _cut_in_half


def _rows(rng, count, frames, size):
    shape = (frames, *size, 3)
    return [(f"person{r}", rng.integers(0, 256, (*size, 3), dtype=np.uint8),
             *(rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3))) for r in range(count)]


@pytest.mark.parametrize("frames, shown", [(7, 3), (2, 4)])
def test_grid_cells_are_the_images_they_show(rng, frames, shown):
    size = (16, 12)
    rows = _rows(rng, 3, frames, size)
    grid = figures.example_grid(rows, frames=shown)
    picked = figures.grid_frames(frames, shown)
    assert list(picked) == (list(np.linspace(0, frames - 1, shown).round().astype(int)) if frames >= shown
                            else list(range(frames)))
    layout = figures.grid_layout([r[0] for r in rows], size, len(picked))
    scale = figures.MIN_CELL // max(size)  # 16 divides 96: each pixel becomes a 6x6 block
    assert layout.cell == (size[0] * scale, size[1] * scale)
    assert grid.shape == (*layout.size, 3) and grid.dtype == np.uint8
    h, w = layout.cell
    for r, (_, reference, *videos) in enumerate(rows):
        y, x = layout.cell_origin(r, 0)
        np.testing.assert_array_equal(grid[y:y + h, x:x + w], figures.upscale(reference, scale))
        for c, video in enumerate(videos, start=1):
            for f, index in enumerate(picked):
                y, x = layout.cell_origin(r, c, f)
                np.testing.assert_array_equal(grid[y:y + h, x:x + w], figures.upscale(video[index], scale),
                                              err_msg=f"row {r} column {figures.GRID_COLUMNS[c]} frame {index}")
    # Rows go down and frames go right, in order, without overlapping; labels sit in the margins.
    assert layout.cell_origin(1, 0)[0] >= layout.cell_origin(0, 0)[0] + h
    for c in range(1, len(figures.GRID_COLUMNS)):
        last = 0 if c == 1 else len(picked) - 1  # the reference group has one cell
        assert layout.group_x(c) >= layout.cell_origin(0, c - 1, last)[1] + w
    assert layout.label_width > 0 and layout.header > 0
    assert (grid[:layout.header] != figures.BACKGROUND).any()  # column labels drawn
    assert (grid[:, :layout.label_width] != figures.BACKGROUND).any()  # row labels drawn


def test_grid_refuses_mismatched_rows(rng):
    rows = _rows(rng, 2, 3, (8, 8))
    rows[1] = rows[1][:3] + (rows[1][3][:2],) + rows[1][4:]  # two generated frames, three poses
    with pytest.raises(ValueError, match="grid row 'person1'"):
        figures.example_grid(rows)


def test_evaluate_writes_the_curve_grid_and_plot(uninterrupted_run, data_dir, tmp_path):
    """A tiny run with several kept checkpoints, the earliest damaged: every other kept step
    up to the evaluated one is a curve point (the damaged one is named and left out); the
    evaluated step's comes from the main pass."""
    from consist_jax.checkpoints import finished_steps

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    damaged, *steps = finished_steps(f"{workdir}/checkpoints")
    _cut_in_half(str(workdir), damaged)
    out = tmp_path / "eval"
    protocol = ["--videos=2", "--frames=2", "--first_target=2", "--stride=2", "--steps=2", "--gifs=2",
                "--curve_videos=2", "--grid_frames=2"]
    result = subprocess.run(script_cmd("evaluate.py", f"--checkpoint={workdir}", f"--out={out}", *protocol),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metric curve: left out step {damaged}: " in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert len(steps) >= 2 and [p["step"] for p in report["curve"]] == steps
    videos = report["methods"]["scd"]["counts"]["videos"]  # the tiny test split may hold fewer than 2
    assert report["protocol"]["curve_videos"] == videos
    # All the videos are the curve's: its last point and the baselines' levels are the main pass's.
    for method, point in [("scd", report["curve"][-1]), *report["curve_baselines"].items()]:
        main = report["methods"][method]["metrics"]
        assert {k: v for k, v in point.items() if k != "step"} == {k: main[k] for k in point if k != "step"}
    for p in report["curve"]:
        assert {"SSIM_masked", "PSNR_masked", "SSIM", "PSNR", "L1"} <= set(p)
        assert all(np.isfinite(v) for v in p.values())
    assert set(report["curve_baselines"]) == {"copy_reference", "no_reference"}
    for path in (out / "examples.png", out / "metrics_curve.png"):
        assert f"wrote {path}" in result.stdout
    with Image.open(out / "metrics_curve.png") as plot:
        assert plot.format == "PNG"
        assert plot.size == tuple(round(s * figures.CURVE_DPI) for s in figures.CURVE_SIZE)
    with Image.open(out / "examples.png") as grid:
        assert grid.format == "PNG"
        labels = [p.name for p in (out / "examples").iterdir()]
        assert len(labels) == videos
        layout = figures.grid_layout(labels, (16, 16), 2)
        assert grid.size[::-1] == layout.size
