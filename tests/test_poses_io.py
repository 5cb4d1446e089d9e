"""Pose readers: OpenPose JSON, DWPose dumps, plain arrays, a corpus of real-format files;
bad input errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from consist_jax.poses import PoseSequence, example_pose, load_poses, save_poses
from consist_jax.poses.render import JOINT_RADIUS, render, stroke_pixels


def _openpose_person(body, face=None, left=None, right=None):
    return {
        "person_id": [-1],
        "pose_keypoints_2d": np.asarray(body, float).ravel().tolist(),
        "face_keypoints_2d": [] if face is None else np.asarray(face, float).ravel().tolist(),
        "hand_left_keypoints_2d": [] if left is None else np.asarray(left, float).ravel().tolist(),
        "hand_right_keypoints_2d": [] if right is None else
        np.asarray(right, float).ravel().tolist(),
    }


def _write_frames(folder, frames, **extra):
    folder.mkdir(exist_ok=True)
    for t, people in enumerate(frames):
        name = folder / f"clip_{t}_keypoints.json"  # unpadded: needs natural sorting
        name.write_text(json.dumps({"version": 1.3, "people": people, **extra}))
    return folder


def _random_points(rng, count, height=120, width=90):
    points = np.stack([rng.uniform(2, width - 2, count), rng.uniform(2, height - 2, count),
                       rng.uniform(0.05, 1.0, count)], axis=1)
    return points.astype(np.float32)


def test_openpose_folder_coco18_natural_order(rng, tmp_path):
    frames = [_random_points(rng, 18) for _ in range(12)]
    folder = _write_frames(tmp_path / "json", [[_openpose_person(f)] for f in frames])
    seq = load_poses(folder, height=120, width=90)
    assert seq.layout == "openpose18" and seq.num_frames == 12
    np.testing.assert_allclose(seq.points, np.stack(frames), rtol=1e-6)  # 2 before 10
    single = load_poses(folder / "clip_3_keypoints.json", height=120, width=90)
    np.testing.assert_allclose(single.points[0], frames[3], rtol=1e-6)


def test_openpose_body25_with_face_and_hands(rng, tmp_path):
    body25 = _random_points(rng, 25)
    face70 = _random_points(rng, 70)
    left, right = _random_points(rng, 21), _random_points(rng, 21)
    path = tmp_path / "frame.json"
    path.write_text(json.dumps({"people": [_openpose_person(body25, face70, left, right)],
                                "canvas_height": 120, "canvas_width": 90}))
    seq = load_poses(path)
    assert seq.layout == "dwpose134" and (seq.height, seq.width) == (120, 90)
    points = seq.points[0]
    np.testing.assert_allclose(points[:8], body25[:8], rtol=1e-6)
    np.testing.assert_allclose(points[8:18], body25[9:19], rtol=1e-6)  # mid-hip dropped
    np.testing.assert_allclose(points[18:24], body25[19:25], rtol=1e-6)  # feet kept
    np.testing.assert_allclose(points[24:92], face70[:68], rtol=1e-6)  # pupils dropped
    np.testing.assert_allclose(points[92:113], left, rtol=1e-6)
    np.testing.assert_allclose(points[113:], right, rtol=1e-6)

    body_only = tmp_path / "body25.json"
    body_only.write_text(json.dumps({"people": [_openpose_person(body25)]}))
    seq = load_poses(body_only, height=120, width=90)
    assert seq.layout == "openpose18"
    np.testing.assert_allclose(seq.points[0, 8], body25[9], rtol=1e-6)


def test_openpose_frame_without_people_is_all_missing(rng, tmp_path):
    body = _random_points(rng, 18)
    folder = _write_frames(tmp_path / "json", [[_openpose_person(body)], [],
                                               [_openpose_person(body)]])
    seq = load_poses(folder, height=120, width=90)
    assert np.all(seq.points[1] == 0) and np.all(seq.points[0, :, 2] > 0)
    empty = _write_frames(tmp_path / "nobody", [[], []])
    with pytest.raises(ValueError, match="no frame has person 0"):
        load_poses(empty, height=120, width=90)


@pytest.mark.parametrize("case", ["mixed_body", "mixed_face", "wrong_count", "nan", "size"])
def test_openpose_bad_input_names_file_and_frame(rng, tmp_path, case):
    body = _random_points(rng, 18)
    frames = [[_openpose_person(body)] for _ in range(3)]
    match = None
    if case == "mixed_body":
        frames[2] = [_openpose_person(_random_points(rng, 25))]
        match = r"clip_2_keypoints\.json: frame 2: mixed layouts"
    elif case == "mixed_face":
        frames[1] = [_openpose_person(body, face=_random_points(rng, 68))]
        match = r"clip_1_keypoints\.json: frame 1: mixed layouts"
    elif case == "wrong_count":
        frames[1] = [_openpose_person(_random_points(rng, 20))]
        match = r"clip_1_keypoints\.json: frame 1: pose_keypoints_2d has 60 numbers"
    elif case == "nan":
        bad = body.copy()
        bad[4, 0] = np.nan
        frames[2] = [_openpose_person(bad)]
        match = r"clip_2_keypoints\.json: NaN .* frame 2"
    folder = _write_frames(tmp_path / "json", frames)
    if case == "size":
        with pytest.raises(ValueError, match="pass height= and width="):
            load_poses(folder)
        return
    with pytest.raises(ValueError, match=match):
        load_poses(folder, height=120, width=90)


def test_size_from_file_must_agree_with_arguments(rng, tmp_path):
    path = tmp_path / "frame.json"
    path.write_text(json.dumps({"people": [_openpose_person(_random_points(rng, 18))],
                                "canvas_height": 120, "canvas_width": 90}))
    assert load_poses(path, height=120, width=90).height == 120
    with pytest.raises(ValueError, match="120x90 but"):
        load_poses(path, height=64, width=64)


def _dwpose_dict(rng, num_people, hide=()):
    """A DWPose draw_pose-style dict (normalized coordinates) and person 0's points."""
    candidate = rng.uniform(0.05, 0.95, (num_people * 18, 2))
    subset = np.arange(num_people * 18, dtype=float).reshape(num_people, 18)
    for k in hide:
        subset[0, k] = -1
    faces = rng.uniform(0.05, 0.95, (num_people, 68, 2))
    faces[0, 5] = -1  # DWPose's mark for a hidden point
    hands = rng.uniform(0.05, 0.95, (2 * num_people, 21, 2))
    hands_score = rng.uniform(0.4, 1.0, (2 * num_people, 21))
    pose = {"bodies": {"candidate": candidate.tolist(), "subset": subset.tolist()},
            "faces": faces.tolist(), "hands": hands.tolist(),
            "hands_score": hands_score.tolist()}
    return pose, candidate, faces, hands, hands_score


