"""Files in and out of sampling: reference images, pose inputs, MP4/GIF outputs.

Poses come as a folder of pose images, a video of pose images, or a keypoints file
(anything ``consist_jax.poses.load_poses`` reads), which is rendered with the one
renderer at the model's resolution. Images are centre-cropped to the model's aspect
ratio and resized (PIL bicubic; pose images nearest, so skeleton colours stay exact).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from consist_jax import checks, files
from consist_jax.poses.align import align_poses
from consist_jax.poses.io import load_poses
from consist_jax.poses.keypoints import PoseSequence
from consist_jax.poses.render import render
from consist_jax.poses.sequence import crop_poses, resize_poses

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
KEYPOINT_SUFFIXES = (".json", ".npz", ".npy")


def _center_box(height: int, width: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred (x0, y0, x1, y1) box of the target's aspect ratio."""
    th, tw = target
    scale = min(height / th, width / tw)
    ch, cw = int(round(th * scale)), int(round(tw * scale))
    y0, x0 = (height - ch) // 2, (width - cw) // 2
    return x0, y0, x0 + cw, y0 + ch


def fit_image(image: np.ndarray, resolution: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 resolution + (3,): centre crop to the aspect ratio, resize."""
    from PIL import Image

    x0, y0, x1, y1 = _center_box(image.shape[0], image.shape[1], resolution)
    crop = Image.fromarray(image[y0:y1, x0:x1])
    resample = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(crop.resize((resolution[1], resolution[0]), resample))


def load_image(path: str, what: str = "image") -> np.ndarray:
    """An RGB image file -> uint8 (H, W, 3) at its own size; errors name ``what`` and the path."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from e


def read_image(path: str, resolution: tuple[int, int]) -> np.ndarray:
    """A reference image file -> uint8 (H, W, 3) at ``resolution``."""
    return fit_image(load_image(path, "reference image"), resolution)


def read_keypoints(path: str, resolution: tuple[int, int], height: Optional[int] = None,
                   width: Optional[int] = None) -> PoseSequence:
    """A keypoints file -> PoseSequence on the model's canvas (centre crop + resize)."""
    poses = load_poses(path, height=height, width=width)
    box = _center_box(poses.height, poses.width, resolution)
    return resize_poses(crop_poses(poses, box), *resolution)


def read_pose_images(path: str, resolution: tuple[int, int],
                     canvas: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A folder of pose images or a pose video -> uint8 (F, H, W, 3).

    All frames must share one size, and with ``canvas`` (the reference image's (H, W))
    be of that size: a skeleton drawn on another canvas would not line up with the
    person once both are cropped and resized (pass keypoints to re-target instead).
    """
    import imageio.v3 as iio

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"pose folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        names = [os.path.join(path, f) for f in files]
        frames = [iio.imread(name) for name in names]
    else:
        try:
            frames = list(iio.imiter(path))
        except Exception as e:  # imageio raises several types for undecodable files
            raise ValueError(f"cannot read poses {path!r} as a video: {e}") from e
        names = [f"{path} frame {i}" for i in range(len(frames))]
    if not frames:
        raise ValueError(f"{path!r} holds no frames")
    expected = canvas or frames[0].shape[:2]
    for name, frame in zip(names, frames):
        if frame.shape[:2] != tuple(expected):
            what = "the reference image" if canvas else f"the first pose ({names[0]})"
            raise ValueError(f"pose {name} is {frame.shape[0]}x{frame.shape[1]} (HxW) but {what} is "
                             f"{expected[0]}x{expected[1]}: poses must be drawn on the reference's canvas")
    frames = [f[..., :3] if f.ndim == 3 else np.repeat(f[..., None], 3, -1) for f in frames]
    return np.stack([fit_image(np.asarray(f, np.uint8), resolution, nearest=True) for f in frames])


def read_poses(path: str, resolution: tuple[int, int], *, reference_keypoints: Optional[str] = None,
               align: str = "off", height: Optional[int] = None, width: Optional[int] = None,
               canvas: Optional[tuple[int, int]] = None):
    """Pose input at ``path`` -> (uint8 pose images (F, H, W, 3), PoseSequence or None).

    Keypoint files can be aligned to the reference person (``align``: off | global |
    per_limb), which needs the reference's keypoints; image/video poses cannot.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"poses {path!r} do not exist")
    is_keypoints = os.path.isfile(path) and path.lower().endswith(KEYPOINT_SUFFIXES)
    is_keypoint_folder = os.path.isdir(path) and any(f.endswith(".json") for f in os.listdir(path))
    if not (is_keypoints or is_keypoint_folder):
        if align != "off":
            raise ValueError("--align_poses needs keypoints, not pose images or a pose video")
        return read_pose_images(path, resolution, canvas), None
    poses = read_keypoints(path, resolution, height, width)
    if len(poses) == 0:
        raise ValueError(f"poses {path!r} hold zero frames")
    if align != "off":
        if reference_keypoints is None:
            raise ValueError("aligning poses needs the reference's keypoints (--reference_keypoints)")
        reference = read_keypoints(reference_keypoints, resolution, height, width)
        poses = align_poses(poses, reference, mode=align)
    return render(poses), poses


OUTPUT_SUFFIXES = (".mp4", ".gif")  # and no suffix: a folder of PNG frames
MAX_GIF_FPS = 100.0  # GIF delays are whole centiseconds


def output_suffix(path: str) -> str:
    """".mp4", ".gif" or "" (a folder of PNG frames), lower-case."""
    return os.path.splitext(path.rstrip("/"))[1].lower()


def check_output(path: str, fps: float, fps_name: str = "fps",
                 frame_size: Optional[tuple[int, int]] = None) -> None:
    """Refuses what ``write_video(path, frames, fps)`` could not write, before any work
    (``frame_size``: the frames' (H, W), when known)."""
    suffix = output_suffix(path)
    if suffix and suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path!r}: write .mp4, .gif or a folder of PNGs (no suffix)")
    if suffix == ".gif":
        checks.check_number(fps_name, fps, 0, MAX_GIF_FPS, low_open=True)
    else:
        checks.positive_number(fps_name, fps)
    if suffix and os.path.isdir(path):
        raise FileExistsError(f"output {path!r} is a folder; a {suffix} output needs a file name")
    if not suffix and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output {path!r} is a file; PNG frames (no suffix) go to a folder")
    files.check_can_create(path)
    if suffix == ".mp4" and frame_size is not None and (frame_size[0] % 2 or frame_size[1] % 2):
        raise ValueError(f"output {path!r}: H.264 needs an even frame size, the frames are "
                         f"{frame_size[0]}x{frame_size[1]} (write .gif or PNG frames)")


def _check_frames_read_back(expected: int, exact: bool):
    """A check for files.atomic_path: the video decodes to ``expected`` frames (GIF
    writers merge identical consecutive frames, so a GIF may hold fewer)."""

    def check(tmp: str) -> None:
        import imageio.v3 as iio

        try:
            count = sum(1 for _ in iio.imiter(tmp))
        except Exception as e:  # imageio raises several types for undecodable files
            raise ValueError("the written file does not decode (truncated?)") from e
        if count != expected if exact else not 1 <= count <= expected:
            raise ValueError(f"wrote {expected} frames but {count} read back")

    return check


def write_frames(folder: str, frames: np.ndarray, names: Optional[Sequence[str]] = None) -> None:
    """uint8 (F, H, W, 3) -> folder/000.png, 001.png, ... or ``names`` (lossless, for exact
    comparisons). Each PNG is written atomically and read back (files.atomic_path)."""
    from PIL import Image

    def same_image(frame):
        def check(tmp):
            with Image.open(tmp) as image:
                if not np.array_equal(np.asarray(image), frame):
                    raise ValueError("the PNG does not read back as written")
        return check

    files.ensure_folder(folder)
    names = names or [f"{i:03d}.png" for i in range(len(frames))]
    written = []
    try:
        for name, frame in zip(names, frames):
            with files.atomic_path(os.path.join(folder, name), same_image(frame)) as tmp:
                Image.fromarray(frame).save(tmp)
            written.append(os.path.join(folder, name))
    except files.WriteError:
        for name in written:  # a video is all its frames or none
            os.remove(name)
        raise


def write_video(path: str, frames: np.ndarray, fps: float = 12.0) -> None:
    """uint8 (F, H, W, 3) -> an MP4 (H.264 via imageio-ffmpeg) or GIF, by the suffix, or
    PNG frames when ``path`` has no suffix (a folder).

    Written under a temporary name, its frames counted back, then renamed: on any
    failure (a full disk, ffmpeg refusing) a WriteError names ``path`` and no file is left."""
    from PIL import Image

    if len(frames) == 0:
        raise ValueError(f"output {path!r}: no frames to write")
    check_output(path, fps, frame_size=frames.shape[1:3])
    suffix = output_suffix(path)
    if not suffix:
        write_frames(path, frames)
        return
    with files.atomic_path(path, _check_frames_read_back(len(frames), exact=suffix == ".mp4")) as tmp:
        if suffix == ".gif":
            # PIL directly: imageio's GIF plugin retries a failed save when collected,
            # which would re-create the partial file after atomic_path removed it.
            first, *rest = [Image.fromarray(frame) for frame in frames]
            first.save(tmp, save_all=True, append_images=rest, duration=1000.0 / fps, loop=0)
        else:
            import imageio.v2 as iio2  # the imageio-ffmpeg writer

            # macro_block_size=1 keeps small frames unscaled; libx264 needs even sizes.
            iio2.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=9)


def side_by_side(reference: np.ndarray, poses: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """reference | pose | result per frame: uint8 (F, H, 3W, 3)."""
    refs = np.broadcast_to(reference[None], frames.shape)
    return np.concatenate([refs, poses, frames], axis=2)
