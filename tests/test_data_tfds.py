"""TikTok / UBC Fashion builders on a tiny fake local copy: scanning, splits, examples,
ArrayRecord output read back through the pipeline; the TFDS wrapper when TFDS is there."""
import json

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from consist_jax.data import pipeline, records
from consist_jax.data.tfds import local_videos, splits

HEIGHT, WIDTH, FRAMES = 24, 32, 6


def random_keypoints(rng, frames=FRAMES):
    xy = rng.uniform([2, 2], [WIDTH - 3, HEIGHT - 3], (frames, 18, 2))
    return np.concatenate([xy, rng.uniform(0.5, 1, (frames, 18, 1))], -1).astype(np.float32)


def write_frames(folder, frames, suffix=".png"):
    folder.mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t + 1:04d}{suffix}")


def make_local_copy(root, rng):
    """00001: PNG frames, masks, OpenPose JSON per frame (frame 4 has no file, frame 5 no
    person). 00002: JPG frames + poses.npz. 00335: video.mp4 + pose_video.mp4 (pose images)."""
    frames = {v: rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
              for v in ("00001", "00002", "00335")}
    keypoints = {v: random_keypoints(rng) for v in ("00001", "00002")}

    write_frames(root / "00001" / "images", frames["00001"])
    write_frames(root / "00001" / "masks", (rng.integers(0, 2, (FRAMES, HEIGHT, WIDTH)) * 255).astype(np.uint8))
    (root / "00001" / "poses").mkdir()
    for t in range(FRAMES):
        if t == 3:
            continue
        people = [] if t == 4 else [{"pose_keypoints_2d": keypoints["00001"][t].ravel().tolist()}]
        (root / "00001" / "poses" / f"{t + 1:04d}_keypoints.json").write_text(
            json.dumps({"version": 1.3, "people": people}))

    write_frames(root / "00002" / "images", frames["00002"], ".jpg")
    np.savez(root / "00002" / "poses.npz", keypoints=keypoints["00002"], height=HEIGHT, width=WIDTH)

    (root / "00335").mkdir()
    imageio.mimwrite(root / "00335" / "video.mp4", frames["00335"], fps=30, format="FFMPEG",
                     macro_block_size=1)
    pose_images = np.zeros((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    pose_images[:, 8:16, 10:20] = 200
    imageio.mimwrite(root / "00335" / "pose_video.mp4", pose_images, fps=30, format="FFMPEG",
                     macro_block_size=1)
    return frames, keypoints


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiktok_local")
    frames, keypoints = make_local_copy(root, np.random.default_rng(0))
    return root, frames, keypoints


def test_scan_finds_every_video(local_copy):
    root, _, _ = local_copy
    videos = {v.video_id: v for v in local_videos.scan_local_videos(root)}
    assert sorted(videos) == ["00001", "00002", "00335"]
    assert videos["00001"].pose_dir and videos["00001"].masks_dir and videos["00001"].frames_dir
    assert videos["00002"].pose_file.name == "poses.npz"
    assert videos["00335"].frames_mp4 and videos["00335"].pose_images_mp4


def test_tiktok_default_split_is_discos(local_copy):
    root, _, _ = local_copy
    ids = [v.video_id for v in local_videos.scan_local_videos(root)]
    assert splits.tiktok_splits(ids) == {"train": ["00001", "00002"], "test": ["00335"]}
    assert splits.tiktok_splits([f"{i:05d}" for i in range(1, 341)])["test"] == [
        f"{i:05d}" for i in range(335, 341)]


def test_split_lists_take_ids_or_urls(tmp_path):
    (tmp_path / "train.txt").write_text("# official list\nhttps://host/fashion/A1.mp4\n\nB2\n")
    (tmp_path / "test.txt").write_text("/data/ubc/C3.mp4\n")
    lists = {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"}
    assert splits.ubc_fashion_splits(["A1", "B2", "C3"], lists) == {"train": ["A1", "B2"], "test": ["C3"]}
    with pytest.raises(FileNotFoundError, match="not found locally"):
        splits.ubc_fashion_splits(["A1", "B2"], lists)
    with pytest.raises(FileNotFoundError, match="split lists"):
        splits.ubc_fashion_splits(["A1"], None)
    (tmp_path / "test.txt").write_text("A1\n")
    with pytest.raises(ValueError, match="both"):
        splits.ubc_fashion_splits(["A1", "B2"], lists)


def test_openpose_frames_and_masks(local_copy):
    root, frames, keypoints = local_copy
    video = local_videos.scan_local_videos(root)[0]
    example = local_videos.build_video_example(video)
    np.testing.assert_array_equal(example.frames, frames["00001"])
    assert example.layout == "openpose18" and example.masks.dtype == np.uint8
    assert set(np.unique(example.masks)) == {0, 1}
    # No JSON for frame 4 and nobody in frame 5: both are missing poses.
    assert records.frames_with_missing_pose(example.keypoints).tolist() == [3, 4]
    present = [0, 1, 2, 5]
    np.testing.assert_allclose(example.keypoints[present], keypoints["00001"][present], atol=1e-4)


def test_whole_video_pose_file_and_resizing(local_copy):
    root, _, keypoints = local_copy
    video = local_videos.scan_local_videos(root)[1]
    example = local_videos.build_video_example(video, local_videos.BuildOptions(frame_step=2))
    assert example.num_frames == 3 and example.fps == 15.0
    np.testing.assert_allclose(example.keypoints, keypoints["00002"][::2], atol=1e-4)
    resized = local_videos.resize_example(example, 48)  # 24x32 -> 48x64
    assert resized.frames.shape == (3, 48, 64, 3)
    np.testing.assert_allclose(resized.keypoints[..., :2], (example.keypoints[..., :2] + 0.5) * 2 - 0.5,
                               atol=1e-4)


def test_pose_images_only_video(local_copy):
    root, _, _ = local_copy
    example = local_videos.build_video_example(local_videos.scan_local_videos(root)[2])
    assert example.keypoints is None and example.layout == records.NO_KEYPOINTS_LAYOUT
    assert example.pose_images.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert example.pose_images[:, 12, 15].mean() > 150 and example.pose_images[:, 2, 2].max() < 40


@pytest.fixture(scope="module")
def built_dir(local_copy, tmp_path_factory):
    root, _, _ = local_copy
    out = tmp_path_factory.mktemp("tiktok_built")
    videos = local_videos.scan_local_videos(root)
    for split, ids in splits.tiktok_splits([v.video_id for v in videos]).items():
        local_videos.write_local_split(local_videos.select_videos(videos, ids), str(out), "tiktok",
                                       split, local_videos.BuildOptions())
    return str(out)


def test_built_split_feeds_the_pipeline_and_skips_missing_poses(built_dir):
    config = dict(data_dir=built_dir, batch_size=1, clip_length=2, frame_stride=1,
                  resolution=(16, 16), num_epochs=12, drop_remainder=False, on_bad_example="skip")
    iterator = pipeline.make_pipeline(config, "train", seed=0, process_index=0, process_count=1)
    batches = list(iterator)
    assert iterator.stats()["skipped"] > 0 and len(batches) + iterator.stats()["skipped"] == 24
    for batch in batches:
        if batch["video_index"][0] == 0:  # 00001: frames 3 and 4 have no pose
            used = set(batch["frame_indices"][0].tolist()) | {int(batch["reference_frame_index"][0])}
            assert not used & {3, 4}
        assert batch["target_pose"].max() > 0


def test_built_pose_image_split(built_dir):
    config = dict(data_dir=built_dir, batch_size=2, clip_length=3, resolution=(12, 16),
                  flip_probability=1.0)
    batch = next(pipeline.make_pipeline(config, "test", seed=0, process_index=0, process_count=1))
    assert batch["target_pose"].shape == (2, 3, 12, 16, 3) and batch["target_pose"].max() > 0.5
    np.testing.assert_array_equal(batch["target_mask"], 1.0)  # no masks in this video


def test_tfds_wrapper_builds_array_record_the_pipeline_reads(local_copy, tmp_path):
    tfds = pytest.importorskip(
        "tensorflow_datasets",
        reason="only the thin TFDS wrapper needs tensorflow_datasets (the `data` extra); the "
               "plain builder functions it wraps are tested above")
    from consist_jax.data.tfds.tiktok import Tiktok

    root, _, _ = local_copy
    builder = Tiktok(data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    config = dict(data_dir=builder.data_dir, batch_size=1, clip_length=2, resolution=(16, 16),
                  on_bad_example="skip")
    batch = next(pipeline.make_pipeline(config, "train", seed=0, process_index=0, process_count=1))
    assert batch["target"].shape == (1, 2, 16, 16, 3)