def test_dwpose_json_pose_dicts(rng, tmp_path):
    frames, expected = [], []
    for _ in range(3):
        pose, candidate, faces, hands, hands_score = _dwpose_dict(rng, 2, hide=(3,))
        frames.append(pose)
        expected.append((candidate, faces, hands, hands_score))
    path = tmp_path / "dwpose.json"
    path.write_text(json.dumps({"frames": frames, "height": 100, "width": 80}))
    seq = load_poses(path)
    assert seq.layout == "dwpose134" and seq.num_frames == 3
    scale = np.array([80, 100])
    for t, (candidate, faces, hands, hands_score) in enumerate(expected):
        points = seq.points[t]
        np.testing.assert_allclose(points[:18, :2][[0, 1, 2]], candidate[:3] * scale,
                                   rtol=1e-5)
        assert points[3, 2] == 0 and np.all(np.delete(points[:18, 2], 3) == 1)
        np.testing.assert_allclose(points[24:92, :2], faces[0] * scale, rtol=1e-5)
        assert points[24 + 5, 2] == 0 and points[24 + 6, 2] == 1
        # Two people: person 0's hands are entries 0 (left) and 2 (right).
        np.testing.assert_allclose(points[92:113, :2], hands[0] * scale, rtol=1e-5)
        np.testing.assert_allclose(points[113:, :2], hands[2] * scale, rtol=1e-5)
        np.testing.assert_allclose(points[113:, 2], hands_score[2], rtol=1e-6)

    folder = tmp_path / "per_frame"
    folder.mkdir()
    for t, frame in enumerate(frames):
        (folder / f"{t:04d}.json").write_text(json.dumps(dict(frame, height=100, width=80)))
    np.testing.assert_array_equal(load_poses(folder).points, seq.points)

    body_only = tmp_path / "body.json"
    pose = {"bodies": frames[0]["bodies"]}
    body_only.write_text(json.dumps([pose, pose]))
    seq = load_poses(body_only, height=100, width=80)
    assert seq.layout == "openpose18" and seq.num_frames == 2

    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([frames[0], pose]))
    with pytest.raises(ValueError, match=r"mixed\.json: frame 1: mixed layouts"):
        load_poses(mixed, height=100, width=80)
    bad_faces = dict(frames[0], faces=np.zeros((2, 70, 2)).tolist())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([frames[0], bad_faces]))
    with pytest.raises(ValueError, match=r"bad\.json: frame 1: 'faces' must be \(n, 68, 2\)"):
        load_poses(bad, height=100, width=80)


