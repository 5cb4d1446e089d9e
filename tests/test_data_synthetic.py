"""The synthetic people dataset: determinism, held-out identities, drawings that match poses."""
import json
import os

import numpy as np
import pytest

from consist_jax.data import records, synthetic
from consist_jax.data.source import VideoRecordSource
from consist_jax.poses import OPENPOSE_18, draw_skeletons

SMALL = synthetic.SyntheticConfig(identities=10, frames=6, size=32, seed=3, records_per_shard=4)


def read_split(out_dir, split):
    source = VideoRecordSource.for_split(str(out_dir), split)
    return [records.decode_video(source[i].data) for i in range(len(source))]


def shard_bytes(out_dir):
    names = sorted(n for n in os.listdir(out_dir) if ".array_record-" in n)
    return {n: open(os.path.join(out_dir, n), "rb").read() for n in names}


def near_figure(mask):
    """(H, W) mask dilated by 2 pixels: anti-aliased edges lie within it."""
    padded = np.pad(mask.astype(bool), 2)
    h, w = mask.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(5) for dx in range(5)], axis=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    info = synthetic.generate(str(out), SMALL)
    return out, info


def test_video_contents(small_set):
    out, info = small_set
    videos = read_split(out, "train")
    assert len(videos) == info["splits"]["train"]["num_records"] == 9
    video = videos[0]
    assert video.frames.shape == (6, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.keypoints.shape == (6, 18, 3) and video.keypoints.dtype == np.float32
    assert video.masks.shape == (6, 32, 32) and set(np.unique(video.masks)) <= {0, 1}
    assert video.layout == OPENPOSE_18.name
    # The stored pose images are the project renderer's drawing of the stored keypoints.
    np.testing.assert_array_equal(video.pose_images, draw_skeletons(video.keypoints, "openpose18", 32, 32))


def test_dataset_info(small_set):
    out, info = small_set
    on_disk = json.loads((out / "dataset_info.json").read_text())
    assert on_disk["splits"]["test"]["num_records"] == 1
    assert (on_disk["height"], on_disk["width"], on_disk["layout"]) == (32, 32, "openpose18")
    assert sorted(on_disk["splits"]["train"]["files"]) == sorted(
        os.path.basename(p) for p in VideoRecordSource.for_split(str(out), "train").paths)


def test_same_seed_same_bytes_other_seed_differs(small_set, tmp_path):
    out, _ = small_set
    synthetic.generate(str(tmp_path / "again"), SMALL)
    assert shard_bytes(tmp_path / "again") == shard_bytes(out)
    other = synthetic.SyntheticConfig(**{**SMALL.__dict__, "seed": 4})
    synthetic.generate(str(tmp_path / "other"), other)
    assert read_split(tmp_path / "other", "train")[0].frames.tobytes() != \
        read_split(out, "train")[0].frames.tobytes()


def test_worker_processes_do_not_change_the_data(small_set, tmp_path):
    out, _ = small_set
    config = synthetic.SyntheticConfig(**{**SMALL.__dict__, "workers": 2, "identities": 10})
    synthetic.generate(str(tmp_path), config)
    assert shard_bytes(tmp_path) == shard_bytes(out)


def test_held_out_identities_are_disjoint(small_set):
    out, info = small_set
    train = {v.identity_id for v in read_split(out, "train")}
    test = {v.identity_id for v in read_split(out, "test")}
    assert train and test and not train & test
    splits = synthetic.identity_splits(200, 0.1, seed=0)
    assert len(splits["test"]) == 20 and not set(splits["train"]) & set(splits["test"])
    assert sorted(splits["train"] + splits["test"]) == list(range(200))


def test_appearance_is_per_identity(small_set):
    """Two videos of one identity share clothes and background; another identity differs."""
    config = synthetic.SyntheticConfig(identities=2, frames=4, size=32, seed=1)
    a0, a1 = synthetic.make_video(config, 0, 0), synthetic.make_video(config, 0, 1)
    b0 = synthetic.make_video(config, 1, 0)
    assert a0.identity_id == a1.identity_id != b0.identity_id
    background = ~(near_figure(a0.masks[0]) | near_figure(a1.masks[0]))
    np.testing.assert_array_equal(a0.frames[0][background], a1.frames[0][background])
    assert not np.array_equal(a0.keypoints, a1.keypoints)  # different motion
    assert not np.array_equal(a0.frames[0][background], b0.frames[0][background])


def test_keypoints_lie_on_the_figure():
    config = synthetic.SyntheticConfig(frames=12, size=64, seed=5)
    for identity in range(3):
        video = synthetic.make_video(config, identity, 0)
        xy = np.rint(video.keypoints[..., :2]).astype(int)
        visible = video.keypoints[..., 2] > 0
        frame = np.broadcast_to(np.arange(12)[:, None], visible.shape)
        # Ears and eyes sit on the head's edge; the body points must be on the mask.
        body = visible.copy()
        body[:, 14:] = False
        on_mask = video.masks[frame[body], xy[body][:, 1], xy[body][:, 0]]
        assert on_mask.mean() > 0.97


def test_motion_makes_copying_the_reference_a_poor_guess():
    """Masks of a frame and one 16 frames later overlap little (the figure travels)."""
    config = synthetic.SyntheticConfig(frames=48, size=64, seed=0)
    ious = []
    for identity in range(8):
        masks = synthetic.make_video(config, identity, 0).masks.astype(bool)
        first, later = masks[:-16], masks[16:]
        ious.append((first & later).sum() / (first | later).sum())
    assert np.mean(ious) < 0.5, ious
