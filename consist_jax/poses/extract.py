"""Whole-body poses from a video or a folder of images, with the published ONNX models
the peers use: a YOLOX person detector and a DWPose / RTMW whole-body pose model
(COCO-WholeBody, 133 points, SimCC outputs), run with onnxruntime.

    python -m consist_jax.poses.extract --video=dance.mp4 --out=dance_poses.json \
        --detector=yolox_l.onnx --pose_model=dw-ll_ucoco_384.onnx
    python -m consist_jax.poses.extract --images=frames/ --out=poses.json ...

The output is a ``PoseSequence`` file in the DWPose-134 layout (OpenPose-18 body + feet +
face + hands) with the canvas size recorded: ``.json`` (``{"keypoints": (T, 134, 3),
"layout", "height", "width", "coordinates": "pixels", "fps"}``, read by
``consist_jax.poses.io.load_poses``) or ``.npz`` (``save_poses``). One person per frame:
of the detected people, the one whose body points score highest on average (as the
peers' DWPose detector picks); a frame without a detected person has every point
missing (confidence 0), and the count of such frames is reported. Weights are read
from the paths given and never downloaded.

The model-specific pre/post-processing follows DWPose's ONNX pipeline (the code the
peers and rtmlib run), written here in numpy so the library needs neither OpenCV nor a
package that downloads weights when a path is mistyped (rtmlib does both):

* detector: the frame letterboxed into the model's input (resized by the largest
  ratio that fits, OpenCV's bilinear resize, top-left, padded with 114), BGR, raw
  0..255; output (1, A, 5 + C) = (cx, cy, log w, log h) per anchor on the stride 8 / 16 /
  32 grids, objectness, C class scores. A person is class 0 with objectness x class score
  above ``detection_threshold`` (0.3, DWPose's), after NMS at IoU 0.45.
* pose: each person box widened by 1.25 and grown to the model's aspect ratio, warped
  into the model's input (OpenCV's ``warpAffine``: bilinear, zero outside the frame),
  BGR normalised by the ImageNet mean/std; SimCC outputs (N, 133, 2 W), (N, 133, 2 H):
  each point at its argmax / 2 in input pixels, scored by the smaller of the two maxima.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from consist_jax import checks, files, videos
from consist_jax.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from consist_jax.poses import keypoints as K
from consist_jax.poses import layouts as L
from consist_jax.poses.io import save_poses
from consist_jax.poses.keypoints import PoseSequence

_log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".json", ".npz")
# DWPose's settings (its ONNX pipeline, as Moore-AnimateAnyone and rtmlib run it).
LETTERBOX_FILL = 114.0
YOLOX_STRIDES = (8, 16, 32)
DETECTION_THRESHOLD = 0.3
NMS_IOU = 0.45
BOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0
POSE_MEAN = (123.675, 116.28, 103.53)
POSE_STD = (58.395, 57.12, 57.375)
NUM_WHOLEBODY_POINTS = 133
DEFAULT_FPS = 30.0  # an image folder records no frame rate


# --- images: the two resamplings the models were trained with ----------------------------
def bilinear_warp(image: np.ndarray, matrix: np.ndarray, height: int, width: int, *,
                  border: str) -> np.ndarray:
    """Samples ``image`` (H, W, C) at ``matrix @ (u, v, 1)`` for every output pixel (u, v)
    of a (height, width) grid -> (height, width, C) float32, bilinear, pixel centres at
    integer coordinates (OpenCV's convention).

    ``border="zero"``: a neighbour outside the image counts 0 (``warpAffine``'s constant
    border); ``"edge"``: the nearest edge pixel (``resize``).
    """
    image = np.asarray(image, np.float32)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    x = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2]
    y = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    out = np.zeros((height, width, image.shape[-1]), np.float64)
    rows, cols = image.shape[:2]
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            if border == "edge":
                values = image[np.clip(yy, 0, rows - 1), np.clip(xx, 0, cols - 1)]
            else:
                inside = ((yy >= 0) & (yy < rows) & (xx >= 0) & (xx < cols))[..., None]
                values = np.where(inside, image[np.clip(yy, 0, rows - 1),
                                                np.clip(xx, 0, cols - 1)], 0.0)
            out += wx * wy * values
    return out.astype(np.float32)


def letterbox(frame: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float]:
    """(H, W, 3) -> ((height, width, 3) float32 resized into the top-left corner by the
    largest ratio that fits, padded with 114; the ratio) -- YOLOX's input."""
    ratio = min(height / frame.shape[0], width / frame.shape[1])
    new_h, new_w = int(frame.shape[0] * ratio), int(frame.shape[1] * ratio)
    # OpenCV's resize: source x = (u + 0.5) * (W / new_w) - 0.5, rounded back to uint8.
    sx, sy = frame.shape[1] / new_w, frame.shape[0] / new_h
    matrix = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]])
    resized = np.round(bilinear_warp(frame, matrix, new_h, new_w, border="edge"))
    out = np.full((height, width, 3), LETTERBOX_FILL, np.float32)
    out[:new_h, :new_w] = np.clip(resized, 0, 255)
    return out, ratio