def test_dwpose_npz_stacked_arrays_and_raw_wholebody(rng, tmp_path):
    num_frames = 4
    bodies = rng.uniform(10, 150, (num_frames, 18, 2))
    faces = rng.uniform(10, 150, (num_frames, 68, 2))
    hands = rng.uniform(10, 150, (num_frames, 2, 21, 2))
    hands_score = rng.uniform(0, 1, (num_frames, 2, 21))
    path = tmp_path / "stacked.npz"
    np.savez(path, bodies=bodies, faces=faces, hands=hands, hands_score=hands_score,
             height=160, width=160)
    seq = load_poses(path)  # pixel coordinates, detected
    assert seq.layout == "dwpose134"
    np.testing.assert_allclose(seq.points[:, :18, :2], bodies, rtol=1e-5)
    assert np.all(seq.points[:, 18:24, 2] == 0)  # no feet given
    np.testing.assert_allclose(seq.points[:, 92:113, 2], hands_score[:, 0], rtol=1e-6)
    np.testing.assert_allclose(seq.points[:, 113:, :2], hands[:, 1], rtol=1e-5)

    wholebody = rng.uniform(0.05, 0.95, (num_frames, 133, 2))
    scores = rng.uniform(0, 1, (num_frames, 133))
    raw = tmp_path / "raw.npz"
    np.savez(raw, candidate=wholebody, subset=scores)
    seq = load_poses(raw, height=50, width=40, coordinates="normalized")
    assert seq.layout == "dwpose134"
    np.testing.assert_allclose(seq.points[:, 2, :2], wholebody[:, 6] * [40, 50], rtol=1e-5)
    np.testing.assert_allclose(seq.points[:, 1, :2], wholebody[:, 5:7].mean(1) * [40, 50],
                               rtol=1e-5)
    np.testing.assert_allclose(seq.points[:, 18:, :2], wholebody[:, 17:] * [40, 50], rtol=1e-5)

    keypoints = tmp_path / "keypoints.npz"
    np.savez(keypoints, keypoints=bodies, scores=hands_score[:, 0, :18], layout="openpose18",
             height=160, width=160)
    seq = load_poses(keypoints)
    np.testing.assert_allclose(seq.points[..., 2], hands_score[:, 0, :18], rtol=1e-6)
    mislabelled = tmp_path / "mislabelled.npz"
    np.savez(mislabelled, keypoints=bodies, layout="dwpose134", height=160, width=160)
    with pytest.raises(ValueError, match="'layout' says dwpose134"):
        load_poses(mislabelled)


