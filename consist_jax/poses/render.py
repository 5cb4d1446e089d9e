"""The one skeleton renderer: keypoints -> OpenPose/DWPose-style images, numpy only.

What is drawn, in order (later shapes cover earlier ones, as in OpenPose/DWPose):
  1. the 17 body limbs as filled ellipses whose long axis joins the two joints, in the
     OpenPose colours at 0.6 intensity (and, with ``draw_feet``, the foot limbs);
  2. the 18 body joints as discs in the full-intensity OpenPose colours;
  3. DWPose only: per hand (left, then right) the 20 hand bones as thick lines in the
     HSV-rainbow colours, then the 21 hand joints as blue discs;
  4. the 68 face landmarks: DWPose draws them as small white discs; the face68 layout
     (face reenactment) first joins them into dlib's polylines (jaw, brows, nose, eyes,
     lips), each part in its colour at 0.6 intensity, then draws each landmark as a disc
     in its part's full colour. Body-less layouts (face68) draw no body.

Sizes are OpenPose/DWPose's at a 512-pixel short side (limb half-width 4, joint radius 4,
hand line width 2, hand joint radius 4, face dot radius 3; our face line width 2), scaled
linearly with ``min(height, width) / 512`` and ``stroke_scale``, and never below
``MIN_RADIUS_PX`` so a tiny canvas still shows every point.

Rasterisation is by distance on the pixel grid (pixel (row y, column x) has its centre at
coordinates (x, y), as in OpenPose's pixel coordinates), one vectorised pass per shape
kind (all limbs of all frames at once, say), each evaluated only inside its bounding box.
No anti-aliasing: the pose encoder sees flat colours, as in the peers' training data.
"""
from __future__ import annotations

import numpy as np

from consist_jax.poses.layouts import HAND_JOINT_COLOR, LIMB_INTENSITY, get_layout

REFERENCE_SHORT_SIDE = 512.0
LIMB_HALF_WIDTH = 4.0
JOINT_RADIUS = 4.0
HAND_LINE_HALF_WIDTH = 1.0
HAND_JOINT_RADIUS = 4.0
FACE_DOT_RADIUS = 3.0
FACE_LINE_HALF_WIDTH = 1.0  # as thick as DWPose's hand bones
MIN_RADIUS_PX = 0.75  # covers at least the nearest pixel wherever the point lies
DEFAULT_CONFIDENCE_THRESHOLD = 0.3
MAX_WINDOW_PIXELS = 1 << 21  # pixels evaluated per vectorised pass (~8 MB per float32 temp)
FAR_OFF = 1000  # canvases: a point further off is damaged data and is not drawn


def stroke_pixels(size: float, height: int, width: int, stroke_scale: float) -> float:
    """A drawing size given at a 512-px short side, in pixels of a (height, width) canvas."""
    return max(size * stroke_scale * min(height, width) / REFERENCE_SHORT_SIDE, MIN_RADIUS_PX)


