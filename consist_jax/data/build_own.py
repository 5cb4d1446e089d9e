"""Your own dataset in one command: a folder of videos -> the project's ArrayRecord shards.

    python -m consist_jax.data.build_own --videos=my_videos/ --out=data/own \
        --detector=yolox_l.onnx --pose_model=dw-ll_ucoco_384.onnx      # poses extracted
    python -m consist_jax.data.build_own --videos=my_videos/ --out=data/own \
        --poses_dir=my_poses/                                           # poses read
    python train.py --config=configs/demo.py --workdir=runs/own \
        --config.data.pipeline.data_dir=data/own

``--videos`` holds the videos, any size and frame rate: video files (``.mp4``, ``.mov``,
...) and folders of frames (natural order, ``--fps`` gives their rate); the file stem or
folder name is the video's id. ``--poses_dir`` holds ``<id>.json|.npz|.npy`` (any file
``consist_jax.poses.io.load_poses`` reads, on the video's canvas) or ``<id>/`` (OpenPose
JSON per frame); without it the poses are extracted with the ONNX models
(``consist_jax.poses.extract``).

Face videos (face reenactment, configs/face_reenact.py): ``--layout=face68`` keeps the
68 face landmarks of the whole-body poses (or takes 68-point pose files as they are) and
crops around the face instead of the person.

Each video becomes one record (consist_jax.data.records): every ``--frame_step``-th frame
cropped to a square around the person (every visible keypoint of the whole video, grown
by ``--margin``; a person taller or wider than the frame is padded with black, never
squashed), resized to ``--size`` pixels, with its keypoints; a frame without a detected
person is stored as a missing pose. Videos are split into train and test by video
(``--test_fraction``, a seeded draw). A video that cannot be used (unreadable, no poses,
no person) is reported by name, skipped and counted; the others are still built.

Resumable: each finished video is kept in ``OUT/.build_own/`` as it is done, so a killed
run started again with the same flags continues with the next video, and writes every
video exactly once. The shards and ``OUT/dataset_info.json`` (its presence marks a
complete dataset) are written at the end, and the work folder removed. A skipped video
stays skipped on a resumed run; delete ``OUT/.build_own/skipped/<id>.txt`` to retry it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from consist_jax import checks, files
from consist_jax.data import records
from consist_jax.data.shards import write_split_shards
from consist_jax.data.synthetic import identity_splits
from consist_jax.images import VIDEO_SUFFIXES
from consist_jax.poses import extract
from consist_jax.poses.io import KEYPOINT_SUFFIXES, load_poses
from consist_jax.poses.keypoints import PoseSequence, convert_layout
from consist_jax.poses.layouts import LAYOUTS
from consist_jax.poses.sequence import crop_poses, person_box, resize_poses

DATASET_NAME = "own_videos"
WORK_FOLDER = ".build_own"
# What makes one video unusable (unreadable, bad poses, no person); anything else is a bug.
VIDEO_ERRORS = (ValueError, OSError, RuntimeError)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the records; a resumed run must use the same."""

    size: int = 512
    margin: float = 0.1
    frame_step: int = 1
    fps: float = extract.DEFAULT_FPS  # of frame folders
    test_fraction: float = 0.1
    seed: int = 0
    poses: str = "extracted"  # or the --poses_dir path (set by build_dataset)
    records_per_shard: int = 16
    image_encoding: str = "png"
    layout: str | None = None  # the records' layout (face68 for faces); None: the poses' own

    def __post_init__(self):
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"--layout={self.layout!r}: one of {sorted(LAYOUTS)}")
        checks.positive_int("--size", self.size)
        checks.non_negative_number("--margin", self.margin)
        checks.positive_int("--frame_step", self.frame_step)
        checks.positive_number("--fps", self.fps)
        checks.fraction_below_one("--test_fraction", self.test_fraction)
        checks.seed("--seed", self.seed)
        checks.positive_int("--records_per_shard", self.records_per_shard)


# --- the videos --------------------------------------------------------------------------------
def find_videos(folder: str) -> dict[str, str]:
    """{video id: path} of the video files and frame folders in ``folder``, sorted."""
    from consist_jax.poses.io import natural_key

    if not os.path.isdir(folder):
        raise NotADirectoryError(f"--videos={folder!r}: not a folder")
    videos = {}
    for path in sorted(Path(folder).iterdir(), key=lambda p: natural_key(p.name)):
        is_video = path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES
        if not (is_video or (path.is_dir() and not path.name.startswith("."))):
            continue
        video_id = path.stem if is_video else path.name
        if video_id in videos:
            raise ValueError(f"--videos={folder!r}: two videos named {video_id!r} "
                             f"({videos[video_id]} and {path}); rename one")
        videos[video_id] = str(path)
    if not videos:
        raise ValueError(f"--videos={folder!r}: no video files ({', '.join(VIDEO_SUFFIXES)})"
                         f" or frame folders")
    return videos