def test_npy_arrays_save_roundtrip_and_no_pickles(rng, tmp_path):
    points = _random_points(rng, 18 * 6).reshape(6, 18, 3)
    path = tmp_path / "poses.npy"
    np.save(path, points)
    seq = load_poses(path, height=120, width=90)
    np.testing.assert_array_equal(seq.points, points)
    assert seq.source == str(path)

    saved = tmp_path / "saved.npz"
    save_poses(saved, seq)
    back = load_poses(saved)
    np.testing.assert_array_equal(back.points, seq.points)
    assert (back.layout, back.height, back.width) == ("openpose18", 120, 90)
    # Pixel coordinates that happen to lie in [0, 1] stay pixels: the file says so.
    tiny = PoseSequence(np.full((1, 18, 3), 0.5), "openpose18", 4, 4)
    save_poses(saved, tiny)
    np.testing.assert_array_equal(load_poses(saved).points, tiny.points)
    np.save(path, tiny.points)  # a bare array in [0, 1] is taken as normalized...
    np.testing.assert_array_equal(load_poses(path, height=4, width=4).points[..., 0], 2.0)
    np.testing.assert_array_equal(  # ...unless the caller says otherwise
        load_poses(path, height=4, width=4, coordinates="pixels").points, tiny.points)

    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled.npy"):
        load_poses(pickled, height=10, width=10)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, points[:, :16])
    with pytest.raises(ValueError, match=r"wrong\.npy.*K in"):
        load_poses(wrong, height=120, width=90)
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 18, 3), np.float32))
    with pytest.raises(ValueError, match=r"empty\.npy.*empty"):
        load_poses(empty, height=120, width=90)
    nan = tmp_path / "nan.npy"
    bad = points.copy()
    bad[4, 2, 2] = np.nan
    np.save(nan, bad)
    with pytest.raises(ValueError, match=r"nan\.npy: NaN .*frame 4"):
        load_poses(nan, height=120, width=90)
    with pytest.raises(ValueError, match="unknown pose file type"):
        load_poses(_touch(tmp_path))
    with pytest.raises(ValueError, match="no .json files"):
        load_poses(_empty_dir(tmp_path))


def _touch(tmp_path):
    path = tmp_path / "poses.txt"
    path.write_text("")
    return path


def _empty_dir(tmp_path):
    path = tmp_path / "empty_folder"
    path.mkdir()
    return path


def test_example_pose_roundtrip_through_openpose_json(tmp_path):
    pose = example_pose("dwpose134", 96, 128)
    person = _openpose_person(pose[:18], pose[24:92], pose[92:113], pose[113:])
    path = tmp_path / "example.json"
    path.write_text(json.dumps({"people": [person], "canvas_height": 96,
                                "canvas_width": 128}))
    seq = load_poses(path)
    np.testing.assert_allclose(seq.points[0, :18], pose[:18], rtol=1e-6)
    np.testing.assert_allclose(seq.points[0, 24:], pose[24:], rtol=1e-6)


# --- a corpus of real-format pose files (tests/data/poses) ---------------------------------
CORPUS = Path(__file__).parent / "data" / "poses"
# file -> (height/width to pass, or None when the file records its canvas; the person's
# keypoint box x0, y0, x1, y1 in pixels, written down when the files were made)
CORPUS_FILES = {
    "openpose_body25_000000000000_keypoints.json": ((720, 1280), (180, 60, 492, 660)),
    "openpose_coco18_000000000000_keypoints.json": ((480, 640), (425, 44, 593, 438)),
    "controlnet_openpose_editor.json": (None, (-2, 126, 290, 651)),
    "dwpose_pose_dict.json": ((768, 576), (150, 90, 472, 678)),
}


