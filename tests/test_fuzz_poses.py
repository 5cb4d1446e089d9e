"""Bounded fuzzing of the pose readers (poses/io.load_poses): whatever a pose JSON or NPZ
holds, reading it gives a PoseSequence of finite-or-NaN pixel coordinates on a positive
canvas, or raises one ValueError that names the file, never another exception."""
import io
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consist_jax.poses.io import load_poses, save_poses
from consist_jax.poses.keypoints import PoseSequence, example_pose
from tests.fuzzing import JSON, bounded, damaged

CORPUS = os.path.join(os.path.dirname(__file__), "data", "poses")
JSON_FILES = sorted(f for f in os.listdir(CORPUS) if f.endswith(".json"))


def _check_outcome(path: str):
    """Reads ``path``: a well-formed sequence or a ValueError naming the file."""
    try:
        poses = load_poses(path, default_size=(64, 48))
    except ValueError as error:
        message = str(error)
        assert os.path.basename(path) in message, message
        assert "\n" not in message.strip(), message
        return None
    assert isinstance(poses, PoseSequence)
    points = poses.points
    assert points.ndim == 3 and points.shape[-1] == 3 and len(points) >= 1
    assert not np.isinf(points).any()
    assert poses.height >= 1 and poses.width >= 1
    return poses


@st.composite
def edited_json(draw, value):
    """``value`` with 1-3 random edits: a leaf or subtree replaced by arbitrary JSON, a key
    removed, or a list cut short."""
    value = json.loads(json.dumps(value))
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = value
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            return draw(JSON)
        action = draw(st.sampled_from(["replace", "remove", "cut"]))
        if action == "replace":
            parent[key] = draw(JSON | st.floats(-1e30, 1e30) | st.integers(-10, 10))
        elif action == "remove":
            del parent[key]
        elif isinstance(parent[key], list):
            parent[key] = parent[key][:draw(st.integers(0, len(parent[key])))]
    return value


@pytest.mark.parametrize("name", JSON_FILES)
@given(data=st.data())
@bounded(40)
def test_edited_pose_json_is_read_or_refused_naming_the_file(tmp_path_factory, name, data):
    with open(os.path.join(CORPUS, name)) as f:
        original = json.load(f)
    edited = data.draw(edited_json(original))
    path = str(tmp_path_factory.mktemp("fuzz") / name)
    with open(path, "w") as f:
        json.dump(edited, f)
    _check_outcome(path)


@pytest.mark.parametrize("name", JSON_FILES)
@given(data=st.data())
@bounded(25)
def test_damaged_pose_json_bytes_are_read_or_refused_naming_the_file(tmp_path_factory, name, data):
    with open(os.path.join(CORPUS, name), "rb") as f:
        raw = f.read()
    path = str(tmp_path_factory.mktemp("fuzz") / name)
    with open(path, "wb") as f:
        f.write(data.draw(damaged(raw)))
    _check_outcome(path)


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


ARRAYS = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8).map(np.float32),
    st.integers(-5, 600).map(np.int64),
    st.text(max_size=12).map(np.str_),
    st.tuples(st.integers(0, 3), st.integers(0, 140), st.integers(0, 4)).map(
        lambda shape: np.full(shape, 7.0, np.float32)),
)


@given(data=st.data())
@bounded(60)
def test_pose_npz_is_read_or_refused_naming_the_file(tmp_path_factory, data):
    """A valid saved sequence with fields replaced, removed or added, or its bytes damaged."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = str(folder / "poses.npz")
    points = np.repeat(example_pose("openpose18", 64, 48)[None], 2, axis=0)
    save_poses(path, PoseSequence(points, "openpose18", 64, 48))
    with np.load(path) as archive:
        fields = {k: archive[k] for k in archive.files}
    if data.draw(st.booleans()):
        for key in data.draw(st.lists(st.sampled_from(sorted(fields) + ["candidate", "subset", "x"]),
                                      min_size=1, max_size=3)):
            if key in fields and data.draw(st.booleans()):
                del fields[key]
            else:
                fields[key] = data.draw(ARRAYS)
        raw = _npz_bytes(**fields)
    else:
        raw = data.draw(damaged(_npz_bytes(**fields)))
    with open(path, "wb") as f:
        f.write(raw)
    _check_outcome(path)
