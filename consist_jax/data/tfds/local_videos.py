"""Plain-Python half of the TikTok / UBC Fashion builders: scan a local copy, build records.

No TensorFlow here: the TFDS builders (tiktok.py, ubc_fashion.py) only wrap these
functions, and `write_local_split` writes the same records to ArrayRecord shards
directly (what the tests exercise, and a way to build without TFDS at all).

Local directory layout (one folder per video; file stems tie frames, poses, pose
images and masks together; "natural" order: frame2 before frame10):

    ROOT/
      <video_id>/
        images/*.png|*.jpg     the frames ...            (TikTok's own layout)
        video.mp4              ... or one mp4            (UBC Fashion: move each mp4 here)
        poses/*.json           OpenPose JSON per frame, stem = frame stem (an OpenPose
                               "_keypoints" suffix is ignored) ...
        poses.npz|poses.json   ... or one file for the whole video, T entries (DWPose
                               dumps, keypoints arrays: whatever consist_jax.poses.io
                               .load_poses reads) ...
        pose_images/*.png      ... or pose images rendered elsewhere, stem = frame stem,
        pose_video.mp4         ... or as one mp4
        masks/*.png            optional person masks (nonzero = person), stem = frame stem
      splits/train.txt, splits/test.txt   optional split lists (splits.py)

Face videos (face reenactment): ``BuildOptions(layout="face68")`` keeps the 68 face
landmarks of whole-body (DWPose) poses, or takes 68-point pose files as they are; the
records' layout is then ``face68``.

Keypoints are preferred to pose images when both exist (the pipeline renders them at
its output resolution and can flip them). A frame whose OpenPose JSON is absent or
shows no person (every confidence 0) is stored as a missing pose (all-NaN keypoints);
the pipeline then refuses clips that use that frame. Pose images must cover every frame.

Which videos form which split: consist_jax.data.tfds.splits.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from consist_jax import videos
from consist_jax.data import records
from consist_jax.data.shards import write_split_shards
from consist_jax.images import to_uint8
from consist_jax.poses.io import load_poses, natural_key
from consist_jax.poses.keypoints import convert_layout

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
OPENPOSE_SUFFIX = "_keypoints"


@dataclasses.dataclass(frozen=True)
class LocalVideo:
    """Where one video's parts are. Exactly one of frames_dir / frames_mp4 is set."""

    video_id: str
    frames_dir: Path | None = None
    frames_mp4: Path | None = None
    pose_dir: Path | None = None        # per-frame OpenPose JSON
    pose_file: Path | None = None       # whole-video pose file
    pose_images_dir: Path | None = None
    pose_images_mp4: Path | None = None
    masks_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a local video becomes a record.

    frame_step: keep every n-th frame (fps is divided accordingly).
    resize_short_side: resize frames (and everything with them) so the short side has
      this many pixels; None keeps the source size.
    image_encoding: "png" (default: real frames are large) or "raw".
    layout: the records' keypoint layout (``face68`` for face videos; see
      consist_jax.poses.keypoints.convert_layout), None keeps the pose files' own.
    """

    fps: float = 30.0
    frame_step: int = 1
    resize_short_side: int | None = None
    image_encoding: str = "png"
    layout: str | None = None


# ----------------------------------------------------------------------------- scanning

def scan_local_videos(root: str | os.PathLike) -> list[LocalVideo]:
    """Every video folder under root (layout in the module docstring), sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    videos = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and p.name != "splits"),
                         key=lambda p: natural_key(p.name)):
        video = _scan_video_folder(folder)
        if video is not None:
            videos.append(video)
    if not videos:
        raise FileNotFoundError(f"{root}: no video folders (<id>/images/ or <id>/video.mp4)")
    return videos


