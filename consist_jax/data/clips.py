"""From one video record to one training clip: pure numpy functions, no grain.

A clip is F target frames taken with a stride from one video, plus one reference
frame of the same video. The same crop, resize and horizontal flip is applied to
frames, masks and keypoints; pose images are then rendered from the transformed
keypoints at the output resolution by the project's one renderer
(consist_jax.poses.render). A flip mirrors x and swaps the person's left and right
(the layout's flip permutation), so a flipped clip's pose image is what the renderer
draws for the mirrored person, colours by side included.

Coordinates: keypoints are in pixels with pixel centres at integer coordinates (the
renderer's convention). A crop box is in continuous image coordinates, where pixel
i spans [i, i + 1) (Pillow's convention), hence the half-pixel shifts below.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from consist_jax.data import records
from consist_jax.data.source import RawVideoRecord
from consist_jax.poses.layouts import get_layout
from consist_jax.poses.render import draw_skeletons

REFERENCE_POLICIES = ("any", "outside")


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """How clips are cut and augmented. Sizes in pixels.

    clip_length: F target frames (1 for the image stage).
    frame_stride: distance between consecutive target frames in the video.
    reference_policy: "any" frame of the video, or only frames "outside" the clip's span.
    crop_scale: the crop's side as a fraction of the largest crop of the output's
      aspect ratio, drawn uniformly in this range; (1, 1) keeps the whole short side.
    center_crop: centre the crop instead of placing it at random (evaluation).
    flip_probability: chance of a horizontal flip (records without keypoints are never
      flipped: a mirrored pose image would have its left/right colours swapped wrong).
    with_region_mask: emit `region_mask` (try-on); a record without one is a bad example.
    """

    clip_length: int = 16
    frame_stride: int = 1
    reference_policy: str = "any"
    height: int = 64
    width: int = 64
    crop_scale: tuple = (0.8, 1.0)
    center_crop: bool = False
    flip_probability: float = 0.5
    pose_confidence_threshold: float = 0.3
    pose_stroke_scale: float = 1.0
    with_region_mask: bool = False

    def __post_init__(self):
        if self.reference_policy not in REFERENCE_POLICIES:
            raise ValueError(f"reference_policy must be one of {REFERENCE_POLICIES}, "
                             f"got {self.reference_policy!r}")
        if self.clip_length < 1 or self.frame_stride < 1:
            raise ValueError("clip_length and frame_stride must be >= 1")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


@dataclasses.dataclass(frozen=True)
class BadExample:
    """A record that could not become a clip; the pipeline raises or skips it."""

    index: int
    where: str
    video_id: str | None
    reason: str

    def message(self) -> str:
        # No video id: the record's header did not parse (its reason may still name the id).
        video = f", video {self.video_id!r}" if self.video_id is not None else ""
        return f"bad example: {self.where}{video}: {self.reason}"


class ClipError(ValueError):
    """The video cannot provide the requested clip (too short, missing pose, ...)."""


# ----------------------------------------------------------------------------- sampling

def sample_frame_indices(num_frames: int, options: ClipOptions,
                         rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Draws the clip's frame indices (F,) int32 and the reference frame index."""
    span = (options.clip_length - 1) * options.frame_stride + 1
    if num_frames < span:
        raise ClipError(f"video has {num_frames} frames, a clip of {options.clip_length} "
                        f"with stride {options.frame_stride} needs {span}")
    start = int(rng.integers(0, num_frames - span + 1))
    clip = (start + options.frame_stride * np.arange(options.clip_length)).astype(np.int32)
    if options.reference_policy == "any":
        return clip, int(rng.integers(0, num_frames))
    outside = num_frames - span
    if outside == 0:
        raise ClipError(f"video has {num_frames} frames, none outside a clip spanning {span}")
    draw = int(rng.integers(0, outside))
    return clip, draw if draw < start else draw + span


def sample_crop_box(height: int, width: int, options: ClipOptions,
                    rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) crop with the output's aspect ratio, inside a (height, width) image."""
    aspect = options.width / options.height
    full_w, full_h = (height * aspect, height) if width / height >= aspect else (width, width / aspect)
    scale = rng.uniform(*options.crop_scale)
    crop_w, crop_h = full_w * scale, full_h * scale
    position = np.full(2, 0.5) if options.center_crop else rng.uniform(0, 1, 2)
    x0 = position[0] * (width - crop_w)
    y0 = position[1] * (height - crop_h)
    return float(x0), float(y0), float(x0 + crop_w), float(y0 + crop_h)


# ----------------------------------------------------------------------------- transforms

def crop_resize(images: np.ndarray, box, height: int, width: int, *, nearest: bool = False) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, height, width[, C]): the crop box resized to the output."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    out = [np.asarray(Image.fromarray(image).resize((width, height), resample, box=box))
           for image in images]
    return np.stack(out) if out else np.zeros((0, height, width) + images.shape[3:], np.uint8)