def _paint(canvas, frame_index, start, end, half_width, colors, *, ellipse):
    """Paints N shapes into ``canvas`` in place, later instances over earlier ones.

    Args:
      canvas: (T, H, W, 3) uint8.
      frame_index: (N,) int, the frame of each shape.
      start, end: (N, 2) float, x/y of the two ends (equal for a disc).
      half_width: the disc radius / line half-width / ellipse semi-minor axis, pixels.
      colors: (N, 3) uint8.
      ellipse: True for OpenPose's limb ellipse (semi-major = half the bone length), False
        for a capsule (all points within half_width of the segment).
    """
    if len(frame_index) == 0:
        return
    _, height, width, _ = canvas.shape
    low = np.floor(np.minimum(start, end) - half_width).astype(np.int64)
    high = np.floor(np.maximum(start, end) + half_width).astype(np.int64) + 1
    low = np.clip(low, 0, [width, height])
    high = np.clip(high, 0, [width, height])
    box = np.max(high - low, axis=0)
    if box[0] <= 0 or box[1] <= 0:
        return  # everything lies outside the canvas
    count = len(frame_index)
    if count > 1 and count * box[0] * box[1] > MAX_WINDOW_PIXELS:  # bound the memory
        half = count // 2
        for part in (slice(0, half), slice(half, count)):  # in order: earlier first
            _paint(canvas, frame_index[part], start[part], end[part], half_width,
                   colors[part], ellipse=ellipse)
        return
    xs = low[:, 0:1] + np.arange(box[0])  # (N, bw) pixel columns of each window
    ys = low[:, 1:2] + np.arange(box[1])  # (N, bh) pixel rows
    inside_x = xs < high[:, 0:1]
    inside_y = ys < high[:, 1:2]

    delta = (end - start).astype(np.float32)
    if ellipse:
        centre = 0.5 * (start + end)
        length = np.linalg.norm(delta, axis=1)
        direction = np.where(length[:, None] > 0, delta / np.maximum(length, 1e-12)[:, None],
                             np.float32([1.0, 0.0]))
        semi_major = np.maximum(0.5 * length, 0.5)
        dx = (xs - centre[:, 0:1]).astype(np.float32)[:, None, :]  # (N, 1, bw)
        dy = (ys - centre[:, 1:2]).astype(np.float32)[:, :, None]  # (N, bh, 1)
        ux = direction[:, 0, None, None]
        uy = direction[:, 1, None, None]
        along = (dx * ux + dy * uy) / semi_major[:, None, None]
        across = (dy * ux - dx * uy) / half_width
        mask = along * along + across * across <= 1.0
    else:
        dx = (xs - start[:, 0:1]).astype(np.float32)[:, None, :]
        dy = (ys - start[:, 1:2]).astype(np.float32)[:, :, None]
        ex = delta[:, 0, None, None]
        ey = delta[:, 1, None, None]
        squared_length = np.maximum(ex * ex + ey * ey, 1e-12)
        t = np.clip((dx * ex + dy * ey) / squared_length, 0.0, 1.0)
        ox = dx - t * ex
        oy = dy - t * ey
        mask = ox * ox + oy * oy <= half_width * half_width
    mask &= inside_y[:, :, None] & inside_x[:, None, :]
    shape, row, col = np.nonzero(mask)
    # Indices come in shape order, and numpy assigns repeated indices in order, so the
    # last-drawn shape wins where shapes overlap (OpenPose's painter's order).
    canvas[frame_index[shape], ys[shape, row], xs[shape, col]] = colors[shape]


def _paint_discs(canvas, xy, visible, colors, radius):
    """Draws the visible points of xy (T, P, 2) as discs, point p after point p - 1.

    colors: (P, 3) uint8.
    """
    frames, points = np.nonzero(visible)  # frame-major, points ascending within a frame
    centres = xy[frames, points]
    _paint(canvas, frames, centres, centres, radius, colors[points], ellipse=False)


def _paint_segments(canvas, xy, visible, edges, colors, half_width, *, ellipse=False):
    """Draws the edges (E, 2) of a point set (T, P, 2), in one pass over every frame: edge e
    after e - 1 within a frame (frames never overlap, so their order does not matter).
    ellipse: OpenPose's limb ellipses, else capsules (DWPose's bones)."""
    a, b = edges[:, 0], edges[:, 1]
    frames, edge = np.nonzero(visible[:, a] & visible[:, b])
    _paint(canvas, frames, xy[frames, a[edge]], xy[frames, b[edge]], half_width,
           colors[edge], ellipse=ellipse)