# --- detections ----------------------------------------------------------------------------
def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression (DWPose's: box sides count +1 pixel) -> kept indices,
    best first. boxes: (M, 4) x0, y0, x1, y1; scores: (M,)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        overlap = width * height / (areas[best] + areas[rest] - width * height)
        order = rest[overlap <= iou_threshold]
    return np.array(keep, np.int64)


def decode_yolox(output: np.ndarray, input_hw: tuple[int, int], ratio: float, *,
                 threshold: float = DETECTION_THRESHOLD, iou: float = NMS_IOU) -> np.ndarray:
    """YOLOX's raw output (A, 5 + C) -> person boxes (M, 5) x0, y0, x1, y1, score in frame
    pixels, best first (class 0, objectness x class score > threshold, after NMS)."""
    grids, strides = [], []
    for stride in YOLOX_STRIDES:
        rows, cols = input_hw[0] // stride, input_hw[1] // stride
        gx, gy = np.meshgrid(np.arange(cols), np.arange(rows))
        grids.append(np.stack([gx, gy], -1).reshape(-1, 2))
        strides.append(np.full((rows * cols, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    output = output.astype(np.float64)
    centre = (output[:, :2] + grid) * stride
    with np.errstate(over="ignore"):
        size = np.exp(output[:, 2:4]) * stride
    scores = output[:, 4] * output[:, 5]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / ratio
    chosen = np.flatnonzero((scores > threshold) & np.all(np.isfinite(boxes), axis=1))
    kept = chosen[nms(boxes[chosen], scores[chosen], iou)] if chosen.size else chosen
    return np.concatenate([boxes[kept], scores[kept, None]], axis=1)


# --- top-down crops --------------------------------------------------------------------------
def crop_matrix(box: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """(2, 3) affine map from the pose model's input pixels to frame pixels for a person
    box (x0, y0, x1, y1): the box widened by 1.25 and grown to the input's aspect ratio,
    centred (DWPose's ``bbox_xyxy2cs`` + ``top_down_affine``)."""
    height, width = input_hw
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    centre = np.array([x0 + x1, y0 + y1]) / 2
    box_w, box_h = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
    box_w = max(box_w, box_h * width / height)  # the scale is isotropic
    scale = box_w / width  # frame pixels per input pixel
    return np.array([[scale, 0.0, centre[0] - scale * width / 2],
                     [0.0, scale, centre[1] - scale * height / 2]])


def simcc_maximum(simcc_x: np.ndarray, simcc_y: np.ndarray):
    """(N, K, Wx), (N, K, Wy) -> (locations (N, K, 2) in SimCC bins, scores (N, K)): the
    argmax per axis, scored by the smaller of the two maxima (mmpose's / DWPose's rule)."""
    locations = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float64)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1)).astype(np.float64)
    return locations, scores


def decode_simcc(simcc_x, simcc_y, matrices: np.ndarray) -> np.ndarray:
    """SimCC outputs of N crops and their (N, 2, 3) crop matrices -> (N, K, 3) frame pixels
    and scores; a point with score <= 0 gets confidence 0."""
    locations, scores = simcc_maximum(np.asarray(simcc_x), np.asarray(simcc_y))
    uv = locations / SIMCC_SPLIT_RATIO
    xy = np.einsum("nij,nkj->nki", matrices[:, :, :2], uv) + matrices[:, None, :, 2]
    return np.concatenate([xy, np.maximum(scores, 0.0)[..., None]], -1).astype(np.float32)


# --- the models ------------------------------------------------------------------------------
def _load_session(path: str, flag: str):
    import onnxruntime

    if not path:
        raise ValueError(f"{flag} is required: the path of a local .onnx file (never downloaded)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path!r}: no such file (weights are never downloaded; "
                                f"see docs/own_data.md for the published files)")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    try:
        return onnxruntime.InferenceSession(path, providers=providers)
    except Exception as error:  # onnxruntime raises its own types for unreadable models
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{flag}={path!r}: not a loadable ONNX model ({reason})") from None


def _input_hw(session, flag: str, path: str, default: tuple[int, int]) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[1] not in (3, "3"):
        raise ValueError(f"{flag}={path!r}: input shape {shape} is not (N, 3, H, W)")
    return tuple(int(s) if isinstance(s, int) else d for s, d in zip(shape[2:], default))


def _fixed_batch(session) -> int | None:
    size = session.get_inputs()[0].shape[0]
    return size if isinstance(size, int) and size > 0 else None


def _run(session, batch: np.ndarray) -> list[np.ndarray]:
    """Runs ``batch`` (N, 3, H, W) in chunks of the model's fixed batch size (padded), or
    at once when the batch axis is dynamic -> each output (N, ...)."""
    name = session.get_inputs()[0].name
    chunk = _fixed_batch(session) or len(batch)
    outputs = []
    for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:],
                                                part.dtype)]) if len(part) < chunk else part
        outputs.append([o[:len(part)] for o in session.run(None, {name: padded})])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def _shape_matches(shape, expected) -> bool:
    """Whether ``shape`` (ints, or names/None for symbolic axes) can be ``expected`` (None:
    any size)."""
    return len(shape) == len(expected) and all(
        e is None or not isinstance(s, int) or s == e for s, e in zip(shape, expected))