def crop_resize_keypoints(keypoints: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """(N, K, 3) keypoints in source pixels -> in output pixels of the crop box."""
    x0, y0, x1, y1 = box
    out = keypoints.astype(np.float32, copy=True)
    out[..., 0] = (keypoints[..., 0] + 0.5 - x0) * (width / (x1 - x0)) - 0.5
    out[..., 1] = (keypoints[..., 1] + 0.5 - y0) * (height / (y1 - y0)) - 0.5
    return out


def flip_keypoints(keypoints: np.ndarray, width: int, flip_permutation: np.ndarray) -> np.ndarray:
    """(N, K, 3) -> mirrored in x on a `width`-pixel image, left and right points swapped."""
    out = keypoints[:, flip_permutation].copy()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def flip_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, ...) -> mirrored left-right (a view: batching copies it anyway)."""
    return images[:, :, ::-1]


def render_poses(keypoints: np.ndarray, layout: str, options: ClipOptions) -> np.ndarray:
    """(N, K, 3) output-pixel keypoints -> (N, height, width, 3) uint8 pose images."""
    return draw_skeletons(keypoints, layout, options.height, options.width,
                          confidence_threshold=options.pose_confidence_threshold,
                          stroke_scale=options.pose_stroke_scale)


# ----------------------------------------------------------------------------- one clip

def make_clip(record: RawVideoRecord, options: ClipOptions,
              rng: np.random.Generator) -> dict | BadExample:
    """A record -> one clip (uint8 arrays, see pipeline.py) or a BadExample saying why not."""
    if record.data is None:
        return BadExample(record.index, record.where(), None, f"unreadable record: {record.read_error}")
    video_id = None
    try:
        header = records.read_header(record.data)
        video_id = header.video_id
        clip_indices, reference_index = sample_frame_indices(header.num_frames, options, rng)
        box = sample_crop_box(header.height, header.width, options, rng)
        flip = bool(rng.uniform() < options.flip_probability)
        video_frames = np.concatenate([[reference_index], clip_indices]).astype(np.int32)
        video = records.decode_video(record.data, video_frames)
        return _assemble_clip(record.index, video, video_frames, box, flip, options)
    except (records.RecordError, ClipError) as error:
        return BadExample(record.index, record.where(), video_id, str(error))


def _check_clip_inputs(video: records.VideoExample, options: ClipOptions,
                       video_frames: np.ndarray) -> None:
    """Raises ClipError for what would make a wrong clip; video_frames: (F+1,) indices."""
    if options.with_region_mask and video.region_masks is None:
        raise ClipError("record has no region mask (with_region_mask is on)")
    if video.keypoints is not None:
        missing = records.frames_with_missing_pose(video.keypoints)
        if missing.size:
            raise ClipError(f"missing pose for frame(s) {sorted(set(video_frames[missing].tolist()))}")
        try:
            layout = get_layout(video.layout)
        except ValueError as error:
            raise ClipError(str(error)) from error
        if video.keypoints.shape[1] != layout.num_keypoints:
            raise ClipError(f"{video.keypoints.shape[1]} keypoints per frame, layout "
                            f"{layout.name!r} has {layout.num_keypoints}")


def _assemble_clip(index: int, video: records.VideoExample, video_frames: np.ndarray,
                   box, flip: bool, options: ClipOptions) -> dict:
    """`video` holds the frames video_frames (F+1,): the reference, then the clip."""
    _check_clip_inputs(video, options, video_frames)
    height, width = options.height, options.width
    frames = crop_resize(video.frames, box, height, width)
    masks = (crop_resize(video.masks, box, height, width, nearest=True) if video.masks is not None
             else np.ones(frames.shape[:3], np.uint8))
    region = (crop_resize(video.region_masks, box, height, width, nearest=True)
              if options.with_region_mask else None)
    if video.keypoints is not None:
        layout = get_layout(video.layout)
        keypoints = crop_resize_keypoints(video.keypoints, box, height, width)
        if flip:
            keypoints = flip_keypoints(keypoints, width, layout.flip_permutation)
            frames, masks = flip_images(frames), flip_images(masks)
            region = flip_images(region) if region is not None else None
        poses = render_poses(keypoints, layout.name, options)
    else:
        poses = crop_resize(video.pose_images, box, height, width)
    clip = {
        "reference": frames[0], "reference_pose": poses[0],
        "target": frames[1:], "target_pose": poses[1:], "target_mask": masks[1:, ..., None],
        "video_index": np.int64(index), "frame_indices": video_frames[1:],
        "reference_frame_index": video_frames[0],
    }
    if region is not None:
        clip["region_mask"] = region[1:, ..., None]
    return clip
