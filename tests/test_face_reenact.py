"""Face reenactment: the face68 pose layout and its rendering, synthetic faces whose
landmarks match their pixels, a face dataset through the builders and the pipeline, and
one train.py step of the face config."""
import os
import subprocess

import numpy as np
import pytest

from PIL import Image

from consist_jax.data import build_own, pipeline, synthetic
from consist_jax.data.source import VideoRecordSource
from consist_jax.data.tfds import local_videos
from consist_jax.poses import (
    DWPOSE_134,
    align_poses,
    convert_layout,
    draw_skeletons,
    example_pose,
    load_poses,
    save_poses,
)
from consist_jax.poses import layouts as L
from consist_jax.poses.keypoints import PoseSequence
from tests.runs import REPO, run_env, script_cmd

FACE = L.FACE_68
SIZE, FRAMES = 64, 16  # large enough that an eye is several pixels wide


def random_face(rng, size):
    """(68, 3) the example face under a random rotation, scale and shift, inside the canvas."""
    points = example_pose("face68", size, size)
    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.7, 1.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = (size - 1) / 2
    shift = rng.uniform(-0.05, 0.05, 2) * size
    points[:, :2] = (points[:, :2] - centre) @ rotation.T * scale + centre + shift
    return points


# ----------------------------------------------------------------------------- the layout

def test_face_layout_tables():
    assert L.get_layout("face") is FACE and L.get_layout("dlib68") is FACE
    assert FACE.num_keypoints == 68 and dict(FACE.groups) == {"face": (0, 68)}
    perm = FACE.flip_permutation
    np.testing.assert_array_equal(perm[perm], np.arange(68))  # an involution
    # The same 68 points, in the same order, as DWPose's face: the mirror pairs agree.
    face = DWPOSE_134.group_slice("face")
    np.testing.assert_array_equal(DWPOSE_134.flip_permutation[face] - face.start, perm)
    assert set(FACE.parents[FACE.parents >= 0]) == {L.FACE_NOSE_TIP}
    # Every landmark is on a drawn polyline; a flip maps each part's segments onto its
    # mirror part's (so a flipped face is drawn in the right colours).
    assert set(FACE.face_edges.ravel()) == set(range(68))
    edges = {tuple(sorted(e)) for e in FACE.face_edges.tolist()}
    assert {tuple(sorted(perm[list(e)])) for e in edges} == edges
    assert FACE.face_edge_colors.shape == (len(FACE.face_edges), 3)


def test_face_poses_convert_from_and_to_dwpose(rng):
    points = np.concatenate([rng.uniform(0, 63, (3, 134, 2)), rng.uniform(0.5, 1, (3, 134, 1))],
                            -1).astype(np.float32)
    whole = PoseSequence(points, "dwpose134", 64, 64)
    face = convert_layout(whole, "face68")
    assert face.layout == "face68"
    np.testing.assert_array_equal(face.points, points[:, L.FACE_START:L.LEFT_HAND_START])
    back = convert_layout(face, "dwpose134")
    np.testing.assert_array_equal(back.points[:, L.FACE_START:L.LEFT_HAND_START], face.points)
    assert not back.points[:, :L.FACE_START, 2].any() and not back.points[:, L.LEFT_HAND_START:, 2].any()
    with pytest.raises(ValueError, match="share no keypoint"):
        convert_layout(face, "openpose18")


def test_face_pose_files_read_back_and_drive_sampling(rng, tmp_path):
    """A 68-point pose file is a face68 sequence; sample.py's reader renders it as faces."""
    from consist_jax.sampling.io import read_poses

    points = np.stack([random_face(rng, 64) for _ in range(3)])
    save_poses(tmp_path / "face.npz", PoseSequence(points, "face68", 64, 64))
    np.save(tmp_path / "face.npy", points)
    for name in ("face.npz", "face.npy"):
        loaded = load_poses(tmp_path / name, height=64, width=64)
        assert loaded.layout == "face68"
        np.testing.assert_array_equal(loaded.points, points)
    images, poses = read_poses(str(tmp_path / "face.npz"), (64, 64))
    assert poses.layout == "face68"
    np.testing.assert_array_equal(images, draw_skeletons(points, "face68", 64, 64))


def test_global_alignment_puts_the_driving_face_on_the_reference_face(rng):
    """A driving face that is the reference face shifted and scaled comes back onto it
    (float32 rounding of pixel coordinates, ~1e-5 px at 64 px); per_limb is refused."""
    reference = random_face(rng, 64)
    driving = np.repeat(reference[None], 3, axis=0)
    scale, shift = rng.uniform(0.5, 2.0), rng.uniform(-10, 10, 2)
    driving[..., :2] = driving[..., :2] * scale + shift
    poses = PoseSequence(driving, "face68", 64, 64)
    aligned = align_poses(poses, PoseSequence(reference[None], "face68", 64, 64), mode="global")
    # A few float32 roundings of the largest coordinate, magnified by 1 / scale.
    bound = 16 * np.finfo(np.float32).eps * np.abs(driving[..., :2]).max() / min(scale, 1.0)
    np.testing.assert_allclose(aligned.points[..., :2],
                               np.broadcast_to(reference[:, :2], driving[..., :2].shape),
                               rtol=0, atol=bound)
    with pytest.raises(ValueError, match="'per_limb' needs a body"):
        align_poses(poses, PoseSequence(reference[None], "face68", 64, 64), mode="per_limb")


