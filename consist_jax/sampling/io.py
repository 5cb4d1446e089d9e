"""Files in and out of sampling: reference images, pose inputs, MP4/GIF outputs.

Poses come as a folder of pose images, a video of pose images, or a keypoints file
(anything ``consist_jax.poses.load_poses`` reads), which is rendered with the one
renderer at the model's resolution. Each input is fitted to the model's aspect ratio
around its person (``fit_box``): cut out when the person fits, else padded (white around
a photo, black around a skeleton), never squashed; then resized (PIL bicubic; pose images
nearest, so skeleton colours stay exact). A reference and poses of different canvases
(a photo and another person's video) are fitted each on its own (``read_sample_inputs``).

Inputs are decoded faithfully or refused: photos are turned upright (EXIF orientation),
transparency is composited (a warning says so), 16-bit images are scaled to 8 bits, a
reference too small for the model or too far from its aspect ratio is an error, and a
video ffmpeg cannot fully decode is an error naming the file and frame (never garbage frames).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from consist_jax import checks, files, videos
from consist_jax.images import IMAGE_SUFFIXES, flatten_alpha, has_alpha, to_uint8, upright
from consist_jax.poses.align import align_poses
from consist_jax.poses.io import KEYPOINT_SUFFIXES, count_off_canvas, load_poses
from consist_jax.poses.keypoints import PoseSequence
from consist_jax.poses.render import render
from consist_jax.poses.sequence import crop_poses, person_box, resize_poses

MAX_UPSCALE = 4  # a reference's fitted box is enlarged at most this much per side
MAX_PAD_FRACTION = 0.5  # at most this share of a fitted side may be padding
PERSON_MARGIN = 0.1  # the person's box grows by this share of its size on each side
DRAWN_LEVEL = 16  # a pose image's pixel brighter than this is drawn (above video noise)
REFERENCE_FILL, POSE_FILL = 255, 0  # padding: white around a photo, black around a skeleton
_log = logging.getLogger(__name__)


def fit_box(height: int, width: int, resolution: tuple[int, int],
            person: Optional[tuple[int, int, int, int]] = None) -> tuple[int, int, int, int]:
    """The (x0, y0, x1, y1) box of the model's aspect ratio that a (height, width) image is
    fitted to, around ``person`` (a box; None: the whole image, nothing may be cut).

    The largest such box inside the image that holds the person, slid to centre it when
    there is room; when none holds the person, the smallest box around the person, centred
    on it, which reaches past the image (that part is padded): never a squash.
    """
    th, tw = resolution
    px0, py0, px1, py1 = person or (0, 0, width, height)
    inside = min(height / th, width / tw)
    if th * inside >= py1 - py0 - 0.5 and tw * inside >= px1 - px0 - 0.5:
        ch, cw = min(height, round(th * inside)), min(width, round(tw * inside))
        x0 = min(max(round((px0 + px1 - cw) / 2), 0), width - cw)
        y0 = min(max(round((py0 + py1 - ch) / 2), 0), height - ch)
    else:
        around = max((py1 - py0) / th, (px1 - px0) / tw)
        ch, cw = round(th * around), round(tw * around)
        x0, y0 = round((px0 + px1 - cw) / 2), round((py0 + py1 - ch) / 2)
    return x0, y0, x0 + cw, y0 + ch


def _union(a, b):
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def crop_or_pad(image: np.ndarray, box: tuple[int, int, int, int], fill: int) -> np.ndarray:
    """uint8 (H, W, C) -> the ``box`` (x0, y0, x1, y1) of it; what lies outside is ``fill``."""
    x0, y0, x1, y1 = box
    out = np.full((y1 - y0, x1 - x0) + image.shape[2:], fill, image.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y1, image.shape[0]), min(x1, image.shape[1])
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def fit_image(image: np.ndarray, resolution: tuple[int, int], nearest: bool = False,
              box: Optional[tuple[int, int, int, int]] = None, fill: int = POSE_FILL) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 resolution + (3,): the ``box`` (default: ``fit_box`` of the
    whole image) cut out or padded with ``fill``, then resized (bicubic; nearest keeps a
    skeleton's colours exact)."""
    from PIL import Image

    box = box or fit_box(image.shape[0], image.shape[1], resolution)
    crop = Image.fromarray(crop_or_pad(image, box, fill))
    resample = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(crop.resize((resolution[1], resolution[0]), resample))


