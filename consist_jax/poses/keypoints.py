"""The pose container (``PoseSequence``), format conversions, and an example pose.

Coordinates are pixels: x to the right, y down, pixel centres at integer coordinates
(OpenPose's convention). Confidence is a score >= 0; a point counts as visible when its
confidence reaches the renderer's threshold (0.3 by default, DWPose's); 0 means missing.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from consist_jax.poses import layouts as L

# OpenPose BODY_25 -> COCO-18: BODY_25 adds mid-hip (8) and six foot points (19-24), else
# the same body points in the same order.
BODY25_TO_OPENPOSE18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
# BODY_25's feet (LBigToe, LSmallToe, LHeel, RBigToe, RSmallToe, RHeel) are in DWPose's
# foot order already.
BODY25_FEET = (19, 20, 21, 22, 23, 24)
# COCO-17 (nose, l_eye, r_eye, l_ear, r_ear, l_sho, r_sho, l_elb, r_elb, l_wri, r_wri,
# l_hip, r_hip, l_knee, r_knee, l_ank, r_ank) -> OpenPose-18; -1 is the neck, which COCO
# lacks and DWPose makes as the shoulders' midpoint.
COCO17_TO_OPENPOSE18 = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_L_SHOULDER, COCO_R_SHOULDER = 5, 6
# Raw COCO-WholeBody (133 points): body 0-16, feet 17-22, face 23-90, left hand 91-111,
# right hand 112-132. DWPose's 134 = OpenPose-18 body + the other 116 in the same order.
WHOLEBODY133_BODY = 17

SOURCE_FORMATS = {17: "coco17", 18: "openpose18", 25: "body25", 68: "face68",
                  133: "wholebody133", 134: "dwpose134"}


@dataclasses.dataclass(frozen=True, eq=False)
class PoseSequence:
    """A sequence of one person's keypoints.

    Attributes:
      points: (T, K, 3) float32, x, y in pixels and confidence. Stored read-only.
      layout: layout name (``"openpose18"``, ``"dwpose134"`` or ``"face68"``; aliases are
        normalised).
      height, width: the image size the pixel coordinates refer to.
      source: where the poses came from (a path), used in error messages only.

    Raises ValueError on an empty sequence, a wrong shape or number of points for the
    layout, NaN/inf values or a non-positive image size, naming the source and frame.
    """

    points: np.ndarray
    layout: str
    height: int
    width: int
    source: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        where = f" ({self.source})" if self.source else ""
        layout = L.get_layout(self.layout)
        points = np.array(self.points, dtype=np.float32)  # a private copy
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"pose points must be (T, K, 3), got {points.shape}{where}")
        if points.shape[0] == 0:
            raise ValueError(f"empty pose sequence (no frames){where}")
        if points.shape[1] != layout.num_keypoints:
            raise ValueError(f"layout {layout.name} has {layout.num_keypoints} points, got "
                             f"{points.shape[1]}{where}")
        bad = ~np.isfinite(points)
        if bad.any():
            frame, point, _ = np.argwhere(bad)[0]
            raise ValueError(f"non-finite keypoint value in frame {frame}, point {point} "
                             f"({layout.keypoint_names[point]}){where}")
        if int(self.height) <= 0 or int(self.width) <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}"
                             f"{where}")
        points.setflags(write=False)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "layout", layout.name)
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))

    @property
    def layout_spec(self) -> L.PoseLayout:
        return L.get_layout(self.layout)

    @property
    def num_frames(self) -> int:
        return self.points.shape[0]

    @property
    def num_keypoints(self) -> int:
        return self.points.shape[1]

    @property
    def xy(self) -> np.ndarray:
        """(T, K, 2) pixel coordinates."""
        return self.points[..., :2]

    @property
    def confidence(self) -> np.ndarray:
        """(T, K) confidence."""
        return self.points[..., 2]

    def visible(self, threshold: float = 0.3) -> np.ndarray:
        """(T, K) bool, confidence >= threshold."""
        return self.points[..., 2] >= threshold

    def __len__(self) -> int:
        return self.num_frames

    def frames(self, index) -> "PoseSequence":
        """The frames selected by ``index`` (int, slice or index array), still (T', K, 3)."""
        points = self.points[index]
        if points.ndim == 2:
            points = points[None]
        return self.replace(points=points)

    def replace(self, **changes) -> "PoseSequence":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def coco17_to_openpose18(points: np.ndarray) -> np.ndarray:
    """(..., 17, 3) COCO body -> (..., 18, 3) OpenPose-18, adding the neck as DWPose does.

    The neck is the shoulders' midpoint; its confidence the lower of the two (so it is
    visible exactly when both shoulders are).
    """
    points = np.asarray(points, np.float32)
    shoulders = points[..., [COCO_L_SHOULDER, COCO_R_SHOULDER], :]
    neck = np.concatenate([shoulders[..., :2].mean(axis=-2), shoulders[..., 2].min(axis=-1,
                                                                                 keepdims=True)],
                          axis=-1)
    index = np.array(COCO17_TO_OPENPOSE18)
    out = points[..., np.maximum(index, 0), :].copy()
    out[..., 1, :] = neck
    return out


def body25_to_openpose18(points: np.ndarray) -> np.ndarray:
    """(..., 25, 3) OpenPose BODY_25 -> (..., 18, 3) COCO-18 (mid-hip and feet dropped)."""
    return np.asarray(points, np.float32)[..., BODY25_TO_OPENPOSE18, :]


def wholebody133_to_dwpose134(points: np.ndarray) -> np.ndarray:
    """(..., 133, 3) COCO-WholeBody -> (..., 134, 3) DWPose (body reordered, neck added)."""
    points = np.asarray(points, np.float32)
    body = coco17_to_openpose18(points[..., :WHOLEBODY133_BODY, :])
    return np.concatenate([body, points[..., WHOLEBODY133_BODY:, :]], axis=-2)


def openpose18_to_dwpose134(points: np.ndarray) -> np.ndarray:
    """(..., 18, 3) -> (..., 134, 3) with feet, face and hands missing (all zeros)."""
    points = np.asarray(points, np.float32)
    rest = np.zeros(points.shape[:-2] + (L.DWPOSE_134.num_keypoints - 18, 3), np.float32)
    return np.concatenate([points, rest], axis=-2)


def to_layout_points(points: np.ndarray, what: str = "points") -> tuple[np.ndarray, str]:
    """Points of any known body format, by count, -> (points, layout name).

    (T, K, 3) with K = 18 (OpenPose-18), 68 (iBUG face) or 134 (DWPose) is kept; K = 17 (COCO), 25
    (BODY_25) become OpenPose-18; K = 133 (COCO-WholeBody) becomes DWPose-134. Any other
    K raises ValueError mentioning ``what``.
    """
    points = np.asarray(points, np.float32)
    count = points.shape[-2] if points.ndim >= 2 else -1
    kind = SOURCE_FORMATS.get(count)
    if points.ndim < 2 or points.shape[-1] != 3 or kind is None:
        raise ValueError(f"{what}: expected (..., K, 3) with K in {sorted(SOURCE_FORMATS)} "
                         f"({', '.join(SOURCE_FORMATS.values())}), got shape {points.shape}")
    if kind == "coco17":
        return coco17_to_openpose18(points), L.OPENPOSE_18_NAME
    if kind == "body25":
        return body25_to_openpose18(points), L.OPENPOSE_18_NAME
    if kind == "wholebody133":
        return wholebody133_to_dwpose134(points), L.DWPOSE_134_NAME
    return points, kind


def convert_layout(pose_seq: PoseSequence, layout: str) -> PoseSequence:
    """The same poses in another layout: DWPose -> OpenPose-18 keeps the body, DWPose ->
    face68 the face; OpenPose-18 or face68 -> DWPose adds the missing (zero-confidence)
    parts. OpenPose-18 and face68 share no point: converting between them raises
    ValueError naming the source."""
    target = L.get_layout(layout).name
    source = pose_seq.layout
    if target == source:
        return pose_seq
    if L.DWPOSE_134_NAME not in (source, target):
        raise ValueError(f"cannot convert {source} poses to {target}: they share no keypoint "
                         f"({pose_seq.source or 'pose sequence'})")
    parts = {L.OPENPOSE_18_NAME: L.DWPOSE_134.group_slice("body"),
             L.FACE_68_NAME: L.DWPOSE_134.group_slice("face")}
    if source == L.DWPOSE_134_NAME:
        points = pose_seq.points[:, parts[target]]
    else:
        points = np.zeros((pose_seq.num_frames, L.DWPOSE_134.num_keypoints, 3), np.float32)
        points[:, parts[source]] = pose_seq.points
    return pose_seq.replace(points=points, layout=target)


# --- an example pose: a person standing, facing the camera, arms slightly out -------------
# Body in "units" (about 1 unit from the top of the head to the ankles), y down, person's
# right on the image's left.
_EXAMPLE_BODY = (
    (0.0, -0.38), (0.0, -0.28),
    (-0.10, -0.28), (-0.14, -0.13), (-0.17, 0.0),
    (0.10, -0.28), (0.14, -0.13), (0.17, 0.0),
    (-0.055, 0.0), (-0.06, 0.2), (-0.06, 0.4),
    (0.055, 0.0), (0.06, 0.2), (0.06, 0.4),
    (-0.022, -0.4), (0.022, -0.4), (-0.045, -0.39), (0.045, -0.39),
)
_EXAMPLE_FEET = ((0.05, 0.445), (0.085, 0.435), (0.065, 0.41),
                 (-0.05, 0.445), (-0.085, 0.435), (-0.065, 0.41))
_FACE_HALF_WIDTH = 0.045


def example_face_units() -> np.ndarray:
    """(68, 2) iBUG-68 landmarks in face units (half-width 1, origin at the nose tip)."""
    jaw_angle = np.pi - np.pi * np.arange(17) / 16
    jaw = np.stack([np.cos(jaw_angle), -0.3 + 1.3 * np.sin(jaw_angle)], axis=1)
    brow_x = np.linspace(-0.8, -0.2, 5)
    right_brow = np.stack([brow_x, -0.55 - 0.1 * np.sin(np.linspace(0, np.pi, 5))], axis=1)
    left_brow = right_brow[::-1] * [-1, 1]
    bridge = np.stack([np.zeros(4), np.linspace(-0.35, 0.15, 4)], axis=1)
    nose_base = np.stack([np.linspace(-0.25, 0.25, 5), [0.3, 0.32, 0.33, 0.32, 0.3]], axis=1)
    right_eye = np.array([(-0.65, -0.3), (-0.53, -0.37), (-0.37, -0.37), (-0.25, -0.3),
                          (-0.37, -0.24), (-0.53, -0.24)])
    left_eye = np.array([(0.25, -0.3), (0.37, -0.37), (0.53, -0.37), (0.65, -0.3),
                         (0.53, -0.24), (0.37, -0.24)])
    outer = np.pi + 2 * np.pi * np.arange(12) / 12
    outer_lip = np.stack([0.4 * np.cos(outer), 0.65 + 0.15 * np.sin(outer)], axis=1)
    inner = np.pi + 2 * np.pi * np.arange(8) / 8
    inner_lip = np.stack([0.25 * np.cos(inner), 0.65 + 0.06 * np.sin(inner)], axis=1)
    return np.concatenate([jaw, right_brow, left_brow, bridge, nose_base, right_eye,
                           left_eye, outer_lip, inner_lip])


def _example_hand(wrist, side: float) -> np.ndarray:
    """(21, 2) a relaxed open hand hanging down from ``wrist``; side +1 left, -1 right."""
    # Finger directions from the +x axis (y down) for the left hand, thumb outward.
    angles = np.deg2rad([35.0, 66.0, 84.0, 102.0, 120.0])
    bone_lengths = ((0.02, 0.017, 0.014, 0.012),) + ((0.04, 0.02, 0.015, 0.012),) * 4
    points = [np.asarray(wrist, float)]
    for angle, lengths in zip(angles, bone_lengths):
        direction = np.array([side * np.cos(angle), np.sin(angle)])
        position = np.asarray(wrist, float)
        for length in lengths:
            position = position + length * direction
            points.append(position)
    return np.array(points)


def example_pose(layout: str = L.OPENPOSE_18_NAME, height: int = 512, width: int = 512,
                 confidence: float = 1.0) -> np.ndarray:
    """(K, 3) float32, a hand-written standing person filling most of a (height, width)
    canvas (for face68: a face filling most of it), every point visible -- for tests,
    demos and golden images."""
    layout = L.get_layout(layout)
    if layout.name == L.FACE_68_NAME:
        # Face units span x in [-1, 1] and y in [-0.65, 1.0] (centre 0.175) about the nose.
        scale = 0.8 * min(height / 1.65, width / 2.0)
        centre = [(width - 1) / 2.0, (height - 1) / 2.0 - 0.175 * scale]
        pixels = example_face_units() * scale + centre
        return np.concatenate([pixels, np.full((len(pixels), 1), confidence)],
                              axis=1).astype(np.float32)
    body = np.array(_EXAMPLE_BODY)
    units = [body]
    if layout.name == L.DWPOSE_134_NAME:
        face = body[L.NOSE] + _FACE_HALF_WIDTH * example_face_units()
        units += [np.array(_EXAMPLE_FEET), face,
                  _example_hand(body[7], side=1.0), _example_hand(body[4], side=-1.0)]
    xy = np.concatenate(units)
    # The figure spans about 0.9 x 0.45 units; fit it into the canvas keeping proportions.
    scale = 0.9 * min(height / 0.95, width / 0.5)
    pixels = xy * scale + [(width - 1) / 2.0, (height - 1) / 2.0]
    out = np.concatenate([pixels, np.full((len(xy), 1), confidence)], axis=1)
    return out.astype(np.float32)