# ----------------------------------------------------------------------------- rendering

def test_face_parts_are_drawn_where_their_landmarks_are(rng):
    size = 128
    points = random_face(rng, size)
    image = draw_skeletons(points, "face68", size, size)
    pixel = np.rint(points[:, :2]).astype(int)
    # Dots are drawn in point order: a landmark's pixel shows its part's colour unless a
    # later landmark rounds to the same pixel.
    for k, (x, y) in enumerate(pixel):
        if not any((pixel[j] == (x, y)).all() for j in range(k + 1, 68)):
            np.testing.assert_array_equal(image[y, x], FACE.face_point_colors[k],
                                          err_msg=f"point {k}")
    # Each part drawn alone: halfway along each of its segments lies the part's line, in
    # its colour dimmed (or one of its dots, where a short segment's ends round there).
    for part, indices, _ in L.FACE_PARTS:
        alone = points.copy()
        alone[:, 2] = 0.0
        alone[list(indices), 2] = 1.0
        part_image = draw_skeletons(alone, "face68", size, size)
        color = np.array(L.FACE_PART_COLORS[part])
        # (the nose's tip, shared by both nose parts, keeps the bridge's dot colour)
        allowed = {tuple((color * L.LIMB_INTENSITY).astype(np.uint8))}
        allowed |= {tuple(FACE.face_point_colors[k]) for k in indices}
        for a, b in FACE.face_edges:
            if a in indices and b in indices:
                x, y = np.rint((points[a, :2] + points[b, :2]) / 2).astype(int)
                assert tuple(part_image[y, x]) in allowed, (part, a, b)
        drawn = {tuple(c) for c in part_image.reshape(-1, 3)} - {(0, 0, 0)}
        assert drawn <= allowed, part
    # Nothing but the face: no body is drawn, the canvas away from the face is black.
    low = np.floor(points[:, :2].min(0) - 2).astype(int)
    high = np.ceil(points[:, :2].max(0) + 2).astype(int)
    outside = np.ones((size, size), bool)
    outside[max(low[1], 0):high[1], max(low[0], 0):high[0]] = False
    assert not image[outside].any()
    # A hidden landmark is not drawn, nor are its segments.
    points[36:42, 2] = 0.0
    without_eye = draw_skeletons(points, "face68", size, size)
    assert not (without_eye == FACE.face_point_colors[36]).all(-1).any()


# ----------------------------------------------------------------------------- synthetic faces

@pytest.fixture(scope="module")
def face_videos():
    """Four synthetic face videos of a fresh seed (CONSIST_TEST_SEED replays one), with
    each identity's appearance and each video's motion."""
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"synthetic faces seed={seed}")
    config = synthetic.SyntheticConfig(identities=4, frames=FRAMES, size=SIZE, seed=seed, kind="faces")
    return [(synthetic.make_video(config, i, 0),
             synthetic.sample_face_appearance(np.random.default_rng([seed, i])),
             synthetic.sample_face_motion(synthetic.video_rng(seed, i, 0), FRAMES, SIZE))
            for i in range(4)]


def _eye_box(points, eye):
    """(T, H, W) bool: the eye landmarks' box, grown by a pixel (the drawing's soft edge)."""
    low = np.floor(points[..., eye, :2].min(-2) - 1).astype(int)
    high = np.ceil(points[..., eye, :2].max(-2) + 1).astype(int)
    grid = np.arange(SIZE)
    inside_x = (grid >= low[:, None, 0]) & (grid <= high[:, None, 0])
    inside_y = (grid >= low[:, None, 1]) & (grid <= high[:, None, 1])
    return inside_y[:, :, None] & inside_x[:, None, :]


def _interior(masks):
    """(T, H, W) bool: mask pixels whose 8 neighbours are in the mask too."""
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    inside = masks.copy()
    for dy in range(3):
        for dx in range(3):
            inside &= padded[:, dy:dy + SIZE, dx:dx + SIZE]
    return inside


