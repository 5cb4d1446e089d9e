"""The evaluation's two pictures: a grid of held-out people and the metric curve.

    grid = example_grid([(video_id, reference, poses, generated, real), ...])   # uint8 image
    write_png("examples.png", grid)
    write_metric_curve("metrics_curve.png", curve, baselines)

The grid has one row per person: the reference, then a few target frames each of the
pose, the generated frame and the real frame, every image enlarged by a whole number
(nearest neighbour, so each pixel stays a pixel), columns labelled on top and rows on the
left. The curve plots held-out figure SSIM and PSNR against training step with the
baselines' levels as flat lines (matplotlib, Agg, imported only where the plot is drawn).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from consist_jax import files

GRID_COLUMNS = ("reference", "pose", "generated", "real")
MIN_CELL = 96  # small frames are enlarged until a side is at least this many pixels
CURVE_METRICS = ("SSIM_masked", "PSNR_masked")
CURVE_TITLES = {"SSIM_masked": "figure SSIM", "PSNR_masked": "figure PSNR (dB)"}
CURVE_SIZE, CURVE_DPI = (9.0, 3.6), 100  # inches, dots per inch: a 900x360 PNG
BACKGROUND, INK = 255, 0


def grid_frames(num_frames: int, count: int) -> np.ndarray:
    """The indices of ``count`` frames spread evenly over ``num_frames`` (first and last
    included; all of them when there are fewer)."""
    return np.unique(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int))


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, C) -> (H * scale, W * scale, C), every pixel repeated (nearest neighbour)."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where each image of the grid lies. Column 0 holds the reference (one cell); columns
    1.. (pose, generated, real) hold ``frames`` cells each, a wider gap between groups."""

    rows: int
    frames: int
    cell: tuple[int, int]  # an enlarged image's (height, width)
    label_width: int  # the left margin that holds the row labels
    header: int = 18  # the top margin that holds the column labels
    gap: int = 2
    group_gap: int = 10

    def group_x(self, column: int) -> int:
        """The left edge of column group ``column``."""
        width = self.cell[1] + self.gap
        cells_before = 0 if column == 0 else 1 + (column - 1) * self.frames
        return self.label_width + cells_before * width + column * self.group_gap

    def cell_origin(self, row: int, column: int, frame: int = 0) -> tuple[int, int]:
        """(y, x) of the top-left pixel of ``frame`` of ``column`` in ``row``."""
        return self.header + row * (self.cell[0] + self.gap), self.group_x(column) + frame * (self.cell[1] + self.gap)

    @property
    def size(self) -> tuple[int, int]:
        """The grid's (height, width)."""
        last_y, last_x = self.cell_origin(self.rows - 1, len(GRID_COLUMNS) - 1, self.frames - 1)
        return last_y + self.cell[0] + self.gap, last_x + self.cell[1] + self.gap


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def grid_layout(row_labels: Sequence[str], image_size: tuple[int, int], frames: int) -> GridLayout:
    """The layout for rows labelled ``row_labels`` of (H, W) images, ``frames`` per group."""
    scale = max(1, math.ceil(MIN_CELL / max(image_size)))
    font = _font()
    label_width = 8 + math.ceil(max(font.getlength(label) for label in row_labels))
    return GridLayout(rows=len(row_labels), frames=frames, cell=(image_size[0] * scale, image_size[1] * scale),
                      label_width=label_width)


def example_grid(rows: Sequence[tuple], frames: int = 4) -> np.ndarray:
    """One uint8 (H, W, 3) picture of held-out people.

    rows: (label, reference (H, W, 3), poses (F, H, W, 3), generated (F, H, W, 3), real
    (F, H, W, 3)) per person, uint8; ``frames`` of the F targets are shown (``grid_frames``).
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("example_grid needs at least one row (label, reference, poses, generated, real)")
    (h, w), num_frames = rows[0][1].shape[:2], len(rows[0][2])
    for label, reference, *videos in rows:
        if reference.shape != (h, w, 3) or any(v.shape != (num_frames, h, w, 3) for v in videos):
            raise ValueError(f"grid row {label!r}: expected a ({h}, {w}, 3) reference and ({num_frames}, {h}, {w}, 3) "
                             f"poses/generated/real (as the first row), got {reference.shape} and "
                             f"{[v.shape for v in videos]}")
    picked = grid_frames(num_frames, frames)
    layout = grid_layout([row[0] for row in rows], (h, w), len(picked))
    scale = layout.cell[0] // h
    grid = np.full((*layout.size, 3), BACKGROUND, np.uint8)
    for r, (label, reference, *videos) in enumerate(rows):
        y, x = layout.cell_origin(r, 0)
        grid[y:y + layout.cell[0], x:x + layout.cell[1]] = upscale(reference, scale)
        for c, video in enumerate(videos, start=1):
            for f, index in enumerate(picked):
                y, x = layout.cell_origin(r, c, f)
                grid[y:y + layout.cell[0], x:x + layout.cell[1]] = upscale(video[index], scale)
    picture = Image.fromarray(grid)
    draw, font = ImageDraw.Draw(picture), _font()
    for c, name in enumerate(GRID_COLUMNS):
        draw.text((layout.group_x(c), 3), name, fill=(INK,) * 3, font=font)
    for r, (label, *_) in enumerate(rows):
        y, _ = layout.cell_origin(r, 0)
        draw.text((4, y + layout.cell[0] // 2 - 6), label, fill=(INK,) * 3, font=font)
    return np.asarray(picture)


def write_png(path: str, image: np.ndarray) -> None:
    """uint8 (H, W, 3) -> a PNG at ``path``, written atomically (files.atomic_path)."""
    from PIL import Image

    with files.atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_metric_curve(path: str, curve: Sequence[Mapping], baselines: Mapping[str, Mapping],
                       metrics: Sequence[str] = CURVE_METRICS) -> None:
    """A PNG (CURVE_SIZE at CURVE_DPI) with one panel per metric: the model's value at each
    ``curve`` point ({"step": ..., metric: ...}) against step, and each baseline's level
    ({name: {metric: value}}) as a flat dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file is all we draw
    from matplotlib import pyplot as plt

    missing = [(p.get("step"), m) for p in curve for m in ("step", *metrics) if m not in p]
    if not curve or missing:
        raise ValueError(f"metric curve: need points with 'step' and {list(metrics)}; missing {missing or 'all'}")
    points = sorted(curve, key=lambda p: p["step"])
    steps = [p["step"] for p in points]
    figure, axes = plt.subplots(1, len(metrics), figsize=CURVE_SIZE, dpi=CURVE_DPI)
    try:
        for ax, metric in zip(np.atleast_1d(axes), metrics):
            ax.plot(steps, [p[metric] for p in points], "o-", color="C0", label="SCD")
            for n, (name, values) in enumerate(sorted(baselines.items())):
                if metric in values:
                    ax.axhline(values[metric], linestyle="--", color=f"C{n + 1}", label=name)
            ax.set_xlabel("training step")
            ax.set_title(f"held-out {CURVE_TITLES.get(metric, metric)}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figure.tight_layout()
        with files.atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=CURVE_DPI)
    finally:
        plt.close(figure)