def _at_least(size, low: int) -> bool:
    return not isinstance(size, int) or size >= low


class WholeBodyExtractor:
    """YOLOX detector + whole-body SimCC pose model, both ONNX files on disk.

    ``extractor(frames)`` maps RGB uint8 frames (B, H, W, 3) to (B, 133, 3)
    COCO-WholeBody keypoints in frame pixels with scores (one person per frame, zeros where
    no person is detected).
    """

    def __init__(self, detector: str, pose_model: str, *,
                 detection_threshold: float = DETECTION_THRESHOLD):
        self.detector = _load_session(detector, "--detector")
        self.pose_model = _load_session(pose_model, "--pose_model")
        self.detector_hw = _input_hw(self.detector, "--detector", detector, (640, 640))
        self.pose_hw = _input_hw(self.pose_model, "--pose_model", pose_model, (384, 288))
        self.detection_threshold = checks.probability("--detection_threshold",
                                                      detection_threshold)
        self._paths = {"--detector": detector, "--pose_model": pose_model}
        # The declared shapes, checked before any frame is read (symbolic axes match any size).
        self._check_detector_output(self.detector.get_outputs()[0].shape)
        self._check_pose_outputs([o.shape for o in self.pose_model.get_outputs()])

    def _check_detector_output(self, shape):
        height, width = self.detector_hw
        anchors = sum((height // s) * (width // s) for s in YOLOX_STRIDES)
        if not (_shape_matches(shape, (None, anchors, None)) and _at_least(shape[2], 6)):
            raise ValueError(f"--detector={self._paths['--detector']!r}: output shape "
                             f"{tuple(shape)}, expected YOLOX's (N, {anchors} anchors, 5 + "
                             f"classes) for its {height}x{width} input")

    def _check_pose_outputs(self, shapes):
        height, width = self.pose_hw
        expected = [(None, NUM_WHOLEBODY_POINTS, round(width * SIMCC_SPLIT_RATIO)),
                    (None, NUM_WHOLEBODY_POINTS, round(height * SIMCC_SPLIT_RATIO))]
        if len(shapes) < 2 or not all(_shape_matches(s, e) for s, e in zip(shapes, expected)):
            raise ValueError(f"--pose_model={self._paths['--pose_model']!r}: outputs "
                             f"{[tuple(s) for s in shapes]}, expected SimCC x (N, "
                             f"{expected[0][1]}, {expected[0][2]}) and y (N, {expected[1][1]}, "
                             f"{expected[1][2]})")

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """RGB frames (B, H, W, 3) -> per frame, person boxes (M, 5) best first."""
        inputs, ratios = zip(*(letterbox(f[..., ::-1], *self.detector_hw) for f in frames))
        (output, *_) = _run(self.detector, np.stack(inputs).transpose(0, 3, 1, 2))
        self._check_detector_output(output.shape)
        return [decode_yolox(o, self.detector_hw, r, threshold=self.detection_threshold)
                for o, r in zip(output, ratios)]

    def estimate(self, frames: np.ndarray, boxes: Sequence[np.ndarray]) -> np.ndarray:
        """Per frame, the best-scoring person of its boxes -> (B, 133, 3)."""
        crops, matrices, owner = [], [], []
        height, width = self.pose_hw
        for index, (frame, frame_boxes) in enumerate(zip(frames, boxes)):
            bgr = frame[..., ::-1]
            for box in frame_boxes:
                matrix = crop_matrix(box, self.pose_hw)
                crop = bilinear_warp(bgr, matrix, height, width, border="zero")
                crops.append((crop - np.float32(POSE_MEAN)) / np.float32(POSE_STD))
                matrices.append(matrix)
                owner.append(index)
        out = np.zeros((len(frames), NUM_WHOLEBODY_POINTS, 3), np.float32)
        if not crops:
            return out
        simcc_x, simcc_y = self._simcc(np.stack(crops).transpose(0, 3, 1, 2))
        people = decode_simcc(simcc_x, simcc_y, np.stack(matrices))
        # The person whose body (OpenPose-18, as DWPose's detector scores it) scores best.
        body_scores = K.wholebody133_to_dwpose134(people)[:, :18, 2].mean(-1)
        owner = np.array(owner)
        for index in np.unique(owner):
            candidates = np.flatnonzero(owner == index)
            out[index] = people[candidates[np.argmax(body_scores[candidates])]]
        return out

    def _simcc(self, crops: np.ndarray):
        outputs = _run(self.pose_model, crops.astype(np.float32))
        self._check_pose_outputs([o.shape for o in outputs])
        return outputs[0], outputs[1]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.estimate(frames, self.detect(frames))


# --- frames in, poses out -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FrameSource:
    """A video file or a folder of images; ``batches(n)`` yields RGB uint8 (b, H, W, 3)."""

    path: str
    fps: float
    height: int
    width: int
    num_frames: int | None  # None when the container does not say

    def batches(self, size: int) -> Iterator[np.ndarray]:
        frames = videos.iter_frames(self.path) if os.path.isfile(self.path) else _iter_images(self.path)
        batch = []
        for frame in frames:
            if frame.shape != (self.height, self.width, 3):
                raise ValueError(f"{self.path}: frame {frame.shape[1]}x{frame.shape[0]} differs "
                                 f"from the first frame's {self.width}x{self.height} (WxH)")
            batch.append(frame)
            if len(batch) == size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def image_files(folder: str) -> list[Path]:
    """The images of a folder in natural order (frame2 before frame10)."""
    from consist_jax.poses.io import natural_key

    return sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def read_image(path) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3), EXIF orientation applied, 16-bit scaled."""
    from PIL import Image

    from consist_jax.images import to_uint8, upright

    try:
        with Image.open(path) as image:
            return to_uint8(upright(image), str(path))
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files
        raise ValueError(f"{path}: not a readable image ({error})") from None


def _iter_images(folder: str) -> Iterator[np.ndarray]:
    for path in image_files(folder):
        yield read_image(path)


def open_frames(path: str, fps: float | None = None) -> FrameSource:
    """A ``FrameSource`` for a video file or a folder of images (their fps: the video's,
    else ``fps``, else 30). Raises naming the path when there is nothing to read."""
    if os.path.isdir(path):
        found = image_files(path)
        if not found:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        first = read_image(found[0])
        return FrameSource(path, float(fps or DEFAULT_FPS), first.shape[0], first.shape[1],
                           len(found))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video or image folder")
    if not path.lower().endswith(VIDEO_SUFFIXES):
        raise ValueError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}) or image folder")
    info = videos.probe(path)
    frames = videos.iter_frames(path)
    if next(frames, None) is None:  # a decoding error in the first frame is raised here too
        raise ValueError(f"video {path!r} has no frames")
    frames.close()
    return FrameSource(path, float(info.fps or fps or DEFAULT_FPS), info.height, info.width, info.num_frames)


def extract_poses(source: FrameSource, extractor: WholeBodyExtractor, *, batch_size: int = 8,
                  progress: bool = True) -> PoseSequence:
    """Every frame's whole-body pose -> ``PoseSequence`` (DWPose-134, pixels of the frames)."""
    from tqdm import tqdm

    checks.positive_int("--batch_size", batch_size)
    points = []
    with tqdm(total=source.num_frames, unit="frame", disable=not progress,
              desc=f"poses of {os.path.basename(source.path.rstrip('/'))}") as bar:
        for batch in source.batches(batch_size):
            points.append(extractor(batch))
            bar.update(len(batch))
    points = K.wholebody133_to_dwpose134(np.concatenate(points))
    missing = int(np.sum(~np.any(points[..., 2] > 0, axis=-1)))
    if missing:
        _log.warning("%s: no person detected in %d of %d frames (their poses are missing)",
                     source.path, missing, len(points))
    return PoseSequence(points, L.DWPOSE_134_NAME, source.height, source.width,
                        source=source.path)


def write_poses(path: str, poses: PoseSequence, fps: float) -> None:
    """``.json`` (pixels, 3 decimals) or ``.npz``; both read back by ``load_poses``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        save_poses(path, poses)
        return
    if suffix != ".json":
        raise ValueError(f"--out={path!r}: write .json or .npz")
    files.write_json(path, {
        "layout": poses.layout, "height": poses.height, "width": poses.width,
        "coordinates": "pixels", "fps": float(fps),
        "keypoints": np.round(poses.points.astype(np.float64), 3).tolist()}, indent=None)


def extract_to_file(frames: str, out: str, detector: str, pose_model: str, *,
                    batch_size: int = 8, detection_threshold: float = DETECTION_THRESHOLD,
                    progress: bool = True) -> PoseSequence:
    """Extracts the poses of a video or image folder and writes them to ``out``; every
    input is checked before the models run."""
    checks.positive_int("--batch_size", batch_size)
    if Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out={out!r}: write .json or .npz")
    files.check_can_create(out, "--out")
    source = open_frames(frames)
    extractor = WholeBodyExtractor(detector, pose_model, detection_threshold=detection_threshold)
    poses = extract_poses(source, extractor, batch_size=batch_size, progress=progress)
    write_poses(out, poses, source.fps)
    return poses


def poses_for_sampling(poses: str, detector: str | None, pose_model: str | None,
                       out: str) -> str:
    """sample.py's ``--poses``: a real video (or image folder) becomes a keypoints file
    written next to ``out`` (``<out>.poses.json``) when both models are given; anything
    else is returned as it is."""
    if not detector and not pose_model:
        return poses
    if not (detector and pose_model):
        raise ValueError("pose extraction needs both --pose_detector and --pose_model")
    if not os.path.exists(poses):
        raise FileNotFoundError(f"--poses={poses!r} does not exist")
    is_video = os.path.isfile(poses) and poses.lower().endswith(VIDEO_SUFFIXES)
    if not (is_video or (os.path.isdir(poses) and image_files(poses))):
        raise ValueError(f"--poses={poses!r}: --pose_detector/--pose_model extract poses from a "
                         f"video ({', '.join(VIDEO_SUFFIXES)}) or an image folder; drop them for "
                         f"a keypoints file")
    target = os.path.splitext(out.rstrip("/"))[0] + ".poses.json"
    extract_to_file(poses, target, detector, pose_model)
    print(f"wrote the extracted poses to {target}")
    return target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video file")
    source.add_argument("--images", help="a folder of frames (natural order)")
    parser.add_argument("--out", required=True, help="the poses file: .json or .npz")
    parser.add_argument("--detector", required=True, help="YOLOX ONNX file, e.g. yolox_l.onnx")
    parser.add_argument("--pose_model", required=True,
                        help="whole-body SimCC ONNX file, e.g. dw-ll_ucoco_384.onnx")
    parser.add_argument("--batch_size", type=int, default=8, help="frames per model call")
    parser.add_argument("--detection_threshold", type=float, default=DETECTION_THRESHOLD)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    def run(_):
        if args.images and not os.path.isdir(args.images):
            raise NotADirectoryError(f"--images={args.images!r}: not a folder")
        poses = extract_to_file(args.video or args.images, args.out, args.detector,
                                args.pose_model, batch_size=args.batch_size,
                                detection_threshold=args.detection_threshold)
        print(f"wrote {len(poses)} poses ({poses.height}x{poses.width} HxW canvas) to {args.out}")

    from consist_jax import cli

    cli.reports_user_errors(run)(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
