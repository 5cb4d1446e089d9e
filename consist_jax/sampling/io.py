"""Files in and out of sampling: reference images, pose inputs, MP4/GIF outputs.

Poses come as a folder of pose images, a video of pose images, or a keypoints file
(anything ``consist_jax.poses.load_poses`` reads), which is rendered with the one
renderer at the model's resolution. Images are centre-cropped to the model's aspect
ratio and resized (PIL bicubic; pose images nearest, so skeleton colours stay exact).

Inputs are decoded faithfully or refused: 16-bit images are scaled to 8 bits, a reference
too small for the model is an error, and a video ffmpeg cannot fully decode is an error
naming the file and frame (never garbage frames).
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Optional, Sequence

import numpy as np

from consist_jax import checks, files
from consist_jax.images import to_uint8
from consist_jax.poses.align import align_poses
from consist_jax.poses.io import count_off_canvas, load_poses
from consist_jax.poses.keypoints import PoseSequence
from consist_jax.poses.render import render
from consist_jax.poses.sequence import crop_poses, resize_poses

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KEYPOINT_SUFFIXES = (".json", ".npz", ".npy")
MAX_UPSCALE = 4  # a reference's centre crop is enlarged at most this much per side
VIDEO_FRAME_SLACK = 0.05  # decoded frames may fall this far short of the header's count


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
    """An image file -> uint8 (H, W, 3) RGB at its own size, whatever its bit depth and
    colour mode; errors name ``what`` and the path."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with Image.open(path) as image:
            return to_uint8(image, path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from e


def check_reference_size(path: str, size: tuple[int, int], resolution: tuple[int, int]) -> None:
    """Refuses a reference whose centre crop would be enlarged more than ``MAX_UPSCALE`` times
    per side to reach the model's ``resolution`` (a 1x1 reference holds no person)."""
    x0, y0, x1, y1 = _center_box(size[0], size[1], resolution)
    crop = (y1 - y0, x1 - x0)
    need = tuple(-(-side // MAX_UPSCALE) for side in resolution)
    if crop[0] < need[0] or crop[1] < need[1]:
        raise ValueError(f"reference image {path!r} is {size[0]}x{size[1]} (HxW), too small for the "
                         f"model's {resolution[0]}x{resolution[1]}: its centre crop {crop[0]}x{crop[1]} "
                         f"must be at least {need[0]}x{need[1]} (enlarged at most {MAX_UPSCALE}x)")


def read_reference(path: str, resolution: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A reference image file -> (uint8 (H, W, 3) at ``resolution``, its own (H, W) canvas)."""
    image = load_image(path, "reference image")
    check_reference_size(path, image.shape[:2], resolution)
    return fit_image(image, resolution), image.shape[:2]


def read_image(path: str, resolution: tuple[int, int]) -> np.ndarray:
    """A reference image file -> uint8 (H, W, 3) at ``resolution``."""
    return read_reference(path, resolution)[0]


def read_keypoints(path: str, resolution: tuple[int, int], height: Optional[int] = None,
                   width: Optional[int] = None, canvas: Optional[tuple[int, int]] = None) -> PoseSequence:
    """A keypoints file -> PoseSequence on the model's canvas (centre crop + resize).

    ``canvas`` (the reference image's (H, W)) is the image size of a file that records none.
    """
    poses = load_poses(path, height=height, width=width, default_size=canvas)
    box = _center_box(poses.height, poses.width, resolution)
    cropped = crop_poses(poses, box)
    off, shown = count_off_canvas(cropped)
    emptied = np.nonzero((shown > 0) & (off == shown))[0]
    if len(emptied):  # it would render as a blank frame
        raise ValueError(f"{path}: frame {emptied[0]}: the person lies wholly outside the centre "
                         f"crop (x {box[0]}..{box[2]}, y {box[1]}..{box[3]}) of the "
                         f"{poses.height}x{poses.width} canvas to the model's "
                         f"{resolution[0]}x{resolution[1]}; crop the poses around the person first "
                         f"(consist_jax.poses.crop_around_person)")
    return resize_poses(cropped, *resolution)


def _first_error(stderr: str) -> str:
    """ffmpeg's first error line, without its "[h264 @ 0x55...]" address."""
    line = stderr.strip().splitlines()[0] if stderr.strip() else "no message"
    return re.sub(r" @ 0x[0-9a-f]+", "", line)


def _decode_video(path: str) -> np.ndarray:
    """A video file -> uint8 (F, H, W, 3) via ffmpeg, refusing anything it could not decode.

    ffmpeg stops at the first decoding error (``-xerror``; one thread, so frames come out in
    order): the error names the file and the frame it reached. A clean decode that yields
    fewer frames than the header's duration x fps promises is an error too.
    """
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        reader.close()
    except (OSError, RuntimeError, StopIteration) as e:
        lines = [line for line in str(e).splitlines() if "error" in line.lower()]
        reason = _first_error(lines[0] if lines else str(e))
        raise ValueError(f"cannot read poses {path!r} as a video: {reason}") from None
    width, height = meta["size"]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-threads", "1",
               "-xerror", "-i", path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    result = subprocess.run(command, capture_output=True)
    count = len(result.stdout) // (height * width * 3)
    errors = result.stderr.decode(errors="replace")
    if result.returncode != 0 or errors.strip():
        raise ValueError(f"pose video {path!r} is corrupt: decoding failed at frame {count} "
                         f"(ffmpeg: {_first_error(errors)})")
    promised = int(round(meta["fps"] * meta["duration"])) if meta.get("fps") and meta.get("duration") else 0
    if count < promised - max(1, int(VIDEO_FRAME_SLACK * promised)):
        raise ValueError(f"pose video {path!r} decoded to {count} frames but its header promises "
                         f"{promised} ({meta['duration']} s at {meta['fps']} fps): frames from {count} "
                         f"on are missing")
    frames = np.frombuffer(result.stdout, np.uint8)[:count * height * width * 3]
    return frames.reshape(count, height, width, 3)


def _read_gif(path: str) -> np.ndarray:
    """An animated GIF -> uint8 (F, H, W, 3)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as gif:
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read poses {path!r} as a GIF: {e}") from e


def read_pose_images(path: str, resolution: tuple[int, int],
                     canvas: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A folder of pose images, one pose image, or a pose video -> uint8 (F, H, W, 3).

    All frames must share one size, and with ``canvas`` (the reference image's (H, W))
    be of that size: a skeleton drawn on another canvas would not line up with the
    person once both are cropped and resized (pass keypoints to re-target instead).
    """
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"pose folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        names = [os.path.join(path, f) for f in files]
        frames = [load_image(name, "pose image") for name in names]
    else:
        if path.lower().endswith(IMAGE_SUFFIXES):
            frames = [load_image(path, "pose image")]
        elif path.lower().endswith(".gif"):
            frames = list(_read_gif(path))
        else:
            frames = list(_decode_video(path))
        names = [f"{path} frame {i}" for i in range(len(frames))]
    if not frames:
        raise ValueError(f"{path!r} holds no frames")
    expected = canvas or frames[0].shape[:2]
    for name, frame in zip(names, frames):
        if frame.shape[:2] != tuple(expected):
            what = "the reference image" if canvas else f"the first pose ({names[0]})"
            raise ValueError(f"pose {name} is {frame.shape[0]}x{frame.shape[1]} (HxW) but {what} is "
                             f"{expected[0]}x{expected[1]}: poses must be drawn on the reference's canvas")
    return np.stack([fit_image(f, resolution, nearest=True) for f in frames])


def read_poses(path: str, resolution: tuple[int, int], *, reference_keypoints: Optional[str] = None,
               align: str = "off", height: Optional[int] = None, width: Optional[int] = None,
               canvas: Optional[tuple[int, int]] = None):
    """Pose input at ``path`` -> (uint8 pose images (F, H, W, 3), PoseSequence or None).

    ``canvas`` is the reference image's (H, W): pose images must be drawn on it, and a
    keypoints file that records no image size is taken to be on it. Keypoint files can
    be aligned to the reference person (``align``: off | global | per_limb), which needs
    the reference's keypoints; image/video poses cannot.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"poses {path!r} do not exist")
    is_keypoints = os.path.isfile(path) and path.lower().endswith(KEYPOINT_SUFFIXES)
    is_keypoint_folder = os.path.isdir(path) and any(f.endswith(".json") for f in os.listdir(path))
    if not (is_keypoints or is_keypoint_folder):
        if align != "off":
            raise ValueError("--align_poses needs keypoints, not pose images or a pose video")
        return read_pose_images(path, resolution, canvas), None
    poses = read_keypoints(path, resolution, height, width, canvas)
    if len(poses) == 0:
        raise ValueError(f"poses {path!r} hold zero frames")
    if align != "off":
        if reference_keypoints is None:
            raise ValueError("aligning poses needs the reference's keypoints (--reference_keypoints)")
        reference = read_keypoints(reference_keypoints, resolution, height, width, canvas)
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
