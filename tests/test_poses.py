"""Layouts, the pose container, conversions and the renderer (golden images included).

Regenerate the golden PNGs with:
    CONSIST_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_poses.py -k golden
and look at them before committing.
"""
import colorsys
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consist_jax.poses import (
    DWPOSE_134,
    OPENPOSE_18,
    PoseSequence,
    convert_layout,
    draw_skeletons,
    example_pose,
    get_layout,
    to_layout_points,
)
from consist_jax.poses import layouts as L
from consist_jax.poses import render as R
from consist_jax.poses.render import render

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("CONSIST_UPDATE_GOLDEN") == "1"


# --- layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [OPENPOSE_18, DWPOSE_134])
def test_layout_tables_are_consistent(layout):
    count = layout.num_keypoints
    assert count == {"openpose18": 18, "dwpose134": 134}[layout.name]
    assert len(set(layout.keypoint_names)) == count
    assert layout.body_limbs.shape == (17, 2) and layout.body_limb_colors.shape == (17, 3)
    assert layout.joint_colors.shape == (18, 3)
    perm = layout.flip_permutation
    assert sorted(perm) == list(range(count))
    np.testing.assert_array_equal(perm[perm], np.arange(count))  # an involution
    # The groups tile the points.
    bounds = sorted(layout.groups.values())
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    # Every point reaches the neck through the kinematic tree.
    for point in range(count):
        seen = 0
        while layout.parents[point] >= 0:
            point = layout.parents[point]
            seen += 1
            assert seen < count
        assert point == L.NECK
    with pytest.raises(ValueError):
        layout.flip_permutation[0] = 3  # read-only


@pytest.mark.parametrize("layout", [OPENPOSE_18, DWPOSE_134])
def test_flip_permutation_swaps_left_and_right_names(layout):
    names = layout.keypoint_names
    for point, mirror in enumerate(layout.flip_permutation):
        name = names[point]
        if name.startswith(("l_", "r_")):
            other = ("r_" if name[0] == "l" else "l_") + name[2:]
            assert names[mirror] == other, (name, names[mirror])
        elif not name.startswith("face_"):
            assert mirror == point, name


def test_drawn_limbs_are_the_body_tree_and_colours_run_through_the_hues():
    limbs = {tuple(sorted(limb)) for limb in OPENPOSE_18.body_limbs.tolist()}
    tree = {tuple(sorted((int(p), k))) for k, p in enumerate(OPENPOSE_18.parents) if p >= 0}
    assert limbs == tree
    assert tuple(OPENPOSE_18.body_limbs[0]) == (1, 2)  # neck -> right shoulder, in red
    hues = [colorsys.rgb_to_hsv(*(np.array(c) / 255))[0] for c in L.OPENPOSE_COLORS]
    assert np.all(np.diff(hues) > 0)  # red -> orange -> ... -> magenta
    hand_hues = [colorsys.rgb_to_hsv(*(np.array(c) / 255))[0] for c in L.HAND_EDGE_COLORS]
    np.testing.assert_allclose(hand_hues, np.arange(20) / 20, atol=0.004)


def test_get_layout_names_and_aliases():
    assert get_layout("OpenPose") is OPENPOSE_18 and get_layout("dwpose") is DWPOSE_134
    assert get_layout(DWPOSE_134) is DWPOSE_134
    with pytest.raises(ValueError, match="unknown pose layout"):
        get_layout("body_25")


def test_example_pose_is_left_right_symmetric():
    """The hand-written pose is its own mirror image, which checks the face's mirror
    pairs (and the rest of the flip permutation) geometrically."""
    from consist_jax.poses import flip_keypoints

    for layout in ("openpose18", "dwpose134"):
        pose = example_pose(layout, 128, 96)
        np.testing.assert_allclose(flip_keypoints(pose, layout, 96), pose, atol=1e-3)