def load_image(path: str, what: str = "image", background: int = POSE_FILL) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB at its own size, upright (EXIF orientation),
    whatever its bit depth and colour mode, transparency composited onto ``background``
    (a grey level; said in a warning); errors name ``what`` and the path."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with Image.open(path) as image:
            image = upright(image)
            if has_alpha(image):
                _log.warning("%s %r has transparency: composited on %s", what, path,
                             {255: "white", 0: "black"}.get(background, f"grey {background}"))
            return to_uint8(flatten_alpha(image, background), path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from e


def minimum_size(resolution: tuple[int, int]) -> tuple[int, int]:
    """The smallest (H, W) fitted to the model's ``resolution``: enlarged at most ``MAX_UPSCALE`` times."""
    return tuple(-(-side // MAX_UPSCALE) for side in resolution)


def check_image_size(what: str, size: tuple[int, int], resolution: tuple[int, int]) -> None:
    """Refuses an image smaller than ``minimum_size`` on a side (a 1x1 reference holds no
    person), before anything drawn on its canvas is read."""
    need = minimum_size(resolution)
    if size[0] < need[0] or size[1] < need[1]:
        raise ValueError(f"{what} is {size[0]}x{size[1]} (HxW), too small for the model's "
                         f"{resolution[0]}x{resolution[1]}: it must be at least {need[0]}x{need[1]} "
                         f"(enlarged at most {MAX_UPSCALE}x)")


def check_fit(what: str, size: tuple[int, int], box: tuple[int, int, int, int],
              resolution: tuple[int, int]) -> None:
    """Refuses a fit that would enlarge the box more than ``MAX_UPSCALE`` times per side (a
    1x1 reference holds no person) or make more than ``MAX_PAD_FRACTION`` of a side padding
    (an aspect ratio too far from the model's)."""
    x0, y0, x1, y1 = box
    fitted = (y1 - y0, x1 - x0)
    need = minimum_size(resolution)
    shape = f"{what} is {size[0]}x{size[1]} (HxW)"
    if fitted[0] < need[0] or fitted[1] < need[1]:
        raise ValueError(f"{shape}, too small for the model's {resolution[0]}x{resolution[1]}: the part "
                         f"fitted to it, {fitted[0]}x{fitted[1]}, must be at least {need[0]}x{need[1]} "
                         f"(enlarged at most {MAX_UPSCALE}x)")
    kept = (min(y1, size[0]) - max(y0, 0), min(x1, size[1]) - max(x0, 0))
    if min(k / f for k, f in zip(kept, fitted)) < 1 - MAX_PAD_FRACTION:
        raise ValueError(f"{shape}: fitting it to the model's aspect ratio ({resolution[0]}x{resolution[1]}) "
                         f"would make over {MAX_PAD_FRACTION:.0%} of it padding; crop it around the person first")


def check_reference_size(path: str, size: tuple[int, int], resolution: tuple[int, int]) -> None:
    """``check_fit`` of a whole reference image (see ``fit_box``)."""
    check_fit(f"reference image {path!r}", size, fit_box(size[0], size[1], resolution), resolution)


def read_reference(path: str, resolution: tuple[int, int],
                   person: Optional[tuple[int, int, int, int]] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """A reference image file -> (uint8 (H, W, 3) at ``resolution``, its own (H, W) canvas),
    fitted around ``person`` (a box; None: the whole image) and padded with white."""
    image = load_image(path, "reference image", REFERENCE_FILL)
    box = fit_box(image.shape[0], image.shape[1], resolution, person)
    check_fit(f"reference image {path!r}", image.shape[:2], box, resolution)
    return fit_image(image, resolution, box=box, fill=REFERENCE_FILL), image.shape[:2]


def read_image(path: str, resolution: tuple[int, int]) -> np.ndarray:
    """A reference image file -> uint8 (H, W, 3) at ``resolution``."""
    return read_reference(path, resolution)[0]


def keypoints_person(poses: PoseSequence) -> Optional[tuple[int, int, int, int]]:
    """The box around every visible point of every frame (None when none is visible)."""
    if not poses.visible().any():
        return None
    return person_box(poses, margin=PERSON_MARGIN, square=False)


def drawn_person(frames: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """The box around what is drawn on pose images uint8 (F, H, W, 3) (None: nothing)."""
    ys, xs = np.nonzero((frames > DRAWN_LEVEL).any(axis=(0, 3)))
    if not len(ys):
        return None
    height, width = frames.shape[1:3]
    dy, dx = (PERSON_MARGIN * (ys.max() + 1 - ys.min()), PERSON_MARGIN * (xs.max() + 1 - xs.min()))
    return (max(0, int(xs.min() - dx)), max(0, int(ys.min() - dy)),
            min(width, int(np.ceil(xs.max() + 1 + dx))), min(height, int(np.ceil(ys.max() + 1 + dy))))


def fit_keypoints(poses: PoseSequence, resolution: tuple[int, int],
                  box: Optional[tuple[int, int, int, int]] = None) -> PoseSequence:
    """A PoseSequence on its own canvas -> on the model's: the ``box`` (default: ``fit_box``
    around the person) cut out or padded, resized."""
    box = box or fit_box(poses.height, poses.width, resolution, keypoints_person(poses))
    cropped = crop_poses(poses, box)
    off, shown = count_off_canvas(cropped)
    emptied = np.nonzero((shown > 0) & (off == shown))[0]
    if len(emptied):  # it would render as a blank frame
        raise ValueError(f"{poses.source}: frame {emptied[0]}: the person lies wholly outside the part "
                         f"(x {box[0]}..{box[2]}, y {box[1]}..{box[3]}) of the {poses.height}x{poses.width} "
                         f"canvas fitted to the model's {resolution[0]}x{resolution[1]}")
    return resize_poses(cropped, *resolution)


def read_keypoints(path: str, resolution: tuple[int, int], height: Optional[int] = None,
                   width: Optional[int] = None, canvas: Optional[tuple[int, int]] = None) -> PoseSequence:
    """A keypoints file -> PoseSequence on the model's canvas (fitted around the person).

    ``canvas`` (the reference image's (H, W)) is the image size of a file that records none.
    """
    return fit_keypoints(load_poses(path, height=height, width=width, default_size=canvas), resolution)


def _read_gif(path: str) -> np.ndarray:
    """An animated GIF -> uint8 (F, H, W, 3)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as gif:
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read poses {path!r} as a GIF: {e}") from e


def load_pose_images(path: str) -> np.ndarray:
    """A folder of pose images, one pose image, or a pose video -> uint8 (F, H, W, 3) at
    their own size, which all frames must share."""
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
            frames = list(videos.read_frames(path, "pose video"))
        names = [f"{path} frame {i}" for i in range(len(frames))]
    if not frames:
        raise ValueError(f"{path!r} holds no frames")
    for name, frame in zip(names, frames):
        if frame.shape != frames[0].shape:
            raise ValueError(f"pose {name} is {frame.shape[0]}x{frame.shape[1]} (HxW) but the first pose "
                             f"({names[0]}) is {frames[0].shape[0]}x{frames[0].shape[1]}: a pose sequence "
                             f"is drawn on one canvas")
    return np.stack(frames)


def fit_pose_images(frames: np.ndarray, resolution: tuple[int, int],
                    box: Optional[tuple[int, int, int, int]] = None) -> np.ndarray:
    """uint8 (F, H, W, 3) pose images -> at ``resolution``: the ``box`` (default: ``fit_box``
    around what is drawn) cut out or padded with black, resized nearest."""
    box = box or fit_box(frames.shape[1], frames.shape[2], resolution, drawn_person(frames))
    return np.stack([fit_image(f, resolution, nearest=True, box=box) for f in frames])


def read_pose_images(path: str, resolution: tuple[int, int]) -> np.ndarray:
    """Pose images, a pose image or a pose video -> uint8 (F, H, W, 3) at ``resolution``,
    fitted on their own around the person drawn on them."""
    return fit_pose_images(load_pose_images(path), resolution)


def is_keypoints(path: str) -> bool:
    """A keypoints file or a folder of OpenPose JSON files (else pose images or a video)."""
    if os.path.isdir(path):
        return any(f.endswith(".json") for f in os.listdir(path))
    return path.lower().endswith(KEYPOINT_SUFFIXES)


def read_poses(path: str, resolution: tuple[int, int], *, height: Optional[int] = None,
               width: Optional[int] = None, canvas: Optional[tuple[int, int]] = None):
    """Pose input at ``path`` -> (uint8 pose images (F, H, W, 3), PoseSequence or None), each
    fitted on its own around the person; ``canvas`` is the image size of a keypoints file
    that records none (the reference image's (H, W))."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"poses {path!r} do not exist")
    if not is_keypoints(path):
        return read_pose_images(path, resolution), None
    poses = read_keypoints(path, resolution, height, width, canvas)
    if len(poses) == 0:
        raise ValueError(f"poses {path!r} hold zero frames")
    return render(poses), poses


def _aspect_differs(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) > 0.01 * a[0] * b[1]


def _person(pose) -> Optional[tuple[int, int, int, int]]:
    """The person's box on a PoseSequence or on uint8 pose images (F, H, W, 3); None: unknown."""
    if pose is None:
        return None
    return keypoints_person(pose) if isinstance(pose, PoseSequence) else drawn_person(pose)


def _canvas(pose) -> tuple[int, int]:
    return (pose.height, pose.width) if isinstance(pose, PoseSequence) else tuple(pose.shape[1:3])


def read_sample_inputs(reference_path: str, poses_path: str, resolution: tuple[int, int], *,
                       reference_pose_path: Optional[str] = None, align: str = "off"):
    """What sample.py reads -> (reference, reference pose or None, poses): uint8 (H, W, 3),
    (H, W, 3) and (F, H, W, 3) at the model's ``resolution``.

    The reference's pose (a keypoints file, its first frame, or a pose image) is on the
    reference image's canvas; keypoint files recording no image size are taken to be on it.
    Each input is fitted to the model's aspect ratio around its person (``fit_box``: cut
    out, or padded, never squashed). Poses drawn on the reference's canvas (the same video)
    share its box, so they stay in register with it; poses of another canvas are fitted on
    their own (a one-line warning says so) and, as keypoints with the reference's keypoints,
    aligned to the reference person (``align``: off | global | per_limb; "global" when the
    canvases differ and ``align`` is off).
    """
    if not os.path.exists(poses_path):
        raise FileNotFoundError(f"poses {poses_path!r} do not exist")
    image = load_image(reference_path, "reference image", REFERENCE_FILL)
    canvas = image.shape[:2]
    check_image_size(f"reference image {reference_path!r}", canvas, resolution)  # its canvas holds the poses
    reference_pose = _read_reference_pose(reference_pose_path, canvas) if reference_pose_path else None
    poses = _read_target_poses(poses_path, canvas, align)
    reference_person = _person(reference_pose)
    if _canvas(poses) == tuple(canvas):  # one canvas: one box keeps them in register
        whole = (0, 0, canvas[1], canvas[0])
        reference_box = pose_box = fit_box(*canvas, resolution,
                                           _union(reference_person or whole, _person(poses) or whole))
    else:
        reference_box = fit_box(*canvas, resolution, reference_person)
        pose_box = fit_box(*_canvas(poses), resolution, _person(poses))
        align = _warn_other_canvas(canvas, poses, reference_pose, resolution, align)
    check_fit(f"reference image {reference_path!r}", canvas, reference_box, resolution)
    check_fit(f"poses {poses_path!r}", _canvas(poses), pose_box, resolution)
    reference = fit_image(image, resolution, box=reference_box, fill=REFERENCE_FILL)
    if isinstance(reference_pose, PoseSequence):
        reference_pose = fit_keypoints(reference_pose, resolution, reference_box)
        reference_pose_image = render(reference_pose)[0]
    else:
        reference_pose_image = None if reference_pose is None else fit_pose_images(
            reference_pose, resolution, reference_box)[0]
    if not isinstance(poses, PoseSequence):
        return reference, reference_pose_image, fit_pose_images(poses, resolution, pose_box)
    poses = fit_keypoints(poses, resolution, pose_box)
    if align != "off":
        if not isinstance(reference_pose, PoseSequence):
            raise ValueError("--align_poses needs the reference's keypoints (--reference_pose=<keypoints file>)")
        poses = align_poses(poses, reference_pose, mode=align)
    return reference, reference_pose_image, render(poses)


def _read_target_poses(path: str, canvas: tuple[int, int], align: str):
    """The target poses on their own canvas: a PoseSequence or uint8 pose images (F, H, W, 3)."""
    if not is_keypoints(path):
        if align != "off":
            raise ValueError("--align_poses needs keypoints, not pose images or a pose video")
        return load_pose_images(path)
    poses = load_poses(path, default_size=canvas)
    if len(poses) == 0:
        raise ValueError(f"poses {path!r} hold zero frames")
    return poses


def _warn_other_canvas(canvas, poses, reference_pose, resolution, align: str) -> str:
    """Says (one line) that the poses are fitted on their own; returns the alignment to use:
    "global" for keypoints with the reference's keypoints when none was asked for."""
    can_align = isinstance(poses, PoseSequence) and isinstance(reference_pose, PoseSequence)
    if can_align and align == "off":
        align, note = "global", " and the poses aligned to the reference person (global)"
    elif can_align:
        note = ""
    else:
        note = " (give --reference_pose and --poses as keypoints to align the poses to the person)"
    shapes = " of different aspect ratios" if _aspect_differs(canvas, _canvas(poses)) else ""
    if shapes or note:
        _log.warning("the reference (%dx%d) and the poses (%dx%d, HxW) are on different canvases%s: each is "
                     "fitted to the model's %dx%d on its own%s", *canvas, *_canvas(poses), shapes, *resolution, note)
    return align


def _read_reference_pose(path: str, canvas: tuple[int, int]):
    """The reference's pose on the reference's canvas: a PoseSequence of one frame, or a
    pose image as uint8 (1, H, W, 3)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference pose {path!r} does not exist")
    pose = load_poses(path, default_size=canvas).frames(slice(0, 1)) if is_keypoints(path) \
        else load_pose_images(path)[:1]
    if _canvas(pose) != tuple(canvas):
        raise ValueError(f"reference pose {path!r} is on a {_canvas(pose)[0]}x{_canvas(pose)[1]} canvas (HxW) but "
                         f"the reference image is {canvas[0]}x{canvas[1]}: the reference's pose is drawn on it")
    return pose


OUTPUT_SUFFIXES = (".mp4", ".gif")  # and no suffix: a folder of PNG frames
MAX_GIF_FPS = 100.0  # GIF delays are whole centiseconds
MP4_FPS = (0.001, 1000.0)  # rates ffmpeg takes (a rational of denominator <= 10**6) and players show


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
    elif suffix == ".mp4":
        checks.check_number(fps_name, fps, *MP4_FPS)
    else:
        checks.positive_number(fps_name, fps)
    if suffix and os.path.isdir(path):
        raise FileExistsError(f"output {path!r} is a folder; a {suffix} output needs a file name")
    if not suffix and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output {path!r} is a file; PNG frames (no suffix) go to a folder")
    if not suffix and os.path.isdir(path) and any(name.lower().endswith(".png") for name in os.listdir(path)):
        raise FileExistsError(f"output folder {path!r} holds PNG files already: the frames of two runs would "
                              f"mix; write to a new or empty folder")
    files.check_can_create(path)
    if suffix == ".mp4" and frame_size is not None and (frame_size[0] % 2 or frame_size[1] % 2):
        raise ValueError(f"output {path!r}: H.264 needs an even frame size, the frames are "
                         f"{frame_size[0]}x{frame_size[1]} (write .gif or PNG frames)")


def _check_frames_read_back(expected: int, exact: bool):
    """A check for files.atomic_path: the video decodes to ``expected`` frames (an MP4, read
    as every video is read, ``exact``; GIF writers merge identical consecutive frames, so a
    GIF may hold fewer)."""

    def check(tmp: str) -> None:
        import imageio.v3 as iio

        try:
            count = sum(1 for _ in (videos.iter_frames(tmp, "written video") if exact else iio.imiter(tmp)))
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

    created = not os.path.isdir(folder)
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
        if created:  # nor an empty folder that looks like a result
            os.rmdir(folder)
        raise


def write_video(path: str, frames: np.ndarray, fps: float = 12.0) -> None:
    """uint8 (F, H, W, 3) -> an MP4 (H.264 through ffmpeg: videos.write_mp4) or GIF, by the suffix, or
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
            videos.write_mp4(tmp, frames, fps)


def side_by_side(reference: np.ndarray, poses: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """reference | pose | result per frame: uint8 (F, H, 3W, 3)."""
    refs = np.broadcast_to(reference[None], frames.shape)
    return np.concatenate([refs, poses, frames], axis=2)
