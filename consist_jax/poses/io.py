"""Reading and writing pose sequences. Never unpickles.

``load_poses(path)`` accepts:

* **OpenPose JSON** -- one ``*.json`` file per frame, or a folder of them (sorted by the
  numbers in their names), each ``{"people": [{"pose_keypoints_2d": [x, y, c, ...],
  "face_keypoints_2d": [...], "hand_left_keypoints_2d": [...],
  "hand_right_keypoints_2d": [...]}, ...]}`` (OpenPose 1.0's keys without ``_2d`` too;
  ControlNet's annotators write ``null`` for absent parts). The body may be COCO-18 (54
  numbers) or BODY_25 (75 numbers; converted to COCO-18 by dropping mid-hip, its feet kept
  for the DWPose layout). When face or hand lists are filled, the result is DWPose-134 (face: the
  first 68 of OpenPose's 70 points; feet missing unless BODY_25), else OpenPose-18.
  ``people[person]`` is used (default the first); a frame without that person has every
  point missing (confidence 0); the same ``person`` index applies to DWPose dumps with
  several people. Optional ``canvas_height``/``canvas_width`` (written by
  ControlNet's annotators) give the image size.
* **DWPose dumps** (``.json`` or ``.npz``), any of:
    - per-frame DWPose pose dicts (one per file in a folder, or together in one file), as
      DWPose's ``draw_pose`` takes them: ``{"bodies":
      {"candidate": (M, 2), "subset": (N, 18) indices into candidate (-1: missing),
      optional "score": (N, 18)}, "faces": (N, 68, 2), "faces_score": (N, 68), "hands":
      (2N, 21, 2) (all left hands, then all right hands), "hands_score": (2N, 21),
      optional "feet"/"foot": (N, 6, 2) with "feet_score"/"foot_score"}`` -- one dict, a
      list of them, or ``{"frames": [...], "height": H, "width": W}`` (JSON). Without
      scores a point is visible when both its coordinates are > 0 (DWPose writes -1 for
      hidden points).
    - stacked per-person arrays: ``bodies`` (T, 18, 2), ``feet`` (T, 6, 2), ``faces``
      (T, 68, 2), ``hands`` (T, 2, 21, 2) or (T, 42, 2) left then right, each with an
      optional ``<name>_score`` of the leading shape.
    - raw whole-body arrays: ``candidate`` (T, [N,] K, 2) and ``subset`` (T, [N,] K)
      holding per-point scores, K = 134 (DWPose) or 133 (COCO-WholeBody).
    - ``keypoints`` (T, K, 3) or (T, K, 2) with optional ``scores`` (T, K), K = 17 (COCO),
      18, 25 (BODY_25), 133 or 134; optional ``layout`` (checked) and ``coordinates``
      (``"pixels"``/``"normalized"``, used when the caller says ``"auto"``). This is what
      ``save_poses`` writes.
  Optional ``height``/``width`` entries give the image size.
* **A plain array** ``.npy`` (T, K, 3) (K as for ``keypoints``), loaded without pickle.

Coordinates: ``coordinates="pixels"``, ``"normalized"`` (fractions of width/height, as
DWPose and ControlNet's OpenPose editor store them; pixel = fraction * size) or ``"auto"``
(normalized when the bulk -- at least half -- of the visible points lie in [0, 1] x [0, 1],
where a pixel-coordinate person would fill one pixel; a few points a hair outside, as
detectors and the editor write them, do not change the decision). The image size comes
from the file or the ``height``/``width`` arguments, else from ``default_size`` (a
warning says so); without any of them it is an error, and a disagreement between the file
and the arguments is one too.

Once in pixels, a frame whose visible points lie mostly (more than half) off the canvas is
an error naming the file and frame: it means a wrong canvas size or coordinate mode, and
would otherwise render as a blank image.

Any malformed input raises ValueError naming the file and, where it applies, the frame.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from consist_jax import files
from consist_jax.poses import keypoints as K
from consist_jax.poses import layouts as L
from consist_jax.poses.keypoints import PoseSequence

# Keypoint files load_poses reads (a folder of per-frame OpenPose JSON files too).
KEYPOINT_SUFFIXES = (".json", ".npz", ".npy")

COORDINATE_MODES = ("auto", "pixels", "normalized")
# "auto" picks normalized coordinates when at least this share of the visible points lies
# in the unit square; a frame with more than this share off the canvas is an error.
BULK_FRACTION = 0.5
_log = logging.getLogger(__name__)
_DWPOSE_PART_SIZES = (("bodies", 18), ("feet", 6), ("faces", 68), ("hands", 42))


def natural_key(name: str) -> list:
    """Sort key of a file name putting frame2 before frame10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _as_float_array(value, what: str, source: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {what} is not a numeric array ({error})") from None


def _check_finite(points: np.ndarray, source: str, frame: int | None = None):
    bad = ~np.isfinite(points)
    if bad.any():
        index = np.argwhere(bad)[0]
        where = f"frame {frame}" if frame is not None else f"frame {index[0]}"
        raise ValueError(f"{source}: NaN or infinite keypoint value in {where}")


# --- OpenPose JSON -------------------------------------------------------------------------
def _openpose_part(person: dict, key: str, sizes: tuple[int, ...], source: str, frame: int):
    """(n, 3) points of one OpenPose keypoint list, or None when absent/empty."""
    values = person.get(key)
    if values is None:  # OpenPose 1.0 wrote the keys without "_2d"
        values = person.get(key[:-len("_2d")])
    if values is None or len(values) == 0:
        return None
    points = _as_float_array(values, key, source)
    if points.ndim != 1 or points.size % 3 or points.size // 3 not in sizes:
        raise ValueError(f"{source}: frame {frame}: {key} has {points.size} numbers; expected "
                         f"3 x {' or '.join(map(str, sizes))} points")
    points = points.reshape(-1, 3)
    _check_finite(points, source, frame)
    return points


def _openpose_frame(data, source: str, frame: int, person: int):
    """One OpenPose frame -> (body (18|25, 3) or None, face/left/right hand or None)."""
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise ValueError(f"{source}: frame {frame}: not an OpenPose frame (no 'people' list)")
    people = data["people"]
    if person >= len(people):
        return None
    entry = people[person]
    body = _openpose_part(entry, "pose_keypoints_2d", (18, 25), source, frame)
    if body is None:
        raise ValueError(f"{source}: frame {frame}: person {person} has no pose_keypoints_2d")
    face = _openpose_part(entry, "face_keypoints_2d", (68, 70), source, frame)
    left = _openpose_part(entry, "hand_left_keypoints_2d", (21,), source, frame)
    right = _openpose_part(entry, "hand_right_keypoints_2d", (21,), source, frame)
    return body, face, left, right


def _openpose_frames_to_points(frames, sources, person: int):
    """Parsed OpenPose frames -> ((T, K, 3) points, layout name)."""
    parsed = [_openpose_frame(d, s, t, person) for t, (d, s) in enumerate(zip(frames, sources))]
    present = [t for t, p in enumerate(parsed) if p is not None]
    if not present:
        raise ValueError(f"{sources[0]}: no frame has person {person}")
    first = present[0]
    body_size = len(parsed[first][0])
    whole_body = any(part is not None for part in parsed[first][1:])
    for t in present:
        body, *rest = parsed[t]
        if len(body) != body_size:
            raise ValueError(f"{sources[t]}: frame {t}: mixed layouts: {len(body)} body "
                             f"points, but frame {first} has {body_size}")
        if any(part is not None for part in rest) != whole_body:
            raise ValueError(f"{sources[t]}: frame {t}: mixed layouts: face/hand keypoints "
                             f"{'missing' if whole_body else 'present'}, unlike frame {first}")
    layout = L.DWPOSE_134 if whole_body else L.OPENPOSE_18
    points = np.zeros((len(parsed), layout.num_keypoints, 3), np.float32)
    for t in present:
        body, face, left, right = parsed[t]
        points[t, :18] = K.body25_to_openpose18(body) if body_size == 25 else body
        if whole_body:
            if body_size == 25:
                points[t, L.FEET_START:L.FACE_START] = body[list(K.BODY25_FEET)]
            for part, start, count in ((face, L.FACE_START, 68), (left, L.LEFT_HAND_START, 21),
                                       (right, L.RIGHT_HAND_START, 21)):
                if part is not None:
                    points[t, start:start + count] = part[:count]
    return points, layout.name


def _canvas_size(data, source):
    """(height, width) recorded in a frame/file dict, or (None, None)."""
    if not isinstance(data, dict):
        return None, None
    for h_key, w_key in (("canvas_height", "canvas_width"), ("height", "width")):
        if h_key in data and w_key in data:
            try:
                return int(np.asarray(data[h_key])), int(np.asarray(data[w_key]))
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {h_key}/{w_key} are not integers") from None
    return None, None


# --- DWPose dumps --------------------------------------------------------------------------
def _score_key(data, name):
    for key in (f"{name}_score", f"{name}_scores"):
        if key in data:
            return key
    return None


def _visible_where_positive(xy, scores):
    """DWPose marks hidden points with negative coordinates: those get confidence 0."""
    shown = np.all(xy > 0, axis=-1)
    confidence = np.ones(xy.shape[:-1], np.float32) if scores is None else scores
    return np.concatenate([xy, np.where(shown, confidence, 0.0)[..., None]], axis=-1)


def _points_array(value, count: int, dims: int, what: str, where: str) -> np.ndarray:
    """``value`` as (n, count, dims) float32; a wrong point count is a clear error."""
    array = _as_float_array(value, what, where)
    if array.size == 0:
        return np.zeros((0, count, dims), np.float32)
    one_row = array.ndim == (1 if dims == 1 else 2)  # a single person/hand, unbatched
    if one_row:
        array = array[None]
    shape_ok = array.shape[-1] == count if dims == 1 else array.shape[-2:] == (count, dims)
    if not shape_ok or array.ndim != (2 if dims == 1 else 3):
        expected = f"(n, {count})" if dims == 1 else f"(n, {count}, {dims})"
        raise ValueError(f"{where}: '{what}' must be {expected} (wrong number of points?), "
                         f"got shape {array.shape}")
    return array


def _dwpose_pose_dict(pose: dict, source: str, frame: int, person: int):
    """One DWPose ``draw_pose``-style dict -> ((K, 3) points, whole_body flag)."""
    where = f"{source}: frame {frame}"
    bodies = pose.get("bodies")
    if not isinstance(bodies, dict) or "candidate" not in bodies or "subset" not in bodies:
        raise ValueError(f"{where}: 'bodies' must hold 'candidate' and 'subset'")
    candidate = _as_float_array(bodies["candidate"], "bodies.candidate", where)
    candidate = candidate.reshape(-1, 2) if candidate.size else np.zeros((0, 2), np.float32)
    if candidate.ndim != 2 or candidate.shape[-1] != 2:
        raise ValueError(f"{where}: 'bodies.candidate' must be (M, 2)")
    subset = _points_array(bodies["subset"], 18, 1, "bodies.subset", where)
    _check_finite(candidate, source, frame)
    _check_finite(subset, source, frame)
    if np.any(subset != np.round(subset)) or np.any(subset >= len(candidate)):
        raise ValueError(f"{where}: bodies.subset must hold indices into bodies.candidate "
                         f"(-1 for missing points)")
    whole_body = any(key in pose for key in ("faces", "hands", "feet", "foot"))
    layout = L.DWPOSE_134 if whole_body else L.OPENPOSE_18
    points = np.zeros((layout.num_keypoints, 3), np.float32)
    num_people = len(subset)
    if person >= num_people:
        return points, whole_body
    index = subset[person].astype(np.int64)
    found = index >= 0
    points[:18, :2][found] = candidate[index[found]]
    if "score" in bodies:
        body_scores = _points_array(bodies["score"], 18, 1, "bodies.score", where)
        points[:18, 2] = np.where(found, body_scores[person], 0.0)
    else:
        points[:18, 2] = found

    def part(key, count):
        xy = _points_array(pose[key], count, 2, key, where)
        score_key = _score_key(pose, key)
        scores = None if score_key is None else _points_array(pose[score_key], count, 1,
                                                              score_key, where)
        if scores is not None and len(scores) != len(xy):
            raise ValueError(f"{where}: '{score_key}' has {len(scores)} rows for {len(xy)} "
                             f"in '{key}'")
        return xy, scores

    for name, alias, count, start in (("feet", "foot", 6, L.FEET_START),
                                      ("faces", None, 68, L.FACE_START)):
        key = name if name in pose else alias if alias in pose else None
        if key is None:
            continue
        xy, scores = part(key, count)
        if person < len(xy):
            points[start:start + count] = _visible_where_positive(
                xy[person], None if scores is None else scores[person])
    if "hands" in pose:
        hands, scores = part("hands", 21)
        if len(hands) != 2 * num_people:
            raise ValueError(f"{where}: {len(hands)} hands for {num_people} people; DWPose "
                             f"stores two per person (all left hands, then all right)")
        for hand, start in ((person, L.LEFT_HAND_START),
                            (num_people + person, L.RIGHT_HAND_START)):
            points[start:start + 21] = _visible_where_positive(
                hands[hand], None if scores is None else scores[hand])
    _check_finite(points, source, frame)
    return points, whole_body


def _dwpose_pose_dicts(poses, source: str, person: int):
    if not poses:
        raise ValueError(f"{source}: empty pose sequence (no frames)")
    parsed = []
    for t, pose in enumerate(poses):
        if not isinstance(pose, dict):
            raise ValueError(f"{source}: frame {t}: expected a DWPose pose dict")
        parsed.append(_dwpose_pose_dict(pose, source, t, person))
    whole_body = parsed[0][1]
    for t, (_, flag) in enumerate(parsed):
        if flag != whole_body:
            raise ValueError(f"{source}: frame {t}: mixed layouts: face/hand/feet entries "
                             f"{'present' if flag else 'missing'}, unlike frame 0")
    return np.stack([p for p, _ in parsed]), (L.DWPOSE_134_NAME if whole_body
                                              else L.OPENPOSE_18_NAME)


def _dwpose_stacked_arrays(data, source: str):
    """``bodies``/``feet``/``faces``/``hands`` (+ ``_score``) arrays -> (T, K, 3)."""
    bodies = _as_float_array(data["bodies"], "bodies", source)
    if bodies.ndim != 3 or bodies.shape[1:] != (18, 2):
        raise ValueError(f"{source}: 'bodies' must be (T, 18, 2), got {bodies.shape}")
    num_frames = len(bodies)
    whole_body = any(name in data for name, _ in _DWPOSE_PART_SIZES[1:])
    layout = L.DWPOSE_134 if whole_body else L.OPENPOSE_18
    points = np.zeros((num_frames, layout.num_keypoints, 3), np.float32)
    starts = np.cumsum([0] + [count for _, count in _DWPOSE_PART_SIZES])
    for (name, count), start in zip(_DWPOSE_PART_SIZES, starts):
        if name in data and start < layout.num_keypoints:
            xy = _as_float_array(data[name], name, source)
            if xy.size != num_frames * count * 2:
                raise ValueError(f"{source}: '{name}' must hold (T={num_frames}, {count}, 2) "
                                 f"points, got shape {xy.shape}")
            xy = xy.reshape(num_frames, count, 2)
            score_key = _score_key(data, name)
            scores = None
            if score_key is not None:
                scores = _as_float_array(data[score_key], score_key, source)
                if scores.size != num_frames * count:
                    raise ValueError(f"{source}: '{score_key}' must hold (T={num_frames}, "
                                     f"{count}) scores, got shape {scores.shape}")
                scores = scores.reshape(num_frames, count)
            points[:, start:start + count] = _visible_where_positive(xy, scores)
    return points, layout.name


def _raw_wholebody(data, source: str, person: int):
    """``candidate`` (T, [N,] K, 2) + ``subset`` (T, [N,] K) scores -> (T, K', 3)."""
    candidate = _as_float_array(data["candidate"], "candidate", source)
    scores = _as_float_array(data["subset"], "subset", source)
    if candidate.ndim == 4:
        if person >= candidate.shape[1]:
            raise ValueError(f"{source}: no person {person} in 'candidate' {candidate.shape}")
        candidate, scores = candidate[:, person], scores[:, person]
    if candidate.ndim != 3 or candidate.shape[-1] != 2 or scores.shape != candidate.shape[:2]:
        raise ValueError(f"{source}: 'candidate' must be (T, [N,] K, 2) and 'subset' "
                         f"(T, [N,] K) scores, got {candidate.shape} and {scores.shape}")
    if candidate.shape[1] not in (133, 134):
        raise ValueError(f"{source}: raw whole-body arrays need K = 133 or 134 points, got "
                         f"{candidate.shape[1]}")
    return np.concatenate([candidate, scores[..., None]], axis=-1), "raw"


def _keypoint_array(data, source: str):
    points = _as_float_array(data["keypoints"], "keypoints", source)
    if points.ndim == 3 and points.shape[-1] == 2:
        if "scores" in data:
            scores = _as_float_array(data["scores"], "scores", source)
            if scores.shape != points.shape[:2]:
                raise ValueError(f"{source}: 'scores' must be {points.shape[:2]}, got "
                                 f"{scores.shape}")
        else:
            scores = np.ones(points.shape[:2], np.float32)
        points = np.concatenate([points, scores[..., None]], axis=-1)
    return points, "raw"


def _points_from_mapping(data, source: str, person: int):
    """Dispatches a decoded JSON/NPZ mapping (or list) -> ((T, K, 3), layout or "raw")."""
    if isinstance(data, list):
        if data and all(isinstance(d, dict) and "people" in d for d in data):
            return _openpose_frames_to_points(data, [source] * len(data), person)
        return _dwpose_pose_dicts(data, source, person)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a pose file (top level is {type(data).__name__})")
    if "people" in data:
        return _openpose_frames_to_points([data], [source], person)
    if "frames" in data:
        return _points_from_mapping(list(data["frames"]), source, person)
    if "keypoints" in data:
        return _keypoint_array(data, source)
    if "candidate" in data and "subset" in data:
        return _raw_wholebody(data, source, person)
    if "bodies" in data:
        if isinstance(data["bodies"], dict):
            return _dwpose_pose_dicts([data], source, person)
        return _dwpose_stacked_arrays(data, source)
    raise ValueError(f"{source}: unrecognised pose file; keys {sorted(data)[:12]} (expected "
                     f"OpenPose 'people', DWPose 'bodies'/'candidate'+'subset', or "
                     f"'keypoints')")


# --- the dispatcher ------------------------------------------------------------------------
def _resolve_size(file_size, height, width, default_size, source):
    file_height, file_width = file_size
    if height is not None and width is not None and file_height is not None and (
            int(height), int(width)) != (file_height, file_width):
        raise ValueError(f"{source}: the file says {file_height}x{file_width} but "
                         f"height/width {height}x{width} were given")
    height = file_height if height is None else height
    width = file_width if width is None else width
    if height is None and width is None and default_size is not None:
        height, width = default_size
        _log.warning("%s records no image size; assuming %dx%d (HxW)", source, height, width)
    if height is None or width is None:
        raise ValueError(f"{source}: the file does not record the image size; pass "
                         f"height= and width=")
    return int(height), int(width)


def _looks_normalized(points) -> bool:
    """Whether the bulk of the visible points lies in the unit square: (T, K, 3) -> bool."""
    xy = points[..., :2][points[..., 2] > 0]
    if not len(xy):
        return False
    in_unit_square = np.all((xy >= 0) & (xy <= 1), axis=-1)
    return in_unit_square.mean() >= BULK_FRACTION


def _to_pixels(points, height, width, coordinates):
    """Scales normalized coordinates to pixels per ``coordinates`` -> (points, mode used)."""
    if coordinates not in COORDINATE_MODES:
        raise ValueError(f"coordinates must be one of {COORDINATE_MODES}, got {coordinates!r}")
    if coordinates == "auto":
        coordinates = "normalized" if _looks_normalized(points) else "pixels"
    if coordinates == "normalized":
        points = points.copy()
        points[..., 0] *= width
        points[..., 1] *= height
    return points, coordinates


def count_off_canvas(pose_seq: PoseSequence) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, (points off the canvas, points shown): two (T,) int arrays.

    A point is shown when its confidence is > 0, and off the canvas when it lies outside
    the pixels' area [-0.5, width - 0.5] x [-0.5, height - 0.5].
    """
    shown = pose_seq.confidence > 0
    limits = np.array([pose_seq.width, pose_seq.height]) - 0.5
    inside = np.all((pose_seq.xy >= -0.5) & (pose_seq.xy <= limits), axis=-1)
    return np.sum(shown & ~inside, axis=-1), np.sum(shown, axis=-1)


def _check_on_canvas(pose_seq: PoseSequence, coordinates: str, frame_sources, size_assumed: bool = False):
    """Raises when a frame's shown points lie mostly off the canvas; ``frame_sources``
    (T,) names the file of each frame; ``size_assumed``: the canvas is ``default_size``
    (the file records none), so the hint is one a command-line user can follow."""
    off, shown = count_off_canvas(pose_seq)
    bad = np.nonzero(off > BULK_FRACTION * shown)[0]
    if len(bad):
        t = int(bad[0])
        hint = ("the file records no image size, so this default one was assumed: write the size of "
                "the image the poses were drawn on into the file ('canvas_height'/'canvas_width' or 'height'/'width')"
                if size_assumed else "pass the right height/width or coordinates= ('pixels' or 'normalized')")
        raise ValueError(
            f"{frame_sources[t]}: frame {t}: {off[t]} of {shown[t]} visible keypoints lie off "
            f"the {pose_seq.height}x{pose_seq.width} (HxW) canvas as {coordinates} coordinates; {hint}")


def load_poses(path, *, height: int | None = None, width: int | None = None,
               coordinates: str = "auto", person: int = 0,
               default_size: tuple[int, int] | None = None) -> PoseSequence:
    """Reads a pose sequence from an OpenPose JSON file or folder, a DWPose dump (.json,
    .npz) or a (T, K, 3) ``.npy`` array; see the module docstring for the formats.

    ``default_size`` (H, W) is the image size for a file that records none and was given
    no ``height``/``width`` (e.g. the reference image's size); using it logs a warning.

    Returns a ``PoseSequence`` in pixel coordinates, layout ``openpose18`` or
    ``dwpose134``. Raises ValueError naming the file (and frame) on bad input.
    """
    source = str(Path(path))
    try:
        return _load_poses(Path(path), height, width, coordinates, person, default_size)
    except ValueError as error:  # every refusal names the file, also those raised below us
        if source in str(error):
            raise
        raise ValueError(f"{source}: {error}") from None
    except (TypeError, AttributeError, KeyError, IndexError) as error:
        # A field of the wrong kind deep in a hand-edited or foreign file (a number where a
        # person's dict belongs): the file's structure is not one of the formats above.
        raise ValueError(f"{source}: not a pose file of a known structure "
                         f"({type(error).__name__}: {error})") from None


def _load_poses(path: Path, height, width, coordinates, person, default_size) -> PoseSequence:
    source = str(path)
    file_size: tuple = (None, None)
    declared_layout = None
    frame_sources = None  # the file of each frame, when they differ
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".json"),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise ValueError(f"{source}: empty pose sequence (no .json files in the folder)")
        frames = [_read_json(f) for f in files]
        if all(isinstance(frame, dict) and "bodies" in frame for frame in frames):
            points, layout = _dwpose_pose_dicts(frames, source, person)  # DWPose per frame
        else:
            points, layout = _openpose_frames_to_points(frames, [str(f) for f in files],
                                                        person)
        file_size = _canvas_size(frames[0], source)
        frame_sources = [str(f) for f in files]
    elif not path.exists():
        raise FileNotFoundError(f"{source}: no such pose file or folder")
    elif path.suffix.lower() == ".json":
        data = _read_json(path)
        points, layout = _points_from_mapping(data, source, person)
        file_size = _canvas_size(data, source)
        if file_size == (None, None) and isinstance(data, list) and data:
            file_size = _canvas_size(data[0], source)
    elif path.suffix.lower() == ".npz":
        data = _read_npz(path)
        points, layout = _points_from_mapping(data, source, person)
        declared_layout = str(data["layout"]) if "layout" in data else None
        if coordinates == "auto" and "coordinates" in data:  # as save_poses records it
            coordinates = str(data["coordinates"])
        file_size = _canvas_size(data, source)
    elif path.suffix.lower() == ".npy":
        try:
            points = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{source}: not a plain numeric array ({error})") from None
        points, layout = _as_float_array(points, "array", source), "raw"
    else:
        raise ValueError(f"{source}: unknown pose file type {path.suffix!r} (expected a "
                         f"folder, .json, .npz or .npy)")

    if points.ndim != 3 or points.shape[0] == 0:
        raise ValueError(f"{source}: empty pose sequence or not (T, K, 3): shape {points.shape}")
    _check_finite(points, source)
    if layout == "raw":
        points, layout = K.to_layout_points(points, source)
    if declared_layout is not None and L.get_layout(declared_layout).name != layout:
        raise ValueError(f"{source}: 'layout' says {declared_layout} but the points are "
                         f"{layout} ({points.shape[1]} points)")
    size_assumed = file_size == (None, None) and height is None and width is None and default_size is not None
    height, width = _resolve_size(file_size, height, width, default_size, source)
    points, coordinates = _to_pixels(points, height, width, coordinates)
    poses = PoseSequence(points, layout, height, width, source=source)
    _check_on_canvas(poses, coordinates, frame_sources or [source] * len(poses), size_assumed)
    return poses


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise ValueError(f"{path}: invalid JSON ({type(error).__name__}: {error})") from None


def _read_npz(path: Path) -> dict:
    """Every array of an ``.npz``, never unpickling: a pickled entry is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {}
            for key in archive.files:
                try:
                    data[key] = archive[key]
                except ValueError as error:
                    raise ValueError(f"{path}: '{key}' is not a plain numeric array (pickled "
                                     f"objects are never loaded: {error})") from None
            return data
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        if str(path) in str(error):
            raise
        # np.load takes what is not a zip archive for a pickle, and refuses it; zipfile raises
        # NotImplementedError / RuntimeError for damaged flags (encryption, unknown versions).
        raise ValueError(f"{path}: not a readable .npz archive ({error})") from None


def save_poses(path, pose_seq: PoseSequence) -> None:
    """Writes a ``.npz`` that ``load_poses`` reads back exactly: ``keypoints`` (T, K, 3)
    pixels, ``layout``, ``height``, ``width``, ``coordinates="pixels"``."""
    path = os.fspath(path)
    files.write_npz(path, keypoints=pose_seq.points, layout=np.str_(pose_seq.layout),
                     height=np.int64(pose_seq.height), width=np.int64(pose_seq.width),
                     coordinates=np.str_("pixels"))
