"""Pose alignment: give a driving pose sequence the reference person's body.

The top complaint about pose-driven animation is a driving skeleton whose proportions
differ from the reference person's ("looks stretched"). Alignment fits one transform --
constant over time, so the driving motion is kept, foreshortening included -- from the
reference pose and the driving sequence, and applies it to every frame:

* ``off``: the driving sequence unchanged.
* ``global``: ``x' = ref_anchor + s * (x - drv_anchor)``: one scale ``s`` (the ratio of
  torso lengths, neck to hips; else of shoulder widths; else the median bone ratio) and
  the offset that puts the driving neck (in its first frame showing it) on the reference
  neck (a hip, then other body points, when the neck is never seen).
* ``per_limb``: the neck is placed as in ``global``; then, outward along the kinematic
  tree, each body point is put at ``parent' + r_bone * (x - x_parent)``: the driving
  bone's direction, rescaled by ``r_bone = reference length / driving length``. When the
  driving bone keeps its length over time, every output bone has exactly the reference's
  length. Feet follow their ankle (scaled by the shin's ratio), each hand its body wrist
  (the forearm's ratio), the face the nose (the median ratio of the head bones), each
  rescaled uniformly about that attachment point.

Face poses (``face68``, face reenactment) have no body: ``global`` takes the ratio of the
distances between the eyes' centres (else of the jaw's ends) and puts the driving nose tip
on the reference's; ``per_limb`` needs a body and is refused for them.

Driving bone lengths come from the first frame (``driving_lengths="first"``), the median
over the frames showing the bone (``"median"``) or their maximum (``"max"``; foreshortening
only ever shortens a bone). A bone hidden in the reference or the driving statistic uses
the global scale; a point whose parent is hidden in a frame gets the global transform.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from consist_jax.poses import layouts as L
from consist_jax.poses.keypoints import PoseSequence

ALIGN_MODES = ("off", "global", "per_limb")
DRIVING_LENGTH_STATS = ("first", "median", "max")
TORSO_BONES = ((1, 8), (1, 11))        # neck -> hips
SHOULDER_BONES = ((1, 2), (1, 5))      # neck -> shoulders (fallback scale)
HEAD_BONES = ((0, 14), (0, 15), (14, 16), (15, 17))
# DWPose groups that hang from a body point: (their points, that body point). They are
# scaled by the ratio of the bone ending at that point (shin for a foot, forearm for a hand).
GROUP_ATTACHMENTS = (
    (slice(L.FEET_START, L.FEET_START + 3), 13),                      # left foot, l_ankle
    (slice(L.FEET_START + 3, L.FACE_START), 10),                      # right foot, r_ankle
    (slice(L.LEFT_HAND_START, L.RIGHT_HAND_START), 7),                # left hand, l_wrist
    (slice(L.RIGHT_HAND_START, L.RIGHT_HAND_START + L.NUM_HAND_POINTS), 4),  # r_wrist
)
_BODY_ORDER = (1, 0, 2, 5, 8, 11, 14, 15, 3, 6, 9, 12, 16, 17, 4, 7, 10, 13)  # parents first
# The point matched between reference and driving: the neck, else the first seen of these.
ANCHOR_PREFERENCE = (1, 8, 11, 2, 5, 0, 14, 15, 16, 17, 3, 6, 9, 12, 4, 7, 10, 13)
# face68: the scale's distances (eye centre to eye centre, else the jaw's ends) and the
# matched point (the nose tip, else the bridge's top, the chin, the lips' centre points).
FACE_EYES = (tuple(range(36, 42)), tuple(range(42, 48)))
FACE_JAW_ENDS = (0, 16)
FACE_ANCHOR_PREFERENCE = (L.FACE_NOSE_TIP, 27, 8, 51, 57)


@dataclasses.dataclass(frozen=True, eq=False)
class Alignment:
    """A fitted alignment, constant over time.

    Attributes:
      mode: one of ``ALIGN_MODES``.
      scale: the global scale s.
      reference_anchor, driving_anchor: (2,) pixel positions matched by the offset.
      body_ratios: (18,) reference/driving length of the bone ending at each body point
        (s for the neck and for bones unseen in either pose; s everywhere for face68).
      head_ratio: the face's scale about the nose.
    """

    mode: str
    scale: float
    reference_anchor: np.ndarray
    driving_anchor: np.ndarray
    body_ratios: np.ndarray
    head_ratio: float


def _bone_lengths(xy, visible, bones):
    """(..., B) lengths of the bones (NaN where an end is hidden)."""
    a, b = np.asarray(bones).T
    lengths = np.linalg.norm(xy[..., b, :] - xy[..., a, :], axis=-1)
    return np.where(visible[..., a] & visible[..., b], lengths, np.nan)


def _driving_statistic(lengths: np.ndarray, stat: str) -> np.ndarray:
    """(T, B) per-frame lengths (NaN when hidden) -> (B,) per the statistic."""
    if stat not in DRIVING_LENGTH_STATS:
        raise ValueError(f"driving_lengths must be one of {DRIVING_LENGTH_STATS}, got {stat!r}")
    seen = np.isfinite(lengths)
    out = np.full(lengths.shape[1], np.nan)
    for bone in np.nonzero(seen.any(axis=0))[0]:
        values = lengths[seen[:, bone], bone]
        if stat == "max":
            out[bone] = values.max()
        elif stat == "median" or np.isnan(lengths[0, bone]):
            out[bone] = np.median(values)  # also "first" when the first frame hides it
        else:
            out[bone] = lengths[0, bone]
    return out


def _ratio(reference_lengths, driving_lengths):
    """Elementwise reference/driving ratio, NaN where either is unknown or degenerate."""
    valid = (np.isfinite(reference_lengths) & np.isfinite(driving_lengths)
             & (driving_lengths > 1e-6) & (reference_lengths > 1e-6))
    return np.where(valid, reference_lengths / np.where(valid, driving_lengths, 1.0), np.nan)


def _first_finite_median(*ratio_groups, default=1.0) -> float:
    """The median of the first group with a known ratio (the groups are fallbacks)."""
    for ratios in ratio_groups:
        ratios = ratios[np.isfinite(ratios)]
        if ratios.size:
            return float(np.median(ratios))
    return default


def _anchors(ref_xy, ref_visible, drv_xy, drv_visible, preference=ANCHOR_PREFERENCE):
    """(reference (2,), driving (2,)) positions of one point: the first of ``preference``
    (for a body: the neck, else a hip, ...) seen in the reference and in some driving
    frame, taken in the first driving frame that shows it."""
    for point in preference:
        if ref_visible[point] and drv_visible[:, point].any():
            return ref_xy[point], drv_xy[np.argmax(drv_visible[:, point]), point]
    raise ValueError("alignment needs a body point visible both in the reference and in "
                     "the driving sequence")


def _eye_distance(xy, visible):
    """(...,) distance between the eyes' centres (NaN unless every eye point is visible)."""
    centres = [xy[..., eye, :].mean(axis=-2) for eye in FACE_EYES]
    seen = np.all(visible[..., FACE_EYES[0] + FACE_EYES[1]], axis=-1)
    return np.where(seen, np.linalg.norm(centres[1] - centres[0], axis=-1), np.nan)


