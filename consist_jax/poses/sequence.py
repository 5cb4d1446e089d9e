"""Pose sequence utilities: smoothing, frame stride and fps resampling, cropping around
the person, resizing, horizontal flips.

All take and return ``PoseSequence`` (pixel coordinates, pixel centres at integers),
except ``flip_keypoints``, which works on raw (..., K, 3) arrays for data pipelines.
Hidden points (confidence below the threshold) are never used to move visible ones.
"""
from __future__ import annotations

import math

import numpy as np

from consist_jax.poses import layouts as L
from consist_jax.poses.keypoints import PoseSequence

SMOOTHING_METHODS = ("gaussian", "one_euro")


# --- smoothing -----------------------------------------------------------------------------
def _gaussian_smooth(points, visible, sigma):
    """Confidence-weighted Gaussian average over time of (T, K, 2) positions.

    Each visible position becomes sum_s w(t - s) c_s x_s / sum_s w(t - s) c_s over visible
    frames s within 3 sigma; hidden positions are kept.
    """
    xy, confidence = points[..., :2], points[..., 2]
    weight = np.where(visible, np.maximum(confidence, 1e-6), 0.0)  # (T, K)
    radius = max(int(math.ceil(3 * sigma)), 1)
    numerator = np.zeros_like(xy, dtype=np.float64)
    denominator = np.zeros(weight.shape, np.float64)
    num_frames = len(xy)
    for offset in range(-radius, radius + 1):
        kernel = math.exp(-0.5 * (offset / sigma) ** 2)
        lo, hi = max(0, -offset), min(num_frames, num_frames - offset)  # t with t+offset valid
        if lo >= hi:
            continue
        w = kernel * weight[lo + offset:hi + offset]
        numerator[lo:hi] += w[..., None] * xy[lo + offset:hi + offset]
        denominator[lo:hi] += w
    smoothed = numerator / np.maximum(denominator, 1e-12)[..., None]
    return np.where(visible[..., None], smoothed, xy)


def _one_euro_alpha(cutoff, fps):
    """Exponential smoothing factor of a first-order low-pass at ``cutoff`` Hz."""
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau * fps)


def _one_euro_smooth(points, visible, fps, min_cutoff, beta, derivative_cutoff):
    """The One-Euro filter (Casiez et al. 2012) over time, per point, on 2-D positions.

    The cutoff rises with the point's speed (pixels/s): slow jitter is removed, fast
    motion is followed without lag. A hidden point holds no state: the filter restarts
    when the point reappears.
    """
    xy = points[..., :2].astype(np.float64)
    out = xy.copy()
    estimate = xy[0].copy()
    speed_estimate = np.zeros(xy.shape[1:-1] + (2,))
    alpha_derivative = _one_euro_alpha(derivative_cutoff, fps)
    for t in range(1, len(xy)):
        running = visible[t] & visible[t - 1]  # else (re)start from the raw value
        velocity = (xy[t] - estimate) * fps
        speed_estimate = np.where(running[:, None],
                                  speed_estimate + alpha_derivative * (velocity - speed_estimate),
                                  0.0)
        cutoff = min_cutoff + beta * np.linalg.norm(speed_estimate, axis=-1)
        alpha = _one_euro_alpha(cutoff, fps)[:, None]
        filtered = estimate + alpha * (xy[t] - estimate)
        estimate = np.where(running[:, None], filtered, xy[t])
        out[t] = estimate
    return np.where(visible[..., None], out, xy)


def smooth_poses(pose_seq: PoseSequence, method: str = "one_euro", *, sigma: float = 1.0,
                 fps: float = 30.0, min_cutoff: float = 1.0, beta: float = 0.05,
                 derivative_cutoff: float = 1.0,
                 confidence_threshold: float = 0.3) -> PoseSequence:
    """Removes keypoint jitter over time; confidences are kept.

    Args:
      method: ``"gaussian"`` (confidence-weighted Gaussian over ``sigma`` frames; no lag,
        needs the whole sequence) or ``"one_euro"`` (causal One-Euro filter with
        ``min_cutoff`` Hz, speed coefficient ``beta`` (per pixel/s) and
        ``derivative_cutoff`` Hz at ``fps`` frames per second).
      confidence_threshold: points below it are neither smoothed nor used.
    """
    if method not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing method must be one of {SMOOTHING_METHODS}, got "
                         f"{method!r}")
    points = pose_seq.points.astype(np.float64)
    visible = points[..., 2] >= confidence_threshold
    if method == "gaussian":
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        xy = _gaussian_smooth(points, visible, sigma)
    else:
        if min(fps, min_cutoff, derivative_cutoff) <= 0 or beta < 0:
            raise ValueError("one_euro needs positive fps, min_cutoff, derivative_cutoff and "
                             "beta >= 0")
        xy = _one_euro_smooth(points, visible, fps, min_cutoff, beta, derivative_cutoff)
    return pose_seq.replace(points=np.concatenate([xy, points[..., 2:]], axis=-1))


# --- frame selection -----------------------------------------------------------------------
def stride_frames(pose_seq: PoseSequence, stride: int, offset: int = 0) -> PoseSequence:
    """Every ``stride``-th frame starting at ``offset``."""
    if stride < 1 or not 0 <= offset < pose_seq.num_frames:
        raise ValueError(f"need stride >= 1 and 0 <= offset < {pose_seq.num_frames}, got "
                         f"stride={stride}, offset={offset}")
    return pose_seq.frames(slice(offset, None, stride))