def _pose_file(poses_dir: str, video_id: str) -> str:
    candidates = [os.path.join(poses_dir, video_id + s) for s in KEYPOINT_SUFFIXES]
    candidates.append(os.path.join(poses_dir, video_id))
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no poses for video {video_id!r} in --poses_dir={poses_dir!r} "
                            f"(expected {video_id}.json, .npz, .npy or a {video_id}/ folder)")


def video_poses(source: extract.FrameSource, video_id: str, poses_dir: str | None,
                extractor: extract.WholeBodyExtractor | None) -> PoseSequence:
    """The poses of every frame of ``source``, on its canvas."""
    if poses_dir is None:
        return extract.extract_poses(source, extractor, progress=False)
    return load_poses(_pose_file(poses_dir, video_id), height=source.height, width=source.width)


def square_box(poses: PoseSequence, margin: float) -> tuple[int, int, int, int]:
    """The square (x0, y0, x1, y1) around the person; it reaches outside the frame (to be
    padded) only when the person's box is larger than the frame."""
    x0, y0, x1, y1 = person_box(poses, margin=margin, square=True)
    side = max(x1 - x0, y1 - y0)
    x0 -= (side - (x1 - x0)) // 2
    y0 -= (side - (y1 - y0)) // 2
    return x0, y0, x0 + side, y0 + side


def build_example(video_id: str, path: str, settings: BuildSettings, poses_dir: str | None,
                  extractor: extract.WholeBodyExtractor | None) -> records.VideoExample:
    """One video -> its record's example: frames and keypoints cropped around the person
    and resized to (size, size)."""
    source = extract.open_frames(path, fps=settings.fps)
    poses = video_poses(source, video_id, poses_dir, extractor)
    poses = convert_layout(poses, settings.layout or poses.layout)
    num_poses, step = len(poses), settings.frame_step
    poses = poses.frames(np.arange(0, num_poses, step))
    box = square_box(poses, settings.margin)
    frames, count = [], 0
    for batch in source.batches(32):  # streamed: only the small crops are kept
        for frame in batch:
            if count % step == 0 and count < num_poses:
                crop = Image.fromarray(frame).crop(box)  # black outside the frame
                frames.append(np.asarray(crop.resize((settings.size,) * 2, Image.BILINEAR)))
            count += 1
    if count != num_poses:
        raise ValueError(f"{path}: {count} frames but {num_poses} poses")
    points = np.array(resize_poses(crop_poses(poses, box), settings.size, settings.size).points)
    # No person seen (every confidence 0) is a missing pose, as the local-video builders store it.
    points[~np.any(points[..., 2] > 0, axis=-1)] = np.nan
    return records.VideoExample(frames=np.stack(frames), video_id=video_id, identity_id=video_id,
                                layout=poses.layout, fps=source.fps / settings.frame_step,
                                keypoints=points)


# --- resumable building --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BuildReport:
    written: dict  # split -> [video ids]
    skipped: dict  # video id -> reason


