"""Sequence utilities: smoothing, resampling, cropping, resizing, flips."""
import numpy as np
import pytest

from consist_jax.poses import (
    PoseSequence,
    crop_around_person,
    draw_skeletons,
    example_pose,
    flip_horizontal,
    flip_keypoints,
    person_box,
    resample_fps,
    resize_poses,
    smooth_poses,
    stride_frames,
)


def _static_clip(rng, num_frames=60, jitter=2.0, layout="openpose18", size=(256, 192)):
    base = example_pose(layout, *size)
    points = np.repeat(base[None], num_frames, axis=0)
    points[..., :2] += rng.normal(0, jitter, points[..., :2].shape)
    return PoseSequence(points, layout, *size), base


@pytest.mark.parametrize("method,kwargs", [("gaussian", {"sigma": 2.0}),
                                           ("one_euro", {"min_cutoff": 0.5, "beta": 0.0})])
def test_smoothing_removes_jitter_and_ignores_hidden_points(rng, method, kwargs):
    clip, base = _static_clip(rng)
    points = clip.points.copy()
    points[30, 5] = (1000.0, -1000.0, 0.0)  # a hidden outlier must not pull its neighbours
    clip = clip.replace(points=points)
    smoothed = smooth_poses(clip, method, **kwargs)
    error_before = np.abs(clip.xy[10:] - base[:, :2]).mean()
    error_after = np.abs(np.delete(smoothed.xy[10:], 20, axis=0) - base[:, :2]).mean()
    assert error_after < 0.6 * error_before
    np.testing.assert_array_equal(smoothed.points[30, 5], points[30, 5])  # kept as it was
    assert np.abs(smoothed.xy[29:32:2, 5] - base[5, :2]).max() < 8
    np.testing.assert_array_equal(smoothed.confidence, clip.confidence)


def test_gaussian_keeps_linear_motion_and_one_euro_follows_fast_motion(rng):
    frames = np.arange(40, dtype=np.float64)
    base = example_pose("openpose18", 512, 512)
    points = np.repeat(base[None], 40, axis=0)
    points[..., 0] += 3.0 * frames[:, None]  # moving right at 3 px/frame
    clip = PoseSequence(points, "openpose18", 512, 512)
    gaussian = smooth_poses(clip, "gaussian", sigma=2.0)
    np.testing.assert_allclose(gaussian.xy[6:-6], clip.xy[6:-6], atol=1e-3)  # no lag inside
    slow = smooth_poses(clip, "one_euro", min_cutoff=0.3, beta=0.0)
    fast = smooth_poses(clip, "one_euro", min_cutoff=0.3, beta=0.5)
    lag_slow = np.abs(slow.xy[-1, :, 0] - clip.xy[-1, :, 0]).mean()
    lag_fast = np.abs(fast.xy[-1, :, 0] - clip.xy[-1, :, 0]).mean()
    assert lag_fast < 0.2 * lag_slow  # the speed term removes the lag
    with pytest.raises(ValueError, match="smoothing method"):
        smooth_poses(clip, "kalman")


def test_one_euro_restarts_after_a_gap():
    points = np.repeat(example_pose("openpose18", 256, 256)[None], 10, axis=0)
    points[5:, 2, 0] += 50.0  # the shoulder jumps while hidden
    points[4, 2, 2] = 0.0
    clip = PoseSequence(points, "openpose18", 256, 256)
    smoothed = smooth_poses(clip, "one_euro", min_cutoff=0.1)
    np.testing.assert_allclose(smoothed.xy[5, 2], points[5, 2, :2])