# --- PoseSequence ----------------------------------------------------------------------------
def test_pose_sequence_validates_and_is_immutable(rng):
    points = rng.uniform(0, 60, (5, 18, 3)).astype(np.float32)
    seq = PoseSequence(points, "openpose", 64, 48, source="clip.json")
    assert seq.layout == "openpose18" and len(seq) == 5 and seq.xy.shape == (5, 18, 2)
    points[0, 0, 0] = -1.0  # the sequence holds its own copy
    assert seq.points[0, 0, 0] != -1.0
    with pytest.raises(ValueError):
        seq.points[0, 0, 0] = 1.0
    assert seq.frames(2).points.shape == (1, 18, 3)
    assert seq.frames(slice(1, 4)).num_frames == 3

    bad = seq.points.copy()
    bad[3, 7, 1] = np.nan
    with pytest.raises(ValueError, match=r"frame 3, point 7 \(l_wrist\).*clip\.json"):
        PoseSequence(bad, "openpose18", 64, 48, source="clip.json")
    with pytest.raises(ValueError, match="empty"):
        PoseSequence(np.zeros((0, 18, 3)), "openpose18", 64, 48)
    with pytest.raises(ValueError, match="134 points, got 18"):
        PoseSequence(seq.points, "dwpose134", 64, 48)
    with pytest.raises(ValueError, match="positive"):
        PoseSequence(seq.points, "openpose18", 0, 48)


def test_format_conversions(rng):
    coco = rng.uniform(0, 100, (4, 17, 3)).astype(np.float32)
    op18, layout = to_layout_points(coco)
    assert layout == "openpose18"
    np.testing.assert_allclose(op18[:, 1, :2], coco[:, 5:7, :2].mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(op18[:, 1, 2], coco[:, 5:7, 2].min(axis=1))
    np.testing.assert_array_equal(op18[:, 2], coco[:, 6])  # r_shoulder <- COCO 6
    np.testing.assert_array_equal(op18[:, 17], coco[:, 3])  # l_ear <- COCO 3

    body25 = rng.uniform(0, 100, (2, 25, 3)).astype(np.float32)
    op18, _ = to_layout_points(body25)
    np.testing.assert_array_equal(op18[:, 8], body25[:, 9])  # r_hip skips mid-hip
    np.testing.assert_array_equal(op18[:, :8], body25[:, :8])

    wholebody = rng.uniform(0, 100, (3, 133, 3)).astype(np.float32)
    dw, layout = to_layout_points(wholebody)
    assert layout == "dwpose134" and dw.shape == (3, 134, 3)
    np.testing.assert_array_equal(dw[:, 18:], wholebody[:, 17:])
    np.testing.assert_array_equal(dw[:, 0], wholebody[:, 0])
    with pytest.raises(ValueError, match="K in"):
        to_layout_points(np.zeros((2, 20, 3)))

    seq = PoseSequence(dw, "dwpose134", 100, 100)
    body = convert_layout(seq, "openpose18")
    back = convert_layout(body, "dwpose134")
    np.testing.assert_array_equal(back.points[:, :18], dw[:, :18])
    assert np.all(back.points[:, 18:] == 0)


# --- renderer ------------------------------------------------------------------------------
def _reference_draw(points, layout, height, width, threshold=0.3, stroke_scale=1.0):
    """A slow, obviously-correct renderer: every shape on the full grid, in order."""
    layout = get_layout(layout)
    canvas = np.zeros((len(points), height, width, 3), np.uint8)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)

    def size(base):
        return R.stroke_pixels(base, height, width, stroke_scale)

    def disc(p, radius):
        return (xs - p[0]) ** 2 + (ys - p[1]) ** 2 <= radius ** 2

    def segment(p, q, half):
        d = q - p
        t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
        return (xs - p[0] - t * d[0]) ** 2 + (ys - p[1] - t * d[1]) ** 2 <= half ** 2

    def ellipse(p, q, half):
        centre, d = (p + q) / 2, q - p
        length = np.hypot(*d)
        u = d / length if length > 0 else np.array([1.0, 0.0])
        a = max(length / 2, 0.5)
        along = ((xs - centre[0]) * u[0] + (ys - centre[1]) * u[1]) / a
        across = ((ys - centre[1]) * u[0] - (xs - centre[0]) * u[1]) / half
        return along ** 2 + across ** 2 <= 1

    for t, frame in enumerate(np.asarray(points, np.float64)):
        shown = frame[:, 2] >= threshold
        xy = frame[:, :2]
        for (a, b), color in zip(layout.body_limbs, layout.body_limb_colors):
            if shown[a] and shown[b]:
                canvas[t][ellipse(xy[a], xy[b], size(4))] = (color * 0.6).astype(np.uint8)
        for k in range(18):
            if shown[k]:
                canvas[t][disc(xy[k], size(4))] = layout.joint_colors[k]
        if layout.name == "dwpose134":
            for start in (92, 113):
                for (a, b), color in zip(layout.hand_edges, layout.hand_edge_colors):
                    if shown[start + a] and shown[start + b]:
                        canvas[t][segment(xy[start + a], xy[start + b], size(1))] = color
                for k in range(start, start + 21):
                    if shown[k]:
                        canvas[t][disc(xy[k], size(4))] = (0, 0, 255)
            for k in range(24, 92):
                if shown[k]:
                    canvas[t][disc(xy[k], size(3))] = 255
    return canvas