def draw_skeletons(points, layout, height, width, *,
                   confidence_threshold=DEFAULT_CONFIDENCE_THRESHOLD,
                   stroke_scale=1.0, draw_feet=False) -> np.ndarray:
    """Renders pose frames as OpenPose/DWPose skeleton images.

    Args:
      points: (T, K, 3) x, y in pixels (x to the right, y down; pixel centres at integer
        coordinates) and confidence. A (K, 3) single frame is accepted too.
      layout: ``"openpose18"``/``"dwpose134"``/``"face68"`` (or an alias) or a
        ``PoseLayout``.
      height, width: canvas size in pixels.
      confidence_threshold: points with confidence below it are not drawn, nor are limbs
        touching them.
      stroke_scale: multiplies every stroke width and dot radius (1.0 = OpenPose's sizes
        at a 512-px short side, scaled with the canvas).
      draw_feet: also draw DWPose's foot points as limbs from the ankles (DWPose itself
        does not).
    Returns:
      (T, H, W, 3) uint8 RGB images on a black background ((H, W, 3) for a single frame).
    """
    layout = get_layout(layout)
    points = np.asarray(points, dtype=np.float32)
    single_frame = points.ndim == 2
    if single_frame:
        points = points[None]
    if points.ndim != 3 or points.shape[1:] != (layout.num_keypoints, 3):
        raise ValueError(f"points must be (T, {layout.num_keypoints}, 3) for layout "
                         f"{layout.name}, got {points.shape}")
    height, width = int(height), int(width)
    canvas = np.zeros((points.shape[0], height, width, 3), np.uint8)
    xy = points[..., :2]
    # A point further than FAR_OFF canvases away is a damaged coordinate, not a pose: it is
    # not drawn (its float32 geometry would overflow), like a non-finite one.
    far = np.any(np.abs(xy) > FAR_OFF * max(height, width), axis=-1)
    visible = (points[..., 2] >= confidence_threshold) & np.all(np.isfinite(points), axis=-1) & ~far

    def size(base):
        return stroke_pixels(base, height, width, stroke_scale)

    if "body" in layout.groups:
        # OpenPose multiplies the canvas by 0.6 after the limbs: the same as dimmed limb colours.
        limb_colors = _dimmed(layout.body_limb_colors)
        _paint_segments(canvas, xy, visible, layout.body_limbs, limb_colors, size(LIMB_HALF_WIDTH),
                        ellipse=True)
        if draw_feet and len(layout.feet_limbs):
            _paint_segments(canvas, xy, visible, layout.feet_limbs, _dimmed(layout.feet_limb_colors),
                            size(LIMB_HALF_WIDTH), ellipse=True)
        body = layout.group_slice("body")
        _paint_discs(canvas, xy[:, body], visible[:, body], layout.joint_colors,
                     size(JOINT_RADIUS))

    if "left_hand" in layout.groups:
        joint_colors = np.broadcast_to(np.uint8(HAND_JOINT_COLOR), (21, 3))
        for hand in ("left_hand", "right_hand"):
            part = layout.group_slice(hand)
            _paint_segments(canvas, xy[:, part], visible[:, part], layout.hand_edges,
                            layout.hand_edge_colors, size(HAND_LINE_HALF_WIDTH))
            _paint_discs(canvas, xy[:, part], visible[:, part], joint_colors,
                         size(HAND_JOINT_RADIUS))
    if "face" in layout.groups:
        face = layout.group_slice("face")
        _paint_segments(canvas, xy[:, face], visible[:, face], layout.face_edges,
                        _dimmed(layout.face_edge_colors), size(FACE_LINE_HALF_WIDTH))
        _paint_discs(canvas, xy[:, face], visible[:, face], layout.face_point_colors,
                     size(FACE_DOT_RADIUS))
    return canvas[0] if single_frame else canvas


def _dimmed(colors: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 colours at OpenPose's limb intensity."""
    return (colors * LIMB_INTENSITY).astype(np.uint8)


def render(pose_seq, *, confidence_threshold=DEFAULT_CONFIDENCE_THRESHOLD, stroke_scale=1.0,
           draw_feet=False) -> np.ndarray:
    """Renders a ``PoseSequence`` at its own size: (T, H, W, 3) uint8."""
    return draw_skeletons(pose_seq.points, pose_seq.layout, pose_seq.height, pose_seq.width,
                          confidence_threshold=confidence_threshold, stroke_scale=stroke_scale,
                          draw_feet=draw_feet)