def resample_fps(pose_seq: PoseSequence, source_fps: float, target_fps: float, *,
                 interpolate: bool = True, confidence_threshold: float = 0.3) -> PoseSequence:
    """The sequence at ``target_fps``, covering the same time span from the first frame.

    Output frame j is at time j / target_fps. With ``interpolate`` a point visible in both
    neighbouring source frames is linearly interpolated (confidence too); otherwise, and
    without ``interpolate``, the nearest source frame's point is taken.
    """
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps must be positive, got {source_fps} -> {target_fps}")
    num_frames = pose_seq.num_frames
    num_out = int(math.floor((num_frames - 1) * target_fps / source_fps + 1e-9)) + 1
    position = np.arange(num_out) * (source_fps / target_fps)  # in source frames
    nearest = np.clip(np.round(position).astype(np.int64), 0, num_frames - 1)
    points = pose_seq.points.astype(np.float64)
    out = points[nearest]
    if interpolate:
        lower = np.clip(np.floor(position).astype(np.int64), 0, num_frames - 1)
        upper = np.minimum(lower + 1, num_frames - 1)
        fraction = (position - lower)[:, None, None]
        blended = (1 - fraction) * points[lower] + fraction * points[upper]
        both = ((points[lower, :, 2] >= confidence_threshold)
                & (points[upper, :, 2] >= confidence_threshold))
        out = np.where(both[..., None], blended, out)
    return pose_seq.replace(points=out)


# --- geometry ------------------------------------------------------------------------------
def person_box(pose_seq: PoseSequence, *, margin: float = 0.1, square: bool = True,
               confidence_threshold: float = 0.3) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box (half-open) around every visible point of every frame.

    The tight box grows by ``margin`` times its size on each side; with ``square`` it
    grows to a square about its centre, and is shifted inside the image when it fits
    there (it is clipped, so no longer square, only when larger than the image).
    """
    visible = pose_seq.visible(confidence_threshold)
    if not visible.any():
        raise ValueError(f"no visible keypoint to crop around "
                         f"({pose_seq.source or 'pose sequence'})")
    xy = pose_seq.xy[visible].astype(np.float64)
    low, high = xy.min(axis=0), xy.max(axis=0)
    size = (high - low) + 1.0  # a pixel is 1 wide
    low, high = low - margin * size, high + margin * size
    if square:
        centre, side = (low + high) / 2, (high - low).max()
        low, high = centre - side / 2, centre + side / 2
    limits = np.array([pose_seq.width, pose_seq.height])
    start = np.floor(low).astype(np.int64)
    extent = np.ceil(high).astype(np.int64) + 1 - start
    if square:  # equal integer sides, centred (pixel box [s, s + e) has centre s + e/2 - 0.5)
        extent = np.full(2, extent.max())
        start = np.round((low + high) / 2 + 0.5 - extent / 2).astype(np.int64)
    # Shift inside the image rather than clip, so the shape (square) is kept when it fits.
    start = np.clip(start, 0, np.maximum(limits - extent, 0))
    stop = np.minimum(start + extent, limits)
    return int(start[0]), int(start[1]), int(stop[0]), int(stop[1])


def crop_poses(pose_seq: PoseSequence, box) -> PoseSequence:
    """The poses in the pixel frame of the crop ``box`` = (x0, y0, x1, y1), half-open."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"empty crop box {box}")
    points = pose_seq.points.copy()
    points[..., 0] -= x0
    points[..., 1] -= y0
    return pose_seq.replace(points=points, height=y1 - y0, width=x1 - x0)


def crop_around_person(pose_seq: PoseSequence, *, margin: float = 0.1, square: bool = True,
                       confidence_threshold: float = 0.3):
    """Crops to the person: returns (box (x0, y0, x1, y1), the cropped PoseSequence); crop
    the images with ``image[y0:y1, x0:x1]``. See ``person_box``."""
    box = person_box(pose_seq, margin=margin, square=square,
                     confidence_threshold=confidence_threshold)
    return box, crop_poses(pose_seq, box)


def resize_poses(pose_seq: PoseSequence, height: int, width: int) -> PoseSequence:
    """The poses on a canvas resized to (height, width); pixel centres map to pixel
    centres, as an image resize does (x' = (x + 0.5) * width' / width - 0.5)."""
    points = pose_seq.points.astype(np.float64)
    points[..., 0] = (points[..., 0] + 0.5) * (width / pose_seq.width) - 0.5
    points[..., 1] = (points[..., 1] + 0.5) * (height / pose_seq.height) - 0.5
    return pose_seq.replace(points=points, height=height, width=width)


def flip_keypoints(points, layout, width: int) -> np.ndarray:
    """Mirrors keypoints as ``image[:, ::-1]`` mirrors the image: x -> width - 1 - x, and
    every left point swapped with its right counterpart (so a right arm stays labelled
    right; it is drawn in the right arm's colours).

    Args:
      points: (..., K, 3) pixels and confidence.
      layout: a layout name or ``PoseLayout``.
    Returns: (..., K, 3) float32.
    """
    layout = L.get_layout(layout)
    points = np.asarray(points, np.float32)
    flipped = points[..., layout.flip_permutation, :].copy()
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return flipped


def flip_horizontal(pose_seq: PoseSequence) -> PoseSequence:
    """The sequence mirrored left-right (see ``flip_keypoints``)."""
    return pose_seq.replace(points=flip_keypoints(pose_seq.points, pose_seq.layout,
                                                  pose_seq.width))