def _jittered_poses(rng, layout, num_frames, height, width, jitter=3.0):
    base = example_pose(layout, height, width)
    points = np.repeat(base[None], num_frames, axis=0)
    points[..., :2] += rng.normal(0, jitter, points[..., :2].shape)
    points[..., 2] = rng.uniform(0, 1, points.shape[:2])  # some hidden (< 0.3)
    return points


@pytest.mark.parametrize("layout,height,width,scale", [
    ("openpose18", 64, 64, 1.0), ("openpose18", 96, 160, 2.5), ("dwpose134", 128, 96, 1.0),
    ("dwpose134", 300, 200, 1.7)])
def test_draw_matches_slow_reference(rng, layout, height, width, scale):
    points = _jittered_poses(rng, layout, 3, height, width)
    points[1, 4, :2] = (-20, height + 30)  # off the canvas: clipped, no crash
    fast = draw_skeletons(points, layout, height, width, stroke_scale=scale)
    slow = _reference_draw(points, layout, height, width, stroke_scale=scale)
    assert fast.shape == (3, height, width, 3) and fast.dtype == np.uint8
    differs = np.any(fast != slow, axis=-1)
    # Identical up to float rounding at a few shape boundaries.
    assert differs.mean() < 2e-3, differs.sum()


def test_colours_threshold_and_hidden_limbs():
    pose = example_pose("openpose18", 256, 256)
    image = draw_skeletons(pose, "openpose18", 256, 256)  # a single (K, 3) frame
    assert image.shape == (256, 256, 3)
    for k in (2, 4, 10, 13):  # joints: full colour at the centre
        x, y = np.round(pose[k, :2]).astype(int)
        np.testing.assert_array_equal(image[y, x], L.OPENPOSE_COLORS[k])
    for i in (2, 3, 7, 11):  # limbs: 0.6 of the colour at the midpoint
        a, b = L.BODY_LIMBS[i]
        x, y = np.round((pose[a, :2] + pose[b, :2]) / 2).astype(int)
        np.testing.assert_array_equal(image[y, x], (np.array(L.OPENPOSE_COLORS[i]) * 0.6)
                                      .astype(np.uint8))
    hidden = pose.copy()
    hidden[3, 2] = 0.29  # r_elbow below the default threshold
    image = draw_skeletons(hidden, "openpose18", 256, 256)
    for a in (2, 4):  # neither limb touching the elbow is drawn
        x, y = np.round((pose[a, :2] + pose[3, :2]) / 2).astype(int)
        np.testing.assert_array_equal(image[y, x], 0)
    x, y = np.round(pose[3, :2]).astype(int)
    np.testing.assert_array_equal(image[y, x], 0)
    shown = draw_skeletons(hidden, "openpose18", 256, 256, confidence_threshold=0.2)
    np.testing.assert_array_equal(shown[y, x], L.OPENPOSE_COLORS[3])


def test_stroke_scales_with_resolution_and_parameter():
    def painted_fraction(height, width, scale):
        pose = example_pose("openpose18", height, width)
        return np.any(draw_skeletons(pose, "openpose18", height, width,
                                     stroke_scale=scale) > 0, axis=-1).mean()

    # The same figure covers about the same fraction of a larger canvas...
    assert painted_fraction(256, 256, 1.0) == pytest.approx(painted_fraction(512, 512, 1.0),
                                                            rel=0.15)
    # ...and thicker strokes cover more.
    assert painted_fraction(256, 256, 2.0) > 1.6 * painted_fraction(256, 256, 1.0)