def _scan_video_folder(folder: Path) -> LocalVideo | None:
    def existing(name):
        path = folder / name
        return path if path.exists() else None

    frames_dir, frames_mp4 = existing("images"), existing("video.mp4")
    if frames_dir is None and frames_mp4 is None:
        return None
    pose_file = existing("poses.npz") or existing("poses.json")
    pose_dir = existing("poses")
    video = LocalVideo(
        video_id=folder.name, frames_dir=frames_dir, frames_mp4=None if frames_dir else frames_mp4,
        pose_dir=pose_dir if pose_dir and pose_dir.is_dir() else None,
        pose_file=pose_file, pose_images_dir=existing("pose_images"),
        pose_images_mp4=existing("pose_video.mp4"), masks_dir=existing("masks"))
    if not (video.pose_dir or video.pose_file or video.pose_images_dir or video.pose_images_mp4):
        raise FileNotFoundError(f"{folder}: no poses (poses/, poses.npz|json, pose_images/ "
                                f"or pose_video.mp4)")
    return video


# ----------------------------------------------------------------------------- one video

def build_video_example(video: LocalVideo, options: BuildOptions = BuildOptions(),
                        identity_id: str | None = None) -> records.VideoExample:
    """Reads one local video into a VideoExample (keypoints in pixels of the stored frames)."""
    frames, stems = _read_frames(video)
    height, width = frames.shape[1:3]
    keypoints, layout, pose_images = None, None, None
    if video.pose_dir or video.pose_file:
        keypoints, layout = _read_keypoints(video, stems, height, width, options.layout)
    else:
        pose_images = _read_images(video.pose_images_dir, video.pose_images_mp4, stems,
                                   "pose image", video.video_id)
        layout = records.NO_KEYPOINTS_LAYOUT
    masks = None
    if video.masks_dir:
        masks = (_read_images(video.masks_dir, None, stems, "mask", video.video_id, gray=True) > 0
                 ).astype(np.uint8)
    keep = slice(None, None, options.frame_step)
    example = records.VideoExample(
        frames=frames[keep], video_id=video.video_id,
        identity_id=identity_id or video.video_id, layout=layout,
        fps=options.fps / options.frame_step,
        keypoints=None if keypoints is None else keypoints[keep],
        pose_images=None if pose_images is None else pose_images[keep],
        masks=None if masks is None else masks[keep])
    if options.resize_short_side:
        example = resize_example(example, options.resize_short_side)
    return example


def resize_example(example: records.VideoExample, short_side: int) -> records.VideoExample:
    """Resizes every image array so the short side is `short_side`; keypoints follow."""
    height, width = example.frames.shape[1:3]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL's (w, h)

    def resized(images, resample):
        if images is None:
            return None
        return np.stack([np.asarray(Image.fromarray(i).resize(size, resample)) for i in images])

    keypoints = example.keypoints
    if keypoints is not None:
        keypoints = keypoints.copy()
        # Pixel centres at integer coordinates: scale about the image corner (-0.5, -0.5).
        keypoints[..., 0] = (keypoints[..., 0] + 0.5) * (size[0] / width) - 0.5
        keypoints[..., 1] = (keypoints[..., 1] + 0.5) * (size[1] / height) - 0.5
    return dataclasses.replace(
        example, frames=resized(example.frames, Image.BILINEAR), keypoints=keypoints,
        pose_images=resized(example.pose_images, Image.BILINEAR),
        masks=resized(example.masks, Image.NEAREST),
        region_masks=resized(example.region_masks, Image.NEAREST))


def _read_image(path, mode: str) -> np.ndarray:
    """One frame, mask or pose image file -> uint8, 16-bit files scaled (images.to_uint8)."""
    with Image.open(path) as image:
        return to_uint8(image, str(path), mode)


def _read_frames(video: LocalVideo) -> tuple[np.ndarray, list[str]]:
    """(T, H, W, 3) uint8 frames and their stems (mp4 frames are named 0, 1, ...)."""
    if video.frames_mp4 is not None:
        frames = _read_mp4(video.frames_mp4)
        return frames, [str(i) for i in range(len(frames))]
    files = _image_files(video.frames_dir)
    if not files:
        raise FileNotFoundError(f"{video.frames_dir}: no frames ({', '.join(FRAME_SUFFIXES)})")
    frames = [_read_image(f, "RGB") for f in files]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{video.frames_dir}: frames of different sizes {sorted(shapes)}")
    return np.stack(frames), [f.stem for f in files]


