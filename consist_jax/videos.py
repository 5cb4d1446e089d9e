"""Video files through ffmpeg itself, whose every report is checked. Decoding is faithful:
every frame ffmpeg decodes, in order, or an error naming the file and the frame where
decoding failed, never garbage frames without a word; encoding (``write_mp4``) fails with
ffmpeg's reason.

ffmpeg stops at its first decoding error (``-xerror``; one thread, so frames come out in
order) and anything it reports is an error (ffmpeg's first message line); a clean decode
that yields fewer frames than the header's duration x fps promises is one too. The one
reader of videos for sampling's pose videos, pose extraction and the local-video dataset
builder.

    info = videos.probe("dance.mp4", "pose video")    # VideoInfo(height, width, fps, num_frames)
    for frame in videos.iter_frames("dance.mp4", "pose video"): ...   # uint8 (H, W, 3)
    videos.write_mp4("out.mp4", frames, fps=12.0)
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import subprocess
import tempfile
import warnings
from typing import Iterator, Optional

import numpy as np

FRAME_SLACK = 0.05  # decoded frames may fall this far short of the header's count


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame size, frame rate and frame count (None: not said)."""
    height: int
    width: int
    fps: Optional[float]
    num_frames: Optional[int]


@contextlib.contextmanager
def _starting_ffmpeg():
    """ffmpeg starts by fork + exec, no Python code running in the child; JAX's at-fork hook
    warns about it as about a bare fork (a deadlock risk it does not have), in lines that
    would break a CLI's one-line error: that warning is dropped here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def first_error(stderr: str) -> str:
    """ffmpeg's first message line, without its "[h264 @ 0x55...]" address."""
    line = stderr.strip().splitlines()[0] if stderr.strip() else "no message"
    return re.sub(r" @ 0x[0-9a-f]+", "", line)


def ffmpeg_failure(returncode: int, stderr: str) -> str:
    """Why an ffmpeg run failed, in one line: its first message, or the signal that killed
    it (SIGXFSZ: a file-size limit, which Python ignores but its children do not)."""
    if returncode < 0:
        return f"ffmpeg was killed by {signal.Signals(-returncode).name} ({signal.strsignal(-returncode)})"
    return f"ffmpeg: {first_error(stderr)}"


def probe(path: str, what: str = "video") -> VideoInfo:
    """The header of the video at ``path``; a file ffmpeg cannot open is a ValueError naming
    ``what``, the path and ffmpeg's reason."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(path)
        with _starting_ffmpeg():
            meta = next(reader)
        reader.close()
    except (OSError, RuntimeError, StopIteration) as e:
        raise ValueError(f"cannot read {what} {path!r}: {_open_failure(str(e))}") from None
    width, height = meta["size"]
    fps, duration = meta.get("fps"), meta.get("duration")
    promised = int(round(fps * duration)) if fps and duration else None
    return VideoInfo(int(height), int(width), float(fps) if fps else None, promised)


def _open_failure(log: str) -> str:
    """The reason in imageio-ffmpeg's error for a video it cannot open (ffmpeg's whole log)."""
    if "Input #0" in log and "Video:" not in log:  # opened, but ffmpeg found no video in it
        return "it holds no video stream (a file cut short, or not a video)"
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if "error" in line.lower()), None)
    reason = first_error(log if first is None else lines[first])
    if first and lines[first - 1].startswith("["):  # the why before it: "[mov,mp4,...] moov atom not found"
        reason = f"{first_error(lines[first - 1])}; {reason}"
    return reason


def iter_frames(path: str, what: str = "video") -> Iterator[np.ndarray]:
    """Every frame of the video at ``path``, uint8 (H, W, 3) RGB, streamed (a long video is
    never held whole); raises ValueError naming ``what``, the path and the frame decoding
    failed at, or the frame count the header promised and the decode fell short of."""
    import imageio_ffmpeg

    info = probe(path, what)
    size = info.height * info.width * 3
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-threads", "1",
               "-xerror", "-i", path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    count = 0
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg never blocks on it
        with _starting_ffmpeg():
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        try:
            while len(data := process.stdout.read(size)) == size:
                yield np.frombuffer(data, np.uint8).reshape(info.height, info.width, 3)
                count += 1
            returncode = process.wait()
        finally:
            if process.poll() is None:  # the caller stopped early
                process.kill()
                process.wait()
            process.stdout.close()
        log.seek(0)
        errors = log.read().decode(errors="replace")
    if returncode != 0 or errors.strip():
        raise ValueError(f"{what} {path!r} is corrupt: decoding failed at frame {count} "
                         f"({ffmpeg_failure(returncode, errors)})")
    promised = info.num_frames or 0
    if count < promised - max(1, int(FRAME_SLACK * promised)):
        raise ValueError(f"{what} {path!r} decoded to {count} frames but its header promises {promised} "
                         f"({promised / info.fps:g} s at {info.fps:g} fps): frames from {count} on are missing")


def read_frames(path: str, what: str = "video") -> np.ndarray:
    """Every frame of the video at ``path``: uint8 (F, H, W, 3) (see ``iter_frames``)."""
    frames = list(iter_frames(path, what))
    if not frames:
        raise ValueError(f"{what} {path!r} holds no frames")
    return np.stack(frames)


MP4_QUALITY = ["-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "5"]  # imageio-ffmpeg's quality=9


def write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """uint8 (F, H, W, 3) -> an H.264 MP4 at ``path`` (even H and W), through ffmpeg itself:
    what it reports is checked (its exit status; its messages are captured, not printed),
    so a full disk or a refused setting is a ValueError with ffmpeg's reason. Not atomic:
    callers write a temporary name (files.atomic_path) and count the frames back."""
    import fractions

    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    rate = str(fractions.Fraction(fps).limit_denominator())
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", rate, "-i", "-", "-an", *MP4_QUALITY, path]
    with _starting_ffmpeg():
        result = subprocess.run(command, input=np.ascontiguousarray(frames, np.uint8).tobytes(), capture_output=True)
    if result.returncode != 0:
        raise ValueError(ffmpeg_failure(result.returncode, result.stderr.decode(errors="replace")))