def test_later_shapes_are_drawn_over_earlier_ones():
    pose = example_pose("openpose18", 128, 128)
    pose[14, :2] = (10.0, 120.0)  # r_eye to an empty corner...
    pose[15, :2] = (10.5, 120.5)  # ...and l_eye onto it: the later joint (15) wins
    pose[[16, 17], 2] = 0.0  # no ears (their limbs would reach the corner too)
    image = draw_skeletons(pose, "openpose18", 128, 128, stroke_scale=4)
    np.testing.assert_array_equal(image[120, 10], L.OPENPOSE_COLORS[15])
    pose[[14, 15]] = pose[[15, 14]]
    image = draw_skeletons(pose, "openpose18", 128, 128, stroke_scale=4)
    np.testing.assert_array_equal(image[120, 10], L.OPENPOSE_COLORS[15])


def test_dwpose_hands_and_face_are_drawn():
    pose = example_pose("dwpose134", 512, 512)
    image = draw_skeletons(pose, "dwpose134", 512, 512)
    x, y = np.round(pose[24 + 8, :2]).astype(int)  # the chin: a white face dot
    np.testing.assert_array_equal(image[y, x], 255)
    x, y = np.round(pose[92 + 8, :2]).astype(int)  # a fingertip: a blue hand joint
    np.testing.assert_array_equal(image[y, x], (0, 0, 255))
    middle = (pose[92 + 0, :2] + pose[92 + 9, :2]) / 2  # hand bone 8, wrist -> middle_mcp
    x, y = np.round(middle).astype(int)
    np.testing.assert_array_equal(image[y, x], L.HAND_EDGE_COLORS[8])
    feet = draw_skeletons(pose, "dwpose134", 512, 512, draw_feet=True)
    assert np.any(feet != image)  # feet are opt-in (DWPose does not draw them)
    body_only = draw_skeletons(pose[:18], "openpose18", 512, 512)
    assert np.any(body_only != image)
    with pytest.raises(ValueError, match="134"):
        draw_skeletons(pose[:18], "dwpose134", 512, 512)


def test_non_finite_points_are_not_drawn():
    """Data pipelines mark missing frames with NaN rows: they render black."""
    points = np.repeat(example_pose("openpose18", 64, 64)[None], 3, axis=0)
    points[1] = np.nan
    points[2, 3, :2] = np.inf
    images = draw_skeletons(points, "openpose18", 64, 64)
    assert not images[1].any()
    expected = points[2].copy()
    expected[3, 2] = 0.0
    np.testing.assert_array_equal(images[2], draw_skeletons(expected, "openpose18", 64, 64))


def test_render_uses_the_sequence_size(rng):
    points = _jittered_poses(rng, "openpose18", 4, 80, 60)
    seq = PoseSequence(points, "openpose18", 80, 60)
    np.testing.assert_array_equal(render(seq), draw_skeletons(points, "openpose18", 80, 60))


# --- golden images -------------------------------------------------------------------------
GOLDEN_CASES = [("openpose18", 64, 64), ("openpose18", 128, 96), ("dwpose134", 64, 64),
                ("dwpose134", 128, 96), ("dwpose134", 256, 192)]


@pytest.mark.parametrize("layout,height,width", GOLDEN_CASES)
def test_golden_images(layout, height, width):
    image = draw_skeletons(example_pose(layout, height, width), layout, height, width)
    path = GOLDEN_DIR / f"poses_{layout}_{height}x{width}.png"
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)  # regenerated; the comparison below then holds
    assert path.exists(), f"{path} missing: run with CONSIST_UPDATE_GOLDEN=1"
    golden = np.asarray(Image.open(path).convert("RGB"))
    assert golden.shape == image.shape
    differs = np.any(np.abs(golden.astype(int) - image) > 2, axis=-1)
    assert differs.mean() <= 0.002, f"{differs.sum()} pixels differ from {path.name}"


def test_points_far_off_the_canvas_draw_nothing_without_overflow(rng):
    """A finite but absurd coordinate (a damaged record: 1e30) is not drawn: the frame draws
    the rest of the person, with no overflow or invalid-value warning."""
    import warnings

    from consist_jax.poses.keypoints import example_pose
    from consist_jax.poses.render import draw_skeletons

    points = example_pose("openpose18", 32, 32)[None].copy()
    expected = draw_skeletons(points, "openpose18", 32, 32)
    far = points.copy()
    far[0, rng.integers(0, 18), :2] = rng.choice([-1.0, 1.0]) * 1e30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = draw_skeletons(far, "openpose18", 32, 32)
    assert image.shape == expected.shape and image.any()
