"""The grain pipeline: batch spec, determinism, epochs, checkpoint/restore in a new
process, multi-process sharding, flip consistency and bad input."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from consist_jax.data import clips, pipeline, records, shards, synthetic
from consist_jax.data.source import VideoRecordSource
from consist_jax.poses import OPENPOSE_18, draw_skeletons

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 identities -> 14 train videos (an even count: two shards split it evenly).
DATA = synthetic.SyntheticConfig(identities=16, frames=10, size=32, seed=7,
                                 test_fraction=0.125, records_per_shard=5)
CLIP_LENGTH, STRIDE = 4, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_data")
    synthetic.generate(str(out), DATA)
    return str(out)


def config_for(data_dir, **overrides):
    config = dict(data_dir=data_dir, batch_size=3, clip_length=CLIP_LENGTH, frame_stride=STRIDE,
                  resolution=(24, 32), crop_scale=(0.7, 1.0))
    config.update(overrides)
    return config


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


def single_process(config, split="train", seed=0):
    return pipeline.make_pipeline(config, split, seed=seed, process_index=0, process_count=1)


# ----------------------------------------------------------------------------- batch spec

def test_batch_spec(data_dir):
    batch = next(single_process(config_for(data_dir)))
    b, f, h, w = 3, CLIP_LENGTH, 24, 32
    expected = {
        "reference": (b, h, w, 3), "reference_pose": (b, h, w, 3), "target": (b, f, h, w, 3),
        "target_pose": (b, f, h, w, 3), "target_mask": (b, f, h, w, 1), "video_index": (b,),
        "frame_indices": (b, f), "reference_frame_index": (b,),
    }
    assert {k: v.shape for k, v in batch.items()} == expected
    for key in ("reference", "target"):
        assert batch[key].dtype == np.float32 and -1 <= batch[key].min() < batch[key].max() <= 1
    for key in ("reference_pose", "target_pose", "target_mask"):
        assert batch[key].dtype == np.float32 and batch[key].min() == 0 and batch[key].max() <= 1
    assert set(np.unique(batch["target_mask"])) == {0.0, 1.0}
    np.testing.assert_array_equal(np.diff(batch["frame_indices"], axis=1), STRIDE)


def test_config_dict_and_square_resolution(data_dir):
    config = pipeline.default_config()
    config.data_dir, config.batch_size, config.clip_length, config.resolution = data_dir, 2, 2, (16, 12)
    assert next(single_process(config))["target"].shape == (2, 2, 16, 12, 3)
    square = dict(config_for(data_dir, batch_size=2), resolution=16)  # a plain dict may give one int
    assert next(single_process(square))["target"].shape == (2, CLIP_LENGTH, 16, 16, 3)


def test_single_frames_for_the_image_stage(data_dir):
    batch = next(single_process(config_for(data_dir, clip_length=1, batch_size=2)))
    assert batch["target"].shape == (2, 1, 24, 32, 3)


@pytest.mark.parametrize("policy", ["any", "outside"])
def test_reference_policy(data_dir, policy):
    batches = take(single_process(config_for(data_dir, reference_policy=policy, batch_size=8)), 5)
    start = np.concatenate([b["frame_indices"][:, 0] for b in batches])
    reference = np.concatenate([b["reference_frame_index"] for b in batches])
    inside = (reference >= start) & (reference <= start + (CLIP_LENGTH - 1) * STRIDE)
    assert ((reference >= 0) & (reference < DATA.frames)).all()
    if policy == "outside":
        assert not inside.any()
    else:
        assert inside.any() and not inside.all()


def test_reference_frame_matches_the_video(data_dir):
    """The reference image is frame `reference_frame_index` of video `video_index`, under
    the same crop as the targets (no crop, no flip here: exactly the stored frame)."""
    config = config_for(data_dir, resolution=(32, 32), crop_scale=(1.0, 1.0), flip_probability=0.0)
    batch = next(single_process(config))
    source = VideoRecordSource.for_split(data_dir, "train")
    for i in range(3):
        video = records.decode_video(source[int(batch["video_index"][i])].data)
        expected = video.frames[batch["reference_frame_index"][i]] / 127.5 - 1
        np.testing.assert_allclose(batch["reference"][i], expected, atol=1e-5)
        expected_targets = video.frames[batch["frame_indices"][i]] / 127.5 - 1
        np.testing.assert_allclose(batch["target"][i], expected_targets, atol=1e-5)


# ----------------------------------------------------------------------------- order

def test_same_seed_same_batches_other_seed_differs(data_dir):
    config = config_for(data_dir)
    first = take(single_process(config, seed=5), 2)
    assert_batches_equal(first, take(single_process(config, seed=5), 2))
    other = next(single_process(config, seed=6))
    assert not np.array_equal(other["target"], first[0]["target"])


def test_epochs_cover_every_video_in_a_new_order(data_dir):
    config = config_for(data_dir, batch_size=1, num_epochs=2, drop_remainder=False)
    order = [int(b["video_index"][0]) for b in single_process(config)]
    assert len(order) == 28
    assert sorted(order[:14]) == sorted(order[14:]) == list(range(14))
    assert order[:14] != order[14:]


def test_two_processes_split_the_epoch(data_dir):
    config = config_for(data_dir, batch_size=1, num_epochs=1, drop_remainder=False)
    seen = []
    for index in range(2):
        iterator = pipeline.make_pipeline(config, "train", seed=3, process_index=index, process_count=2)
        seen.append([int(b["video_index"][0]) for b in iterator])
    assert len(seen[0]) == len(seen[1]) == 7
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(14))


# ----------------------------------------------------------------------------- checkpoint

_RESTORE_SCRIPT = """
import sys, numpy as np
from consist_jax.data import pipeline

