"""Verified atomic writes: every file the project writes is whole or absent, and a failed
write is an error naming the path (a full disk, a writer that fails, a parent that is a file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from consist_jax import files, videos
from consist_jax.sampling import io
from tests.runs import REPO

FULL_DISK = """
import resource, sys
import numpy as np
from consist_jax.sampling import io
frames = np.random.default_rng(int(sys.argv[2])).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # writes past 2 KiB fail: EFBIG
io.write_video(sys.argv[1], frames, 12.0)
"""


def _frames(rng, count=4, size=16):
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_videos_round_trip(rng, tmp_path):
    frames = _frames(rng)
    for name in ("a.mp4", "b.gif", "frames"):
        io.write_video(str(tmp_path / name), frames, fps=12.0)
    assert _listing(tmp_path) == ["a.mp4", "b.gif", "frames"] + [f"frames/{i:03d}.png" for i in range(4)]
    import imageio.v3 as iio

    assert len(list(iio.imiter(tmp_path / "a.mp4"))) == 4
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"frames/{i:03d}.png")), frame)
    for fps in io.MP4_FPS:  # check_output's bounds are rates ffmpeg takes
        io.write_video(str(tmp_path / "a.mp4"), frames, fps=fps)


@pytest.mark.parametrize("name", ["out.mp4", "out.gif", "frames"])
def test_full_disk_fails_and_leaves_nothing(rng, tmp_path, name):
    """A file-size limit makes every write past 2 KiB fail as a full disk does (ffmpeg, PIL)."""
    out = tmp_path / name
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(out), str(int(rng.integers(2**31)))],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"WriteError: cannot write '{out}" in last, result.stderr[-2000:]
    assert "File too large" in last or "SIGXFSZ (File size limit exceeded)" in last, last  # the writer's reason
    assert "[out#0" not in result.stderr  # ffmpeg's own log is captured, not printed
    assert _listing(tmp_path) == []  # no file, partial or whole, nor an empty folder of frames


def test_failing_writer_keeps_the_previous_file(rng, tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    io.write_video(str(out), _frames(rng), fps=12.0)
    before = out.read_bytes()

    def half_then_fail(path, frames, fps):
        with open(path, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(videos, "write_mp4", half_then_fail)
    with pytest.raises(files.WriteError, match=f"cannot write '{out}': No space left on device"):
        io.write_video(str(out), _frames(rng), fps=12.0)
    assert out.read_bytes() == before and _listing(tmp_path) == ["out.mp4"]


def test_a_truncated_video_is_refused(rng, tmp_path, monkeypatch):
    """A writer that reports success but wrote a broken file: the frames read back decide."""

    def truncated(path, frames, fps):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)

    monkeypatch.setattr(videos, "write_mp4", truncated)
    with pytest.raises(files.WriteError, match="out.mp4'.*does not decode"):
        io.write_video(str(tmp_path / "out.mp4"), _frames(rng), fps=12.0)
    assert _listing(tmp_path) == []


def test_atomic_folder_replaces_whole_or_not_at_all(rng, tmp_path):
    """evaluate.py's example folders: a later, shorter evaluation leaves none of the earlier
    frames; a failed one leaves the earlier folder as it was and names the folder's path."""
    example = tmp_path / "examples" / "v0"
    for count in (4, 2):
        with files.atomic_folder(str(example)) as tmp:
            io.write_frames(os.path.join(tmp, "generated"), _frames(rng, count))
    assert _listing(tmp_path) == ["examples", "examples/v0", "examples/v0/generated", "examples/v0/generated/000.png",
                                  "examples/v0/generated/001.png"]
    with pytest.raises(files.WriteError, match=f"^cannot write '{example}/generated/000.png': No space left"):
        with files.atomic_folder(str(example)) as tmp:
            raise files.WriteError(f"cannot write '{tmp}/generated/000.png': No space left on device")
    with pytest.raises(ZeroDivisionError):  # a bug inside: the same, its own error
        with files.atomic_folder(str(example)) as tmp:
            io.write_frames(tmp, _frames(rng, 1))
            1 / 0
    assert len(_listing(tmp_path)) == 5


def test_write_json_and_bytes(rng, tmp_path):
    value = {"psnr": float(rng.normal()), "frames": int(rng.integers(1, 100))}
    files.write_json(str(tmp_path / "deep" / "metrics.json"), value)
    assert json.loads((tmp_path / "deep" / "metrics.json").read_text()) == value
    with pytest.raises(TypeError):  # serialised before anything is written
        files.write_json(str(tmp_path / "bad.json"), {"x": object()})
    (tmp_path / "plain").write_text("")
    with pytest.raises(files.WriteError, match="plain"):
        files.write_bytes(str(tmp_path / "plain" / "x.json"), b"{}")
    with pytest.raises(files.WriteError, match="it is a folder"):
        files.write_bytes(str(tmp_path / "deep"), b"{}")
    assert _listing(tmp_path) == ["deep", "deep/metrics.json", "plain"]