def test_stride_and_resample(rng):
    clip, _ = _static_clip(rng, num_frames=31)
    np.testing.assert_array_equal(stride_frames(clip, 4, 1).points, clip.points[1::4])
    with pytest.raises(ValueError):
        stride_frames(clip, 0)
    half = resample_fps(clip, 30, 15)
    assert half.num_frames == 16
    np.testing.assert_array_equal(half.points, clip.points[::2])

    points = clip.points.copy()
    points[..., 0] = np.arange(31)[:, None] * 2.0 + 10  # linear in time
    points[..., 2] = 1.0
    points[7, 3, 2] = 0.0  # hidden in one frame
    linear = clip.replace(points=points)
    triple = resample_fps(linear, 10, 30)
    assert triple.num_frames == 91
    expected_x = np.arange(91) / 3 * 2.0 + 10
    other_points = [k for k in range(18) if k != 3]
    np.testing.assert_allclose(triple.xy[:, other_points, 0], expected_x[:, None]
                               * np.ones(17), rtol=1e-6)
    # Between frames 6 and 8 the hidden point takes the nearest frame's values.
    np.testing.assert_array_equal(triple.points[22, 3], points[7, 3])  # t = 7.33 -> 7
    np.testing.assert_array_equal(triple.points[20, 3], points[7, 3])  # t = 6.67 -> 7
    np.testing.assert_array_equal(triple.points[19, 3], points[6, 3])  # t = 6.33 -> 6
    nearest = resample_fps(linear, 10, 30, interpolate=False)
    np.testing.assert_array_equal(nearest.points[4], points[1])  # t = 1.33 -> 1


def test_crop_around_person(rng):
    clip, _ = _static_clip(rng, num_frames=5, size=(300, 400))
    points = clip.points.copy()
    points[2, 0] = (5.0, 5.0, 0.1)  # hidden: ignored by the box
    clip = clip.replace(points=points)
    box, cropped = crop_around_person(clip, margin=0.1, square=True)
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
    assert x1 - x0 == y1 - y0  # square
    shown = clip.visible()
    xy = clip.xy[shown]
    assert np.all(xy >= [x0, y0]) and np.all(xy <= [x1 - 1, y1 - 1])
    np.testing.assert_allclose(cropped.xy, clip.xy - [x0, y0], atol=1e-4)
    assert (cropped.height, cropped.width) == (y1 - y0, x1 - x0)
    # The crop of the rendered image is the rendering of the cropped poses.
    image = draw_skeletons(clip.points, "openpose18", 300, 400, stroke_scale=0.5)
    assert np.any(image[:, y0:y1, x0:x1]) and not np.any(image[:, :y0]) \
        and not np.any(image[:, :, :x0])

    loose = person_box(clip, margin=0.0, square=False)
    assert loose[2] - loose[0] < loose[3] - loose[1]  # a standing person: tall box
    huge = person_box(clip, margin=2.0, square=True)
    assert huge == (0, 0, 400, 300)  # clipped to the image
    near_edge = clip.replace(points=clip.points + [150.0, 0.0, 0.0])
    x0, y0, x1, y1 = person_box(near_edge, margin=0.1, square=True)
    assert x1 <= 400 and x1 - x0 == y1 - y0  # shifted inside, still square
    with pytest.raises(ValueError, match="no visible keypoint"):
        person_box(clip.replace(points=clip.points * [1, 1, 0]))


def test_resize_maps_pixel_centres():
    points = np.zeros((1, 18, 3), np.float32)
    points[0, :3] = [(-0.5, -0.5, 1), (99.5, 49.5, 1), (49.5, 24.5, 1)]  # edges and centre
    seq = PoseSequence(points, "openpose18", 50, 100)
    resized = resize_poses(seq, 100, 400)
    np.testing.assert_allclose(resized.xy[0, :3], [(-0.5, -0.5), (399.5, 99.5),
                                                   (199.5, 49.5)])


@pytest.mark.parametrize("layout", ["openpose18", "dwpose134"])
def test_flip_matches_mirroring_the_image(rng, layout):
    clip, _ = _static_clip(rng, num_frames=3, layout=layout, size=(128, 96), jitter=4.0)
    flipped = flip_horizontal(clip)
    np.testing.assert_allclose(flip_horizontal(flipped).points, clip.points, atol=1e-4)
    names = clip.layout_spec.keypoint_names
    r_wrist, l_wrist = names.index("r_wrist"), names.index("l_wrist")
    np.testing.assert_allclose(flipped.xy[:, l_wrist, 0], 95 - clip.xy[:, r_wrist, 0],
                               rtol=1e-6)
    # Same painted pixels as the mirrored image (colours follow the new left/right labels).
    painted = np.any(draw_skeletons(clip.points, layout, 128, 96) > 0, axis=-1)
    painted_flipped = np.any(draw_skeletons(flipped.points, layout, 128, 96) > 0, axis=-1)
    assert np.mean(painted[:, :, ::-1] != painted_flipped) < 2e-3
    np.testing.assert_array_equal(flip_keypoints(clip.points, layout, 96), flipped.points)