@pytest.mark.parametrize("name", sorted(CORPUS_FILES))
def test_corpus_files_render_where_the_person_is(name):
    size, (x0, y0, x1, y1) = CORPUS_FILES[name]
    kwargs = {} if size is None else dict(height=size[0], width=size[1])
    seq = load_poses(CORPUS / name, **kwargs)
    image = render(seq)[0]
    drawn = np.argwhere(image.any(axis=-1))  # (n, 2) rows, columns
    assert len(drawn) > 0, f"{name} rendered empty"
    # Every drawn pixel lies within the person's box, give or take the strokes' width...
    margin = 2 * stroke_pixels(JOINT_RADIUS, seq.height, seq.width, 1.0) + 1
    top, left = drawn.min(axis=0)
    bottom, right = drawn.max(axis=0)
    assert left >= x0 - margin and right <= x1 + margin, (name, left, right)
    assert top >= y0 - margin and bottom <= y1 + margin, (name, top, bottom)
    # ...and the drawing spans most of it (feet and faint hand points are not drawn).
    assert right - left >= 0.8 * (x1 - x0) and bottom - top >= 0.8 * (y1 - y0), name


def test_editor_point_a_hair_outside_stays_normalized(rng, tmp_path):
    """Normalized points with a few a little outside [0, 1] are still normalized."""
    pose = example_pose("openpose18", 96, 64)
    normalized = pose.copy()
    normalized[:, :2] /= [64, 96]
    normalized[rng.integers(18), 0] = -rng.uniform(1e-4, 0.01)
    path = tmp_path / "editor.json"
    path.write_text(json.dumps({"people": [_openpose_person(normalized)],
                                "canvas_width": 64, "canvas_height": 96}))
    seq = load_poses(path)
    inside = np.delete(np.arange(18), np.argmin(normalized[:, 0]))
    np.testing.assert_allclose(seq.points[0, inside, :2], pose[inside, :2], rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("case", ["wrong_size", "one_frame_shifted", "pixels_said_normalized"])
def test_poses_mostly_off_the_canvas_name_file_and_frame(rng, tmp_path, case):
    frames = [_random_points(rng, 18) for _ in range(3)]  # pixels on 120x90
    size = dict(height=120, width=90)
    match = r"clip_0_keypoints\.json: frame 0: \d+ of 18 visible keypoints lie off the 30x20"
    if case == "wrong_size":
        size = dict(height=30, width=20)
        frames[0][:, :2] += [25, 35]  # every point off a 30x20 canvas
    elif case == "one_frame_shifted":
        frames[2][:, 0] += 100  # the whole person right of the 90-pixel-wide canvas
        match = r"clip_2_keypoints\.json: frame 2: 18 of 18 visible keypoints lie off the 120x90"
    folder = _write_frames(tmp_path / "json", [[_openpose_person(f)] for f in frames])
    if case == "pixels_said_normalized":
        match = r"clip_0_keypoints\.json: frame 0: .* as normalized coordinates"
        size["coordinates"] = "normalized"
    with pytest.raises(ValueError, match=match):
        load_poses(folder, **size)


def test_default_size_is_used_only_without_a_recorded_one(rng, tmp_path, caplog):
    body = _random_points(rng, 18)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"people": [_openpose_person(body)]}))
    with caplog.at_level("WARNING"):
        seq = load_poses(bare, default_size=(120, 90))
    assert (seq.height, seq.width) == (120, 90)
    assert "bare.json records no image size; assuming 120x90" in caplog.text
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"people": [_openpose_person(body)], "canvas_height": 130,
                                    "canvas_width": 100}))
    assert load_poses(recorded, default_size=(120, 90)).height == 130


def test_pickled_npz_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, keypoints=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz: 'keypoints' is not a plain numeric"):
        load_poses(path, height=10, width=10)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"broken\.npz: not a readable \.npz"):
        load_poses(broken, height=10, width=10)


def test_openpose_1_0_keys_without_2d(tmp_path):
    name = "openpose_coco18_000000000000_keypoints.json"
    data = json.loads((CORPUS / name).read_text())
    person = data["people"][0]
    old = {"pose_keypoints": person["pose_keypoints_2d"], "face_keypoints": [],
           "hand_left_keypoints": [], "hand_right_keypoints": []}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1.0, "people": [old]}))
    np.testing.assert_array_equal(load_poses(path, height=480, width=640).points,
                                  load_poses(CORPUS / name, height=480, width=640).points)