def _fit_face_alignment(reference, driving, mode, confidence_threshold, driving_lengths):
    """``fit_alignment`` for face68 points: (68, 3) reference, (T, 68, 3) driving."""
    if mode == "per_limb":
        raise ValueError("alignment mode 'per_limb' needs a body; face68 poses align with "
                         "'global' or 'off'")
    ref_xy, ref_visible = reference[:, :2], reference[:, 2] >= confidence_threshold
    drv_xy, drv_visible = driving[..., :2], driving[..., 2] >= confidence_threshold
    ratios = []
    for distance in (_eye_distance,
                     lambda xy, visible: _bone_lengths(xy, visible, [FACE_JAW_ENDS])[..., 0]):
        reference_length = np.atleast_1d(distance(ref_xy, ref_visible))
        driving_length = _driving_statistic(distance(drv_xy, drv_visible)[:, None],
                                            driving_lengths)
        ratios.append(_ratio(reference_length, driving_length))
    scale = _first_finite_median(*ratios)
    reference_anchor, driving_anchor = _anchors(ref_xy, ref_visible, drv_xy, drv_visible,
                                                FACE_ANCHOR_PREFERENCE)
    return Alignment(mode=mode, scale=scale, reference_anchor=reference_anchor,
                     driving_anchor=driving_anchor, body_ratios=np.full(18, scale),
                     head_ratio=scale)


