"""Pose alignment recovers the reference's proportions on synthetic skeletons."""
import numpy as np
import pytest

from consist_jax.poses import PoseSequence, align_poses, example_pose, fit_alignment
from consist_jax.poses import layouts as L

BODY_PARENTS = np.array(L.BODY_PARENTS)
PARENTS_FIRST = (1, 0, 2, 5, 8, 11, 14, 15, 3, 6, 9, 12, 16, 17, 4, 7, 10, 13)
ARM_POINTS = (3, 4, 6, 7)  # elbows and wrists: the bones ending there are the arms


def _bone_vectors(body_xy):
    """(..., 18, 2) -> (..., 18, 2): each point minus its parent (zero for the neck)."""
    vectors = body_xy - body_xy[..., np.maximum(BODY_PARENTS, 0), :]
    vectors[..., 1, :] = 0
    return vectors


def _build(neck_xy, bone_vectors):
    """Positions from the neck outward along the tree."""
    xy = np.zeros(bone_vectors.shape)
    xy[..., 1, :] = neck_xy
    for k in PARENTS_FIRST[1:]:
        xy[..., k, :] = xy[..., BODY_PARENTS[k], :] + bone_vectors[..., k, :]
    return xy


def _rotate(vectors, angles):
    cos, sin = np.cos(angles)[..., None], np.sin(angles)[..., None]
    x, y = vectors[..., :1], vectors[..., 1:]
    return np.concatenate([cos * x - sin * y, sin * x + cos * y], axis=-1)


def _driving_and_reference(rng, num_frames=6, arm_factor=1.3):
    base = example_pose("openpose18", 512, 512).astype(np.float64)
    bones = _bone_vectors(base[:, :2])
    # Driving: every bone turned by its own angle per frame, the body moving around.
    angles = rng.uniform(-0.6, 0.6, (num_frames, 18))
    necks = base[1, :2] + rng.uniform(-40, 40, (num_frames, 2))
    driving_xy = _build(necks, _rotate(bones[None], angles))
    # Reference: another person (0.7 the size, arms `arm_factor` longer, other bones up
    # to 20% off) in another pose and place.
    factors = rng.uniform(0.8, 1.2, 18)
    factors[list(ARM_POINTS)] = arm_factor
    ref_bones = _rotate(bones * 0.7 * factors[:, None], rng.uniform(-0.3, 0.3, 18))
    reference_xy = _build(np.array([300.0, 150.0]), ref_bones)
    confidence = np.ones((num_frames, 18, 1))
    driving = PoseSequence(np.concatenate([driving_xy, confidence], -1), "openpose18", 512, 512)
    reference = PoseSequence(np.concatenate([reference_xy, confidence[0]], -1)[None],
                             "openpose18", 400, 600)
    return driving, reference


def _lengths_and_directions(xy):
    vectors = _bone_vectors(xy)[..., [k for k in range(18) if k != 1], :]
    lengths = np.linalg.norm(vectors, axis=-1)
    return lengths, vectors / lengths[..., None]


def test_per_limb_gives_reference_bone_lengths_and_keeps_directions(rng):
    driving, reference = _driving_and_reference(rng)
    aligned = align_poses(driving, reference, "per_limb")
    assert (aligned.height, aligned.width) == (400, 600)  # the reference's canvas
    out_lengths, out_directions = _lengths_and_directions(aligned.xy.astype(np.float64))
    ref_lengths, _ = _lengths_and_directions(reference.xy[0].astype(np.float64))
    _, drv_directions = _lengths_and_directions(driving.xy.astype(np.float64))
    np.testing.assert_allclose(out_lengths, np.broadcast_to(ref_lengths, out_lengths.shape),
                               rtol=1e-4)
    np.testing.assert_allclose(out_directions, drv_directions, atol=1e-4)
    np.testing.assert_allclose(aligned.xy[0, 1], reference.xy[0, 1], atol=1e-3)  # necks meet
    np.testing.assert_array_equal(aligned.confidence, driving.confidence)
    # The arms are 1.3x the driving's, scaled like the rest of the body.
    alignment = fit_alignment(reference.points[0], driving.points)
    arm_ratio = alignment.body_ratios[list(ARM_POINTS)] / alignment.scale
    assert np.all(arm_ratio > 1.3 * 0.8 - 1e-6)


def test_global_is_one_scale_and_offset(rng):
    driving, reference = _driving_and_reference(rng)
    aligned = align_poses(driving, reference, "global").xy.astype(np.float64)
    drv = driving.xy.astype(np.float64)
    np.testing.assert_allclose(aligned[0, 1], reference.xy[0, 1], atol=1e-3)

    def torso(xy):
        return np.linalg.norm(xy[..., [8, 11], :] - xy[..., 1:2, :], axis=-1).mean(-1)

    scale = torso(reference.xy[0].astype(np.float64)) / torso(drv[0])
    np.testing.assert_allclose(aligned - aligned[:1, 1:2], scale * (drv - drv[:1, 1:2]),
                               rtol=1e-4, atol=1e-3)
    assert align_poses(driving, reference, "off") is driving
    with pytest.raises(ValueError, match="alignment mode"):
        align_poses(driving, reference, "stretch")