def _read_keypoints(video: LocalVideo, stems: list[str], height: int, width: int,
                    layout: str | None = None):
    """(T, K, 3) float32 with NaN rows for missing poses, and the layout name (``layout``
    when given: the poses converted to it)."""
    if video.pose_file is not None:
        poses = load_poses(video.pose_file, height=height, width=width)
        if poses.num_frames != len(stems):
            raise ValueError(f"{video.pose_file}: {poses.num_frames} pose frames for "
                             f"{len(stems)} video frames (video {video.video_id!r})")
        poses = convert_layout(poses, layout or poses.layout)
        points = np.array(poses.points)
    else:
        points, poses = _read_openpose_folder(video, stems, height, width)
        if layout is not None:  # a missing frame (NaN) has confidence 0, made NaN again below
            poses = convert_layout(poses.replace(points=np.nan_to_num(points)), layout)
            points = np.array(poses.points)
    # No person (or, for face68, no face) detected -- every confidence 0 -- is a missing
    # pose, not an empty one.
    undetected = ~np.any(points[..., 2] > 0, axis=-1)
    points[undetected] = np.nan
    return points, poses.layout


def _read_openpose_folder(video: LocalVideo, stems: list[str], height: int, width: int):
    files = sorted(video.pose_dir.glob("*.json"), key=lambda p: natural_key(p.name))
    by_stem = {_pose_stem(f): f for f in files}
    unknown = sorted(set(by_stem) - set(stems))
    if unknown:
        raise ValueError(f"{video.pose_dir}: pose files without a frame, e.g. {unknown[:3]}")
    poses = load_poses(video.pose_dir, height=height, width=width)  # natural order of files
    points = np.full((len(stems), poses.num_keypoints, 3), np.nan, np.float32)
    row_of_stem = {_pose_stem(f): row for row, f in enumerate(files)}
    for frame, stem in enumerate(stems):
        if stem in row_of_stem:
            points[frame] = poses.points[row_of_stem[stem]]
    return points, poses


def _pose_stem(path: Path) -> str:
    stem = path.stem
    return stem[:-len(OPENPOSE_SUFFIX)] if stem.endswith(OPENPOSE_SUFFIX) else stem


def _read_images(folder: Path | None, mp4: Path | None, stems: list[str], what: str,
                 video_id: str, gray: bool = False) -> np.ndarray:
    """Images matching the frame stems, (T, H, W, 3) uint8 or (T, H, W) with gray."""
    if folder is None:
        images = _read_mp4(mp4)
        if len(images) != len(stems):
            raise ValueError(f"{mp4}: {len(images)} {what}s for {len(stems)} frames")
        return images[..., 0] if gray else images
    files = {f.stem: f for f in _image_files(folder)}
    missing = [s for s in stems if s not in files]
    if missing:
        raise FileNotFoundError(f"{folder}: no {what} for frame(s) {missing[:3]} of video "
                                f"{video_id!r} ({len(missing)} missing)")
    return np.stack([_read_image(files[s], "L" if gray else "RGB") for s in stems])


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def _read_mp4(path: Path) -> np.ndarray:
    return videos.read_frames(os.fspath(path))  # every frame, or an error naming the frame


# ----------------------------------------------------------------------------- writing

def encoded_examples(videos: Iterable[LocalVideo], options: BuildOptions) -> Iterator[tuple[str, bytes]]:
    """(video_id, record bytes) per video, in order."""
    for video in videos:
        example = build_video_example(video, options)
        yield video.video_id, records.encode_video(example, image_encoding=options.image_encoding)


def write_local_split(videos: Sequence[LocalVideo], out_dir: str, name: str, split: str,
                      options: BuildOptions, records_per_shard: int = 16) -> list[str]:
    """Writes a split's records as ArrayRecord shards (same files the TFDS build makes,
    minus the tf.train.Example envelope, which the pipeline accepts either way)."""
    os.makedirs(out_dir, exist_ok=True)
    encoded = (record for _, record in encoded_examples(videos, options))
    return write_split_shards(out_dir, name, split, encoded, len(videos), records_per_shard)


def select_videos(videos: Sequence[LocalVideo], ids: Sequence[str]) -> list[LocalVideo]:
    by_id = {v.video_id: v for v in videos}
    return [by_id[i] for i in ids]