def test_check_output(tmp_path):
    (tmp_path / "plain").write_text("")
    (tmp_path / "dir.gif").mkdir()
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("")
    io.check_output(str(tmp_path / "new" / "out.mp4"), 12.0)
    io.check_output(str(tmp_path / "frames"), 12.0)  # a folder without PNGs may take the frames
    (tmp_path / "frames" / "007.PNG").write_text("")
    for path, fps, message in [
        ("out.webm", 12.0, "write .mp4, .gif or a folder"),
        ("out.mp4", float("nan"), "fps=nan"),
        ("out.mp4", 1e-9, r"fps=1e-09: must be a finite number in \[0.001, 1000.0\]"),
        ("out.gif", 101.0, r"fps=101.0: must be a finite number in \(0, 100.0\]"),
        ("plain", 12.0, "is a file; PNG frames"),
        ("plain/out.mp4", 12.0, "is a file, not a folder"),
        ("dir.gif", 12.0, "is a folder"),
        ("frames", 12.0, "holds PNG files already: the frames of two runs would mix"),
    ]:
        with pytest.raises((ValueError, FileExistsError), match=message):
            io.check_output(str(tmp_path / path), fps)


FULL_DISK_DATA = """
import resource, sys
from consist_jax.data import synthetic
config = synthetic.SyntheticConfig(identities=4, frames=4, size=16, seed=int(sys.argv[2]))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
synthetic.generate(sys.argv[1], config)
"""


def test_data_shards_on_a_full_disk(rng, tmp_path):
    """A dataset is whole (all shards + dataset_info.json) or absent; a whole one reads back."""
    from consist_jax.data.shards import find_split_files, write_split_shards
    from consist_jax.data.source import VideoRecordSource

    records = [rng.bytes(int(n)) for n in rng.integers(1, 64, 5)]
    paths = write_split_shards(str(tmp_path / "ok"), "x", "train", records, len(records), 2)
    assert [len(VideoRecordSource([p])) for p in paths] == [2, 2, 1]
    assert find_split_files(str(tmp_path / "ok"), "train") == paths
    out = tmp_path / "full"
    result = subprocess.run([sys.executable, "-c", FULL_DISK_DATA, str(out), str(int(rng.integers(2**31))), "4096"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert f"WriteError: cannot write '{out}/" in result.stderr, result.stderr[-2000:]
    assert _listing(out) == []
    (tmp_path / "plain").write_text("")  # its command line: one line, exit code 2
    result = subprocess.run([sys.executable, "-m", "consist_jax.data.synthetic", f"--out={tmp_path}/plain/data",
                             "--identities=4", "--frames=4", "--size=16", "--workers=0"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr == f"error: WriteError: cannot create folder " \
                                                       f"'{tmp_path}/plain/data': Not a directory\n", result.stderr


FULL_DISK_EVENTS = """
import resource, sys
from consist_jax.training.metrics import MetricWriter
writer = MetricWriter(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    for step in range(1, 1000):
        writer.write(step, {"loss": 0.5, "lr": 1e-3})
finally:
    writer.close()
"""


def test_tensorboard_events_on_a_full_disk(rng, tmp_path):
    """train.py's TensorBoard writer: one WriteError naming the folder (train.py's one line),
    not tensorboardX's tracebacks from its writer thread and its flush at exit."""
    limit = str(int(rng.integers(200, 2000)))
    result = subprocess.run([sys.executable, "-c", FULL_DISK_EVENTS, str(tmp_path), limit], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"consist_jax.files.WriteError: cannot write TensorBoard events to '{tmp_path}/tensorboard': " \
                   f"File too large", result.stderr[-3000:]
    assert "Exception in thread" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


def test_odd_frame_sizes_for_mp4(rng, tmp_path):
    with pytest.raises(ValueError, match="H.264 needs an even frame size, the frames are 15x16"):
        io.write_video(str(tmp_path / "out.mp4"), _frames(rng)[:, :15], fps=12.0)
    io.write_video(str(tmp_path / "out.gif"), _frames(rng)[:, :15], fps=12.0)
    assert _listing(tmp_path) == ["out.gif"]
    # Past that check, ffmpeg's own refusal is what it reports (its exit status is read),
    # in one line; write_video's atomic_path would then remove the empty file.
    with pytest.raises(ValueError, match=r"^ffmpeg: .*divisible by 2[^\n]*$"):
        videos.write_mp4(str(tmp_path / "odd.mp4"), _frames(rng)[:, :15], 12.0)


@pytest.mark.parametrize("field, value", [("identities", 0), ("frames", -1), ("test_fraction", 1.0),
                                          ("workers", -1), ("seed", -1), ("image_encoding", "jpeg")])
def test_synthetic_config_ranges(field, value):
    from consist_jax.data.synthetic import SyntheticConfig

    with pytest.raises(ValueError, match=f"^synthetic.{field}="):
        SyntheticConfig(**{field: value})