def main():
    config, state_path, out_path = eval(sys.argv[1]), sys.argv[2], sys.argv[3]
    iterator = pipeline.make_pipeline(config, "train", seed=11, process_index=0, process_count=1)
    iterator.set_state(open(state_path, "rb").read())
    batches = [next(iterator) for _ in range(2)]
    np.savez(out_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()},
             skipped=iterator.stats()["skipped"])

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("worker_count", [0, 1])
def test_checkpoint_restores_the_next_batches_in_a_new_process(data_dir, tmp_path, worker_count):
    # 5 batches of 3 cross the 14-video epoch boundary, so the restore is mid-epoch-2.
    config = config_for(data_dir, worker_count=worker_count)
    iterator = single_process(config, seed=11)
    take(iterator, 5)
    state_path = tmp_path / "state.json"
    state_path.write_bytes(iterator.get_state())
    expected = take(iterator, 2)

    script = tmp_path / "restore.py"
    script.write_text(_RESTORE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "restored.npz"
    subprocess.run([sys.executable, str(script), repr(config), str(state_path), str(out)],
                   check=True, env=env, cwd=REPO_ROOT, timeout=120)
    with np.load(out, allow_pickle=False) as saved:
        restored = [{k: saved[f"{i}/{k}"] for k in expected[0]} for i in range(2)]
    assert_batches_equal(expected, restored)


def test_state_is_json_and_carries_the_counters(data_dir):
    import json

    iterator = single_process(config_for(data_dir))
    take(iterator, 2)
    state = json.loads(iterator.get_state())
    assert state["counts"] == {"batches": 2, "examples": 6, "skipped": 0}
    assert "last_seen_indices" in json.loads(state["grain"])


# ----------------------------------------------------------------------------- flips

def random_openpose_keypoints(rng, frames, size):
    """Plausible random poses: the synthetic figure's kinematics driven by rng."""
    appearance = synthetic.sample_appearance(rng)
    motion = synthetic.sample_motion(rng, frames, size)
    return synthetic.openpose18_keypoints(synthetic.skeleton_joints(motion, appearance, size), size)


def test_flip_permutation_swaps_sides():
    names = OPENPOSE_18.keypoint_names
    swapped = [names[j] for j in OPENPOSE_18.flip_permutation]
    assert swapped == [n.replace("r_", "#").replace("l_", "r_").replace("#", "l_") for n in names]


def test_flipped_keypoints_render_like_a_flipped_rendering(rng):
    size = 64
    keypoints = random_openpose_keypoints(rng, 6, size)
    rendered_then_flipped = clips.flip_images(draw_skeletons(keypoints, "openpose18", size, size))
    # Mirroring the points only (no side swap) gives the mirrored image, colours included.
    mirrored = keypoints.copy()
    mirrored[..., 0] = size - 1 - mirrored[..., 0]
    same = np.all(draw_skeletons(mirrored, "openpose18", size, size) == rendered_then_flipped, -1)
    assert same.mean() > 0.995
    # With the sides swapped (what the pipeline does) the skeleton covers the same pixels,
    # and the person's right side carries the right-side colours again.
    flipped = clips.flip_keypoints(keypoints, size, OPENPOSE_18.flip_permutation)
    drawn = draw_skeletons(flipped, "openpose18", size, size)
    silhouette_a, silhouette_b = drawn.any(-1), rendered_then_flipped.any(-1)
    assert (silhouette_a & silhouette_b).sum() / (silhouette_a | silhouette_b).sum() > 0.95
    np.testing.assert_allclose(clips.flip_keypoints(flipped, size, OPENPOSE_18.flip_permutation),
                               keypoints, atol=1e-4)


def test_pipeline_flip_mirrors_frames_masks_and_poses(data_dir):
    no_flip = next(single_process(config_for(data_dir, flip_probability=0.0), seed=2))
    flip = next(single_process(config_for(data_dir, flip_probability=1.0), seed=2))
    for key in ("target", "target_mask", "reference"):
        np.testing.assert_array_equal(flip[key], no_flip[key][..., ::-1, :], err_msg=key)
    a, b = flip["target_pose"].any(-1), no_flip["target_pose"][..., ::-1, :].any(-1)
    assert (a & b).sum() / (a | b).sum() > 0.9
    assert not np.array_equal(flip["target_pose"], no_flip["target_pose"][..., ::-1, :])


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def bad_data_dir(tmp_path_factory):
    """Shard 0: 6 good videos, then a short one, one without poses, a truncated record.
    Shard 1: one record whose bytes on disk are corrupted."""
    out = tmp_path_factory.mktemp("bad_data")
    config = synthetic.SyntheticConfig(frames=10, size=32, seed=1)
    good = [synthetic.make_video(config, i, 0) for i in range(8)]
    short = dataclasses.replace(good[6], frames=good[6].frames[:3], keypoints=good[6].keypoints[:3],
                                pose_images=good[6].pose_images[:3], masks=good[6].masks[:3],
                                video_id="short-video")
    keypoints = good[7].keypoints.copy()
    keypoints[:] = np.nan
    no_pose = dataclasses.replace(good[7], keypoints=keypoints, video_id="no-pose-video")
    encoded = [records.encode_video(v) for v in good[:6] + [short, no_pose]]
    encoded.append(records.encode_video(dataclasses.replace(good[0], video_id="cut-video"))[:-100])
    first, second = shards.shard_paths(str(out), "bad", "train", 2)
    shards.write_records(first, encoded)
    shards.write_records(second, [records.encode_video(good[1])])
    corrupted = bytearray(open(second, "rb").read())
    # The record's (compressed, several kB) chunk follows the 64-byte file signature.
    corrupted[1024:1088] = bytes(64)
    open(second, "wb").write(bytes(corrupted))
    return str(out)


def bad_config(data_dir, mode):
    return config_for(data_dir, batch_size=1, num_epochs=1, shuffle=False, drop_remainder=False,
                      on_bad_example=mode)


def test_bad_examples_raise_naming_record_file_and_video(bad_data_dir):
    iterator = single_process(bad_config(bad_data_dir, "error"))
    assert len(take(iterator, 6)) == 6
    messages = []
    while True:
        try:
            next(iterator)
        except pipeline.BadExampleError as error:
            messages.append(str(error))
        except StopIteration:
            break
    assert len(messages) == 4
    short, no_pose, cut, corrupt = messages
    assert "record 6" in short and "bad-train.array_record-00000-of-00002" in short
    assert "'short-video'" in short and "has 3 frames" in short and "needs 7" in short
    assert "record 7" in no_pose and "'no-pose-video'" in no_pose and "missing pose" in no_pose
    assert "record 8" in cut and "truncated" in cut
    assert "record 9" in corrupt and "00001-of-00002" in corrupt and "unreadable" in corrupt


def test_bad_examples_skipped_and_counted(bad_data_dir):
    iterator = single_process(bad_config(bad_data_dir, "skip"))
    batches = list(iterator)
    assert sorted(int(b["video_index"][0]) for b in batches) == list(range(6))
    stats = iterator.stats()
    assert stats["skipped"] == 4 and stats["examples"] == 6
    assert "record 9" in stats["last_skipped"]


def test_truncated_shard_file_is_named(data_dir, tmp_path):
    for name in os.listdir(data_dir):
        if "-train." in name:
            data = open(os.path.join(data_dir, name), "rb").read()
            open(tmp_path / name, "wb").write(data[: len(data) - 300] if name.endswith("00001-of-00003") else data)
    with pytest.raises(ValueError, match="00001-of-00003.*truncated"):
        single_process(config_for(str(tmp_path)))


def test_unknown_config_key_is_refused(data_dir):
    with pytest.raises(ValueError, match="batchsize"):
        single_process(config_for(data_dir, batchsize=4))


def test_region_mask_for_try_on(tmp_path):
    config = synthetic.SyntheticConfig(frames=10, size=32, seed=2)
    videos = [synthetic.make_video(config, i, 0) for i in range(3)]
    # A try-on region: the figure's upper half (any binary mask serves the test).
    with_region = [dataclasses.replace(v, region_masks=v.masks * (np.arange(32) < 16)[None, :, None])
                   for v in videos[:2]]
    path = shards.shard_paths(str(tmp_path), "tryon", "train", 1)[0]
    shards.write_records(path, [records.encode_video(v) for v in with_region + videos[2:]])
    base = config_for(str(tmp_path), batch_size=2, with_region_mask=True, shuffle=False, num_epochs=1)
    plain = next(single_process(dict(base, flip_probability=0.0)))
    flipped = next(single_process(dict(base, flip_probability=1.0)))
    assert plain["region_mask"].shape == (2, CLIP_LENGTH, 24, 32, 1)
    assert set(np.unique(plain["region_mask"])) == {0.0, 1.0}
    assert (plain["region_mask"] <= plain["target_mask"]).all()
    np.testing.assert_array_equal(flipped["region_mask"], plain["region_mask"][..., ::-1, :])
    with pytest.raises(pipeline.BadExampleError, match="record 2.*no region mask"):
        list(single_process(dict(base, batch_size=1)))