def test_transform_is_constant_over_time(rng):
    """Aligning a clip frame by frame with the clip's alignment equals aligning it whole."""
    from consist_jax.poses import apply_alignment

    driving, reference = _driving_and_reference(rng)
    whole = align_poses(driving, reference, "per_limb").points
    alignment = fit_alignment(reference.points[0], driving.points)
    for t in range(driving.num_frames):
        frame = apply_alignment(driving.points[t:t + 1], alignment, "openpose18")
        np.testing.assert_allclose(frame[0], whole[t], atol=1e-4)


def test_robust_driving_lengths_ignore_a_foreshortened_first_frame(rng):
    driving, reference = _driving_and_reference(rng)
    points = driving.points.copy()
    # First frame: the right forearm pointing at the camera, at half its length.
    points[0, 4, :2] = points[0, 3, :2] + 0.5 * (points[0, 4, :2] - points[0, 3, :2])
    driving = driving.replace(points=points)
    ref_length = np.linalg.norm(reference.xy[0, 4] - reference.xy[0, 3])
    for stat, expected_factor in (("first", 2.0), ("max", 1.0), ("median", 1.0)):
        aligned = align_poses(driving, reference, "per_limb", driving_lengths=stat)
        forearm = np.linalg.norm(aligned.xy[1:, 4] - aligned.xy[1:, 3], axis=-1)
        np.testing.assert_allclose(forearm, expected_factor * ref_length, rtol=1e-4)


def test_hidden_points_fall_back_to_the_global_transform(rng):
    driving, reference = _driving_and_reference(rng)
    points = driving.points.copy()
    points[2, 3, 2] = 0.1  # right elbow hidden in frame 2
    points[:, 16, 2] = 0.0  # right ear never seen: its bone uses the global scale
    driving = driving.replace(points=points)
    aligned = align_poses(driving, reference, "per_limb")
    globally = align_poses(driving, reference, "global")
    assert np.all(np.isfinite(aligned.points))
    np.testing.assert_allclose(aligned.xy[2, 4], globally.xy[2, 4], atol=1e-3)  # the wrist
    ref_length = np.linalg.norm(reference.xy[0, 6] - reference.xy[0, 5])
    np.testing.assert_allclose(np.linalg.norm(aligned.xy[:, 6] - aligned.xy[:, 5], axis=-1),
                               ref_length, rtol=1e-4)  # the other arm is unaffected
    alignment = fit_alignment(reference.points[0], driving.points)
    assert alignment.body_ratios[16] == pytest.approx(alignment.scale)


def test_hands_face_and_feet_follow_their_attachment(rng):
    driving18, reference18 = _driving_and_reference(rng, num_frames=4)
    base = example_pose("dwpose134", 512, 512).astype(np.float64)
    points = np.repeat(base[None], 4, axis=0)
    points[:, :18] = driving18.points
    # Hands, feet and face move rigidly with their anchor in the driving clip.
    for group, anchor in ((slice(92, 113), 7), (slice(113, 134), 4), (slice(18, 21), 13),
                          (slice(21, 24), 10), (slice(24, 92), 0)):
        points[:, group, :2] += (driving18.xy[:, anchor] - base[anchor, :2])[:, None]
    driving = PoseSequence(points, "dwpose134", 512, 512)
    reference = np.concatenate([reference18.points[0], np.zeros((116, 3))])  # body only
    aligned = align_poses(driving, PoseSequence(reference[None], "dwpose134", 400, 600))
    alignment = fit_alignment(reference, driving.points)
    out, drv = aligned.xy.astype(np.float64), driving.xy.astype(np.float64)
    for group, anchor, ratio in ((slice(92, 113), 7, alignment.body_ratios[7]),
                                 (slice(113, 134), 4, alignment.body_ratios[4]),
                                 (slice(21, 24), 10, alignment.body_ratios[10]),
                                 (slice(24, 92), 0, alignment.head_ratio)):
        np.testing.assert_allclose(out[:, group] - out[:, anchor, None],
                                   ratio * (drv[:, group] - drv[:, anchor, None]),
                                   rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out[:, :18], align_poses(driving18, reference18).xy, atol=1e-3)


def test_anchor_falls_back_to_a_hip_when_the_reference_hides_the_neck(rng):
    driving, reference = _driving_and_reference(rng)
    points = reference.points.copy()
    points[0, 1, 2] = 0.0
    reference = reference.replace(points=points)
    aligned = align_poses(driving, reference, "global")
    np.testing.assert_allclose(aligned.xy[0, 8], reference.xy[0, 8], atol=1e-3)
    with pytest.raises(ValueError, match="visible both"):
        align_poses(driving, reference.replace(points=points * [1, 1, 0]), "global")