def fit_alignment(reference_points, driving_points, mode: str = "per_limb", *,
                  confidence_threshold: float = 0.3,
                  driving_lengths: str = "first") -> Alignment:
    """Fits the alignment of a driving sequence to a reference pose.

    Args:
      reference_points: (K, 3) the reference pose (pixels, confidence); only its body
        (first 18 points, either body layout) is used -- or, for face68 (K = 68), its face.
      driving_points: (T, K', 3) the driving sequence (face68 with a face68 reference).
      mode: ``"off"``, ``"global"`` or ``"per_limb"``.
      driving_lengths: ``"first"``, ``"median"`` or ``"max"`` (see the module docstring).
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"alignment mode must be one of {ALIGN_MODES}, got {mode!r}")
    faces = [np.shape(p)[-2] == L.FACE_68.num_keypoints for p in (reference_points, driving_points)]
    if any(faces):
        if not all(faces):
            raise ValueError(f"face68 poses align only to face68 poses, got "
                             f"{np.shape(reference_points)[-2]} reference and "
                             f"{np.shape(driving_points)[-2]} driving points")
        return _fit_face_alignment(np.asarray(reference_points, np.float64),
                                   np.asarray(driving_points, np.float64), mode,
                                   confidence_threshold, driving_lengths)
    reference = np.asarray(reference_points, np.float64)[:18]
    driving = np.asarray(driving_points, np.float64)[:, :18]
    ref_xy, ref_visible = reference[:, :2], reference[:, 2] >= confidence_threshold
    drv_xy, drv_visible = driving[..., :2], driving[..., 2] >= confidence_threshold

    def ratios(bones):
        return _ratio(_bone_lengths(ref_xy, ref_visible, bones),
                      _driving_statistic(_bone_lengths(drv_xy, drv_visible, bones),
                                         driving_lengths))

    body_bones = [(int(L.BODY_PARENTS[k]), k) for k in range(18) if L.BODY_PARENTS[k] >= 0]
    bone_ratios = ratios(body_bones)
    scale = _first_finite_median(ratios(TORSO_BONES), ratios(SHOULDER_BONES), bone_ratios)
    body_ratios = np.full(18, scale)
    for (_, child), ratio in zip(body_bones, bone_ratios):
        if np.isfinite(ratio):
            body_ratios[child] = ratio
    head_ratio = _first_finite_median(ratios(HEAD_BONES), default=scale)

    reference_anchor, driving_anchor = _anchors(ref_xy, ref_visible, drv_xy, drv_visible)
    return Alignment(mode=mode, scale=float(scale), reference_anchor=reference_anchor,
                     driving_anchor=driving_anchor, body_ratios=body_ratios,
                     head_ratio=head_ratio)


def apply_alignment(points, alignment: Alignment, layout, *,
                    confidence_threshold: float = 0.3) -> np.ndarray:
    """Applies a fitted alignment to every frame.

    Args:
      points: (T, K, 3) driving points (pixels, confidence).
      layout: the points' layout (name or ``PoseLayout``).
    Returns:
      (T, K, 3) float32, aligned positions with the driving confidences.
    """
    layout = L.get_layout(layout)
    points = np.asarray(points, np.float64)
    if alignment.mode == "off":
        return points.astype(np.float32)
    xy = points[..., :2]
    visible = points[..., 2] >= confidence_threshold
    moved = alignment.reference_anchor + alignment.scale * (xy - alignment.driving_anchor)
    if alignment.mode == "per_limb":
        out = moved.copy()
        for k in _BODY_ORDER[1:]:  # the neck keeps the global placement
            parent = int(L.BODY_PARENTS[k])
            from_parent = out[:, parent] + alignment.body_ratios[k] * (xy[:, k] - xy[:, parent])
            out[:, k] = np.where(visible[:, parent, None], from_parent, moved[:, k])
        attachments = []
        if layout.name == L.DWPOSE_134_NAME:
            attachments = [(group, anchor, alignment.body_ratios[anchor])
                           for group, anchor in GROUP_ATTACHMENTS]
            attachments.append((layout.group_slice("face"), L.NOSE, alignment.head_ratio))
        for group, anchor, ratio in attachments:
            from_anchor = out[:, anchor, None] + ratio * (xy[:, group] - xy[:, anchor, None])
            out[:, group] = np.where(visible[:, anchor, None, None], from_anchor,
                                     moved[:, group])
        moved = out
    return np.concatenate([moved, points[..., 2:]], axis=-1).astype(np.float32)


def align_poses(driving: PoseSequence, reference, mode: str = "per_limb", *,
                confidence_threshold: float = 0.3, driving_lengths: str = "first",
                reference_frame: int = 0) -> PoseSequence:
    """The driving sequence with the reference's body (see the module docstring).

    Args:
      driving: the driving ``PoseSequence`` (T frames).
      reference: a ``PoseSequence`` (frame ``reference_frame`` is used) or a (K, 3) array
        in the driving sequence's pixel frame.
    Returns:
      A ``PoseSequence`` in the driving layout, on the reference's canvas (height, width).
    """
    if isinstance(reference, PoseSequence):
        reference_points = reference.points[reference_frame]
        height, width = reference.height, reference.width
    else:
        reference_points = np.asarray(reference, np.float32)
        height, width = driving.height, driving.width
    if mode == "off":
        return driving
    alignment = fit_alignment(reference_points, driving.points, mode,
                              confidence_threshold=confidence_threshold,
                              driving_lengths=driving_lengths)
    aligned = apply_alignment(driving.points, alignment, driving.layout,
                              confidence_threshold=confidence_threshold)
    return driving.replace(points=aligned, height=height, width=width)