def _plan(out: str, videos: dict, settings: BuildSettings) -> dict:
    """{video id: split}, decided once and kept in the work folder: a resumed run must see
    the same videos and settings."""
    path = os.path.join(out, WORK_FOLDER, "plan.json")
    ids = list(videos)
    split_of = {}
    for split, indices in identity_splits(len(ids), settings.test_fraction, settings.seed).items():
        split_of.update({ids[i]: split for i in indices})
    plan = {"settings": dataclasses.asdict(settings), "videos": {i: split_of[i] for i in ids}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            previous = json.load(stream)
        if previous != plan:
            raise ValueError(f"--out={out!r} holds an unfinished build of other videos or flags "
                             f"({path}); run it again with the same flags, or use a new --out")
        return plan["videos"]
    files.write_json(path, plan)
    return plan["videos"]


def _part_path(out: str, split: str, video_id: str) -> str:
    return os.path.join(out, WORK_FOLDER, split, video_id + ".record")


def _failure_path(out: str, video_id: str) -> str:
    return os.path.join(out, WORK_FOLDER, "skipped", video_id + ".txt")


def build_dataset(videos_dir: str, out: str, settings: BuildSettings, *,
                  poses_dir: str | None = None, detector: str | None = None,
                  pose_model: str | None = None) -> BuildReport:
    """Builds (or finishes building) the dataset in ``out``; see the module docstring."""
    if poses_dir is not None and (detector or pose_model):
        raise ValueError("give either --poses_dir or --detector and --pose_model, not both")
    if poses_dir is None and not (detector and pose_model):
        raise ValueError("give --poses_dir, or both --detector and --pose_model")
    if poses_dir is not None and not os.path.isdir(poses_dir):
        raise NotADirectoryError(f"--poses_dir={poses_dir!r}: not a folder")
    settings = dataclasses.replace(
        settings, poses=os.path.abspath(poses_dir) if poses_dir else "extracted")
    files.check_can_create(out, "--out")
    if os.path.exists(os.path.join(out, "dataset_info.json")):
        raise FileExistsError(f"--out={out!r} holds a finished dataset already; use a new --out")
    videos = find_videos(videos_dir)
    split_of = _plan(out, videos, settings)
    pending = [v for v in videos if not os.path.exists(_part_path(out, split_of[v], v))
               and not os.path.exists(_failure_path(out, v))]
    extractor = None
    if pending and poses_dir is None:
        extractor = extract.WholeBodyExtractor(detector, pose_model)
    from tqdm import tqdm

    for video_id in tqdm(pending, unit="video", desc="videos"):
        _build_one(video_id, videos[video_id], split_of[video_id], out, settings, poses_dir,
                   extractor)
    return _finish(out, videos, split_of, settings)


def _build_one(video_id, path, split, out, settings, poses_dir, extractor) -> None:
    """Writes the video's record, or the reason it was skipped, into the work folder."""
    try:
        example = build_example(video_id, path, settings, poses_dir, extractor)
    except VIDEO_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        _log.warning("skipped video %s (%s): %s", video_id, path, reason)
        files.write_bytes(_failure_path(out, video_id), reason.encode("utf-8"))
        return
    files.write_bytes(_part_path(out, split, video_id),
                      records.encode_video(example, image_encoding=settings.image_encoding))


def _finish(out, videos, split_of, settings) -> BuildReport:
    """The shards of each split from the finished videos, then dataset_info.json."""
    skipped = {}
    for video_id in videos:
        if os.path.exists(_failure_path(out, video_id)):
            skipped[video_id] = Path(_failure_path(out, video_id)).read_text(encoding="utf-8")
    written = {s: [v for v in videos if split_of[v] == s and v not in skipped]
               for s in ("train", "test")}
    if not written["train"]:
        raise ValueError(f"no training video could be used ({len(skipped)} skipped: "
                         f"{', '.join(sorted(skipped)[:5])}); see the warnings above")
    info = {"name": DATASET_NAME, "record_format_version": records.FORMAT_VERSION,
            "height": settings.size, "width": settings.size,
            "settings": dataclasses.asdict(settings), "splits": {}, "skipped": skipped}
    for split, ids in written.items():
        if not ids:
            continue
        parts = (Path(_part_path(out, split, v)).read_bytes() for v in ids)
        shards = write_split_shards(out, DATASET_NAME, split, parts, len(ids),
                                    settings.records_per_shard)
        info["splits"][split] = {"num_records": len(ids), "videos": ids,
                                 "files": [os.path.basename(f) for f in shards]}
    layouts = {records.read_header(Path(_part_path(out, s, v)).read_bytes()).layout
               for s, ids in written.items() for v in ids[:1]}
    info["layout"] = sorted(layouts)[0] if len(layouts) == 1 else sorted(layouts)
    # Written last and atomically: its presence marks a complete dataset (trainer.ensure_dataset).
    files.write_json(os.path.join(out, "dataset_info.json"), info, indent=1)
    shutil.rmtree(os.path.join(out, WORK_FOLDER))
    return BuildReport(written=written, skipped=skipped)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", required=True, help="folder of video files / frame folders")
    parser.add_argument("--out", required=True, help="the dataset folder (train.py's data_dir)")
    parser.add_argument("--poses_dir", help="poses per video: <id>.json|.npz|.npy or <id>/")
    parser.add_argument("--detector", help="YOLOX ONNX file (yolox_l.onnx), to extract poses")
    parser.add_argument("--pose_model", help="whole-body ONNX file (dw-ll_ucoco_384.onnx)")
    defaults = BuildSettings()
    parser.add_argument("--size", type=int, default=defaults.size, help="square frame side")
    parser.add_argument("--margin", type=float, default=defaults.margin,
                        help="room around the person, as a fraction of its box")
    parser.add_argument("--frame_step", type=int, default=defaults.frame_step)
    parser.add_argument("--fps", type=float, default=defaults.fps, help="of frame folders")
    parser.add_argument("--test_fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--records_per_shard", type=int, default=defaults.records_per_shard)
    parser.add_argument("--layout", choices=sorted(LAYOUTS),
                        help="the records' keypoint layout: face68 for face videos")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    def run(_):
        settings = BuildSettings(
            size=args.size, margin=args.margin, frame_step=args.frame_step, fps=args.fps,
            test_fraction=args.test_fraction, seed=args.seed, records_per_shard=args.records_per_shard,
            layout=args.layout)
        report = build_dataset(args.videos, args.out, settings, poses_dir=args.poses_dir,
                               detector=args.detector, pose_model=args.pose_model)
        counts = ", ".join(f"{s} {len(v)}" for s, v in report.written.items())
        print(f"wrote {sum(map(len, report.written.values()))} videos ({counts}) to {args.out}; "
              f"skipped {len(report.skipped)}"
              + (f": {', '.join(sorted(report.skipped))}" if report.skipped else ""))

    from consist_jax import cli

    cli.reports_user_errors(run)(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