def test_synthetic_face_landmarks_sit_on_the_drawn_face(face_videos):
    for video, appearance, motion in face_videos:
        assert video.layout == "face68" and video.keypoints.shape == (FRAMES, 68, 3)
        np.testing.assert_array_equal(video.pose_images,
                                      draw_skeletons(video.keypoints, "face68", SIZE, SIZE))
        frames = video.frames.astype(np.float32)
        # Eye whites (near the sclera colour, inside the head: edge pixels blend with the
        # background, which may be white) only inside the eye landmarks; an open eye shows
        # more than skin there, a closed eye (a blink) no white.
        white = (np.abs(frames - 245).max(-1) <= 25) & _interior(video.masks > 0)
        eyes = [_eye_box(video.keypoints, eye) for eye in (synthetic._R_EYE, synthetic._L_EYE)]
        assert not (white & ~(eyes[0] | eyes[1])).any()
        for box in eyes:
            for t in range(FRAMES):
                if motion.eyes[t] == 1:
                    assert np.abs(frames[t][box[t]] - appearance.skin).max() > 60, t
                elif motion.eyes[t] == 0:
                    assert not white[t][box[t]].any(), t
        # The jaw landmarks outline the drawn head: each is on (or a pixel from) its mask.
        jaw = np.rint(video.keypoints[:, :17, :2]).astype(int)
        for t in range(FRAMES):
            for x, y in jaw[t]:
                assert video.masks[t, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), (t, x, y)
    # The motion is there: the mouth opens and closes, the eyes blink, the head turns.
    motions = [m for _, _, m in face_videos]
    assert any(m.eyes.min() == 0 for m in motions)
    assert all(np.ptp(m.yaw) > 0 and np.ptp(m.mouth) > 0 for m in motions)


def _save_frames(folder, frames):
    folder.mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t}.png")


def _whole_body(video):
    """The face video's landmarks as DWPose whole-body poses (what extraction gives)."""
    return convert_layout(PoseSequence(video.keypoints, "face68", SIZE, SIZE), "dwpose134")


def test_face_videos_build_from_whole_body_poses(face_videos, tmp_path):
    """The local-videos builder with layout face68 keeps the face of DWPose poses."""
    video = face_videos[0][0]
    folder = tmp_path / "videos" / "face0"
    _save_frames(folder / "images", video.frames)
    save_poses(folder / "poses.npz", _whole_body(video))
    [local] = local_videos.scan_local_videos(tmp_path / "videos")
    example = local_videos.build_video_example(local, local_videos.BuildOptions(layout="face68"))
    assert example.layout == "face68"
    np.testing.assert_allclose(example.keypoints, video.keypoints, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(example.frames, video.frames)


def test_build_own_with_the_face_layout(face_videos, tmp_path):
    """build_own --layout=face68: records of face landmarks, cropped around the face; a
    video whose poses have no face is skipped and named."""
    videos, poses = tmp_path / "videos", tmp_path / "poses"
    poses.mkdir()
    for index, (video, _, _) in enumerate(face_videos[:2]):
        _save_frames(videos / f"face{index}", video.frames)
        save_poses(poses / f"face{index}.npz", _whole_body(video))
    _save_frames(videos / "body_only", face_videos[2][0].frames)
    body = np.concatenate([example_pose("openpose18", SIZE, SIZE)[None]] * FRAMES)
    save_poses(poses / "body_only.npz", PoseSequence(body, "openpose18", SIZE, SIZE))
    out = str(tmp_path / "out")
    settings = build_own.BuildSettings(size=32, layout="face68", test_fraction=0.0,
                                       image_encoding="raw")
    report = build_own.build_dataset(str(videos), out, settings, poses_dir=str(poses))
    assert list(report.skipped) == ["body_only"] and "share no keypoint" in report.skipped["body_only"]
    source = VideoRecordSource.for_split(out, "train")
    for index in range(len(source)):
        record = source[index].decode()
        assert record.layout == "face68" and record.frames.shape == (FRAMES, 32, 32, 3)
        # Cropped around the face (with the default margin): every landmark inside.
        xy = record.keypoints[..., :2]
        assert np.all((xy >= -0.5) & (xy <= 31.5))


# ----------------------------------------------------------------------------- data and training

@pytest.fixture(scope="module")
def face_data(tmp_path_factory):
    from tests.configs.tiny_face import get_config

    out = str(tmp_path_factory.mktemp("tiny_faces"))
    fields = {k: v for k, v in get_config().data.synthetic.items() if k != "generate"}
    synthetic.generate(out, synthetic.SyntheticConfig(**fields))
    return out


def test_face_dataset_reads_through_the_pipeline(face_data):
    config = dict(pipeline.default_config(), data_dir=face_data, batch_size=2, clip_length=2,
                  resolution=(16, 16), crop_scale=(1.0, 1.0), flip_probability=0.0)
    loader = pipeline.make_pipeline(config, "train", seed=0, process_index=0, process_count=1)
    batch = next(loader)
    assert batch["target_pose"].shape == (2, 2, 16, 16, 3)
    # The pose images are the face renderings of the stored landmarks.
    source = VideoRecordSource.for_split(face_data, "train")
    for b in range(2):
        video = source[int(batch["video_index"][b])].decode()
        assert video.layout == "face68"
        expected = draw_skeletons(video.keypoints[batch["frame_indices"][b]], "face68", 16, 16)
        np.testing.assert_array_equal(np.rint(batch["target_pose"][b] * 255), expected)


def test_one_train_step_with_the_face_config(face_data, tmp_path):
    command = script_cmd("train.py", "--config=tests/configs/tiny_face.py", f"--workdir={tmp_path / 'run'}",
                         "--config.train.num_steps=1", "--config.checkpoint.every_steps=0")
    result = subprocess.run(command, cwd=REPO, env=run_env("", CONSIST_TEST_FACE_DATA=face_data),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1/1" in result.stdout
