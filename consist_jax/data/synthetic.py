"""Procedural "people" (and "faces") videos: the synthetic datasets the demos train and
test on.

Each identity is an articulated figure with its own fixed appearance (skin, hair,
shirt/sleeve/trouser/shoe colours, a torso pattern anchored to the body, a
background) moving through smooth random motion: joint angles over time plus a
global translation across the frame large enough that the reference frame is a
poor copy-prediction of a later frame. Every frame comes with its OpenPose-18
keypoints, the pose image drawn by the project's one renderer
(consist_jax.poses.render) and the figure's mask.

With ``kind="faces"`` (face reenactment, configs/face_reenact.py) each identity is a
face instead (skin, hair, eye and lip colours, face shape), turning and tilting its
head, opening and closing its mouth and blinking, with its 68 iBUG landmarks (layout
``face68``) projected from the same 3-d face template the pixels are drawn from: the
eye landmarks outline the drawn eyes, the lip landmarks the drawn lips.

CLI:
    python -m consist_jax.data.synthetic --out DIR --identities 200 --frames 48 \
        --size 64 --seed 0 [--kind faces]

Writes DIR/synthetic_{people,faces}-{train,test}.array_record-SSSSS-of-NNNNN (one record
per video, format in consist_jax.data.records) and DIR/dataset_info.json.
Deterministic by seed: every video is drawn from its own
np.random.default_rng([seed, identity, video]) stream, independent of worker count.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from typing import Sequence

import numpy as np

from consist_jax import checks
from consist_jax.data import records
from consist_jax.files import ensure_folder, write_json
from consist_jax.data.shards import write_split_shards
from consist_jax.poses import layouts
from consist_jax.poses.keypoints import example_face_units
from consist_jax.poses.render import draw_skeletons

DATASET_NAME = "synthetic_people"
LAYOUT = layouts.OPENPOSE_18_NAME
# kind -> (dataset name, layout)
KINDS = {"people": (DATASET_NAME, LAYOUT),
         "faces": ("synthetic_faces", layouts.FACE_68_NAME)}
# Frames of (chunk, H, W) float32 scratch arrays are drawn at most this many pixels at a time.
_PIXELS_PER_CHUNK = 1 << 21


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Sizes in pixels, fps only recorded as metadata."""

    identities: int = 200
    frames: int = 48
    size: int = 64
    seed: int = 0
    videos_per_identity: int = 1
    test_fraction: float = 0.1
    fps: float = 12.0
    image_encoding: str = "raw"  # "png" keeps large resolutions small on disk
    records_per_shard: int = 64
    workers: int = 0  # processes for drawing; 0 draws in this process
    kind: str = "people"  # or "faces" (face reenactment: face68 landmarks)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"synthetic.kind={self.kind!r}: one of {sorted(KINDS)}")
        for name in ("identities", "frames", "size", "videos_per_identity", "records_per_shard"):
            checks.positive_int(f"synthetic.{name}", getattr(self, name))
        checks.non_negative_int("synthetic.workers", self.workers)
        checks.seed("synthetic.seed", self.seed)
        checks.fraction_below_one("synthetic.test_fraction", self.test_fraction)
        checks.positive_number("synthetic.fps", self.fps)
        if self.image_encoding not in records.IMAGE_ENCODINGS:
            raise ValueError(f"synthetic.image_encoding={self.image_encoding!r}: one of {records.IMAGE_ENCODINGS}")


@dataclasses.dataclass(frozen=True)
class Appearance:
    """One identity's look: RGB colours in [0, 255], lengths as fractions of the frame height."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str            # "short" | "long" | "bun" | "bald"
    shirt: np.ndarray
    sleeve: np.ndarray
    trousers: np.ndarray
    shoes: np.ndarray
    pattern: str               # "solid" | "hstripes" | "vstripes" | "checks" | "dots"
    pattern_colour: np.ndarray
    pattern_period: float
    background: str            # "solid" | "gradient" | "checker" | "stripes"
    background_colours: np.ndarray  # (2, 3)
    background_period: float
    proportions: dict          # name -> length (fraction of frame height)


@dataclasses.dataclass(frozen=True)
class Motion:
    """Per-frame drivers of the figure, each (T,) in radians unless noted."""

    pelvis: np.ndarray         # (T, 2) pixel position of the hips' midpoint
    scale: np.ndarray          # (T,) multiplies every body length
    lean: np.ndarray
    head_tilt: np.ndarray
    arm_raise: np.ndarray      # (T, 2) [right, left]
    elbow_bend: np.ndarray     # (T, 2)
    leg_raise: np.ndarray      # (T, 2)
    knee_bend: np.ndarray      # (T, 2)


_SKIN_TONES = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 66],
                        [161, 102, 58], [120, 75, 45], [90, 56, 37]], np.float32)
_HAIR_COLOURS = np.array([[20, 15, 10], [70, 45, 25], [140, 90, 40], [220, 190, 120],
                          [170, 60, 30], [200, 200, 200], [60, 60, 160]], np.float32)
_HAIR_STYLES = ("short", "long", "bun", "bald")
_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots")
_BACKGROUNDS = ("solid", "gradient", "checker", "stripes")


# ----------------------------------------------------------------------------- appearance

def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draws one identity's appearance."""
    def colour():
        return rng.uniform(0, 255, 3).astype(np.float32)

    background_colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    proportions = {
        "torso": rng.uniform(0.22, 0.27), "shoulder_half": rng.uniform(0.07, 0.10),
        "hip_half": rng.uniform(0.045, 0.065), "upper_arm": rng.uniform(0.12, 0.15),
        "forearm": rng.uniform(0.11, 0.14), "thigh": rng.uniform(0.15, 0.18),
        "shin": rng.uniform(0.14, 0.17), "neck": rng.uniform(0.035, 0.05),
        "head_radius": rng.uniform(0.055, 0.07), "limb_radius": rng.uniform(0.022, 0.03),
        "leg_radius": rng.uniform(0.028, 0.036),
    }
    return Appearance(
        skin=_SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 6, 3).astype(np.float32),
        hair=_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))],
        hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
        shirt=colour(), sleeve=colour(), trousers=colour(), shoes=colour(),
        pattern=_PATTERNS[rng.integers(len(_PATTERNS))], pattern_colour=colour(),
        pattern_period=float(rng.uniform(0.03, 0.06)),
        background=_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))],
        background_colours=background_colours,
        background_period=float(rng.uniform(0.08, 0.25)),
        proportions=proportions,
    )


# ----------------------------------------------------------------------------- motion

def smooth_signal(rng: np.random.Generator, num_frames: int, shape: Sequence[int] = (),
                  components: int = 3) -> np.ndarray:
    """(T, *shape) sums of random sinusoids, roughly in [-1, 1].

    Periods of 10-40 frames: a 16-frame clip sees a good part of a movement,
    and frames a clip apart are in clearly different poses.
    """
    t = np.arange(num_frames, dtype=np.float32).reshape((num_frames,) + (1,) * (len(shape) + 1))
    periods = rng.uniform(10.0, 40.0, tuple(shape) + (components,))
    phases = rng.uniform(0, 2 * np.pi, tuple(shape) + (components,))
    weights = rng.dirichlet(np.ones(components), size=tuple(shape) or None)
    waves = np.sin(2 * np.pi * t / periods + phases)
    return (waves * weights).sum(-1).astype(np.float32) * 1.3


def sample_motion(rng: np.random.Generator, num_frames: int, size: int) -> Motion:
    """Draws smooth random motion for a size x size frame."""
    def between(low, high, shape=()):
        s = smooth_signal(rng, num_frames, shape)
        return low + (high - low) * 0.5 * (np.clip(s, -1, 1) + 1)

    # Global travel: the figure wanders over most of the frame width.
    x = size * (0.5 + 0.27 * np.clip(smooth_signal(rng, num_frames), -1, 1))
    y = size * (0.56 + 0.04 * np.clip(smooth_signal(rng, num_frames), -1, 1))
    return Motion(
        pelvis=np.stack([x, y], -1).astype(np.float32),
        scale=between(0.88, 1.08),
        lean=between(-0.3, 0.3),
        head_tilt=between(-0.35, 0.35),
        arm_raise=between(-0.3, 2.9, (2,)),
        elbow_bend=between(-0.4, 2.3, (2,)),
        leg_raise=between(-0.15, 0.75, (2,)),
        knee_bend=between(0.0, 1.4, (2,)),
    )


# ----------------------------------------------------------------------------- skeleton

def _rotate(vectors: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """(T, 2) vectors rotated by (T,) angles (counter-clockwise in a y-up frame)."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = vectors[:, :1], vectors[:, 1:]
    return np.concatenate([c * x - s * y, s * x + c * y], axis=1)


def skeleton_joints(motion: Motion, appearance: Appearance, size: int) -> dict:
    """Forward kinematics: name -> (T, 2) pixel positions (x, y), image y pointing down.

    The figure faces the camera, so its right side is on the image's left. Every
    sideways quantity is multiplied by `side` (-1 right, +1 left): a mirrored
    figure with swapped sides is again a valid figure, which flip augmentation needs.
    """
    length = {k: v * size * motion.scale[:, None] for k, v in appearance.proportions.items()}
    up = np.stack([np.sin(motion.lean), -np.cos(motion.lean)], -1)  # along the spine
    across = np.stack([np.cos(motion.lean), np.sin(motion.lean)], -1)  # towards image +x
    joints = {"pelvis": motion.pelvis}
    joints["neck"] = motion.pelvis + length["torso"] * up
    head_up = _rotate(up, motion.head_tilt)
    head_across = _rotate(across, motion.head_tilt)
    joints["head"] = joints["neck"] + (length["neck"] + length["head_radius"]) * head_up
    radius = length["head_radius"]
    joints["nose"] = joints["head"] - 0.15 * radius * head_up
    for index, (side, prefix) in enumerate(((-1.0, "r_"), (1.0, "l_"))):
        joints[prefix + "eye"] = joints["head"] + radius * (0.3 * head_up + side * 0.38 * head_across)
        joints[prefix + "ear"] = joints["head"] + radius * (0.05 * head_up + side * 0.95 * head_across)
        shoulder = joints["neck"] + side * length["shoulder_half"] * across
        arm = np.cos(motion.arm_raise[:, index:index + 1]) * -up \
            + side * np.sin(motion.arm_raise[:, index:index + 1]) * across
        elbow = shoulder + length["upper_arm"] * arm
        forearm = _rotate(arm, -side * motion.elbow_bend[:, index])
        hip = motion.pelvis + side * length["hip_half"] * across
        leg = np.cos(motion.leg_raise[:, index:index + 1]) * -up \
            + side * np.sin(motion.leg_raise[:, index:index + 1]) * across
        knee = hip + length["thigh"] * leg
        shin = _rotate(leg, side * motion.knee_bend[:, index])
        joints.update({
            prefix + "shoulder": shoulder, prefix + "elbow": elbow,
            prefix + "wrist": elbow + length["forearm"] * forearm,
            prefix + "hip": hip, prefix + "knee": knee,
            prefix + "ankle": knee + length["shin"] * shin,
        })
    return joints


def openpose18_keypoints(joints: dict, size: int) -> np.ndarray:
    """Joint positions -> (T, 18, 3) float32 (x, y, confidence).

    Confidence is 1 for points inside the frame and 0 outside (what a detector
    reports for body parts it cannot see).
    """
    xy = np.stack([joints[name] for name in layouts.OPENPOSE_18.keypoint_names], axis=1)
    inside = np.all((xy >= 0) & (xy <= size - 1), axis=-1)
    return np.concatenate([xy, inside[..., None]], -1).astype(np.float32)


# ----------------------------------------------------------------------------- drawing

def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel rows py (H, 1), columns px (1, W), segments a->b (T, 2) -> (T, H, W) distances."""
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    abx, aby = (b[:, 0] - a[:, 0])[:, None, None], (b[:, 1] - a[:, 1])[:, None, None]
    dx, dy = px - ax, py - ay
    t = np.clip((dx * abx + dy * aby) / np.maximum(abx * abx + aby * aby, 1e-6), 0.0, 1.0)
    return np.hypot(dx - t * abx, dy - t * aby)


def _coverage(distance: np.ndarray, radius) -> np.ndarray:
    """Anti-aliased inside-ness of a shape of given radius (one pixel soft edge)."""
    return np.clip(np.asarray(radius)[..., None, None] - distance + 0.5, 0.0, 1.0)


def _paint(canvas: np.ndarray, figure: np.ndarray, alpha: np.ndarray, colour) -> None:
    """Over-composites `colour` ((3,) or (T, H, W, 3)) with alpha (T, H, W) onto canvas
    (T, H, W, 3), and records the coverage in figure (T, H, W), both in place.

    Only covered pixels are touched: one body part covers a few percent of the frame.
    """
    where = np.nonzero(alpha)
    a = alpha[where][:, None]
    colour = colour[where] if np.ndim(colour) == 4 else colour
    canvas[where] += a * (colour - canvas[where])
    figure[where] = np.maximum(figure[where], a[:, 0])


def _background(appearance: Appearance, px: np.ndarray, py: np.ndarray, size: int) -> np.ndarray:
    """Float32 background broadcastable to (H, W, 3), the same in every frame (static camera)."""
    c0, c1 = appearance.background_colours
    period = appearance.background_period * size
    if appearance.background == "gradient":
        weight = (py / max(size - 1, 1))[..., None]
    elif appearance.background == "checker":
        weight = ((np.floor(px / period) + np.floor(py / period)) % 2)[..., None]
    elif appearance.background == "stripes":
        weight = (np.floor((px + py) / period) % 2)[..., None]
    else:
        weight = np.zeros(px.shape + (1,), np.float32)
    return (c0 * (1 - weight) + c1 * weight).astype(np.float32)


def _torso(joints: dict, appearance: Appearance, px, py, size: int):
    """Torso coverage and its patterned colour, both anchored to the body.

    Returns alpha (T, H, W) and colour (T, H, W, 3).
    """
    neck, pelvis = joints["neck"], joints["pelvis"]
    spine = neck - pelvis
    spine_length = np.maximum(np.hypot(spine[:, 0], spine[:, 1]), 1e-6)
    up = spine / spine_length[:, None]
    across = np.stack([-up[:, 1], up[:, 0]], -1)
    dx, dy = px - pelvis[:, 0, None, None], py - pelvis[:, 1, None, None]
    v = dx * up[:, 0, None, None] + dy * up[:, 1, None, None]       # along the spine
    u = dx * across[:, 0, None, None] + dy * across[:, 1, None, None]  # sideways
    shoulder_half = np.hypot(*(joints["l_shoulder"] - joints["neck"]).T)
    hip_half = np.hypot(*(joints["l_hip"] - pelvis).T)
    fraction = np.clip(v / spine_length[:, None, None], 0.0, 1.0)
    half_width = (hip_half[:, None, None] * 1.25 * (1 - fraction)
                  + shoulder_half[:, None, None] * 1.1 * fraction)
    inside_v = np.minimum(v + 0.02 * size, spine_length[:, None, None] - v) + 0.5
    alpha = np.clip(np.minimum(half_width - np.abs(u) + 0.5, inside_v), 0.0, 1.0)
    period = appearance.pattern_period * size
    if appearance.pattern == "hstripes":
        pattern = np.floor(v / period) % 2
    elif appearance.pattern == "vstripes":
        pattern = np.floor(u / period) % 2
    elif appearance.pattern == "checks":
        pattern = (np.floor(u / period) + np.floor(v / period)) % 2
    elif appearance.pattern == "dots":
        cu, cv = (u / period) % 2 - 1, (v / period) % 2 - 1
        pattern = (cu * cu + cv * cv < 0.3).astype(np.float32)
    else:
        pattern = np.zeros_like(u)
    colour = appearance.shirt * (1 - pattern[..., None]) + appearance.pattern_colour * pattern[..., None]
    return alpha, colour


def draw_figure(joints: dict, appearance: Appearance, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws the figure over its background.

    joints: name -> (T, 2) from `skeleton_joints`. Returns frames (T, size, size, 3)
    uint8 and masks (T, size, size) uint8 (1 on the figure). Painted back to front:
    long hair, legs, shoes, torso, arms, neck, head, hair.
    """
    num_frames = joints["neck"].shape[0]
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    masks = np.empty((num_frames, size, size), np.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, num_frames, chunk):
        part = {k: v[start:start + chunk] for k, v in joints.items()}
        frames[start:start + chunk], masks[start:start + chunk] = _draw_chunk(part, appearance, size)
    return frames, masks


def _draw_chunk(joints: dict, appearance: Appearance, size: int):
    # Pixel coordinates as a column (H, 1) and a row (1, W): arrays broadcast to
    # (T, H, W) only where a result needs it, which halves the drawing work.
    py = np.arange(size, dtype=np.float32)[:, None]
    px = np.arange(size, dtype=np.float32)[None, :]
    num_frames = joints["neck"].shape[0]
    # Pixels per unit of body proportion, per frame (the torso's drawn length / its proportion).
    pixels_per_unit = np.hypot(*(joints["neck"] - joints["pelvis"]).T) / appearance.proportions["torso"]

    def radius(name):
        return appearance.proportions[name] * pixels_per_unit
    canvas = np.broadcast_to(_background(appearance, px, py, size),
                             (num_frames, size, size, 3)).copy()
    figure = np.zeros((num_frames, size, size), np.float32)

    def paint(alpha, colour):
        _paint(canvas, figure, alpha, colour)

    def capsule(a, b, r):
        return _coverage(_segment_distance(px, py, joints[a], joints[b]), r)

    head_r = radius("head_radius")
    if appearance.hair_style == "long":
        below_head = joints["head"] + (joints["neck"] - joints["head"]) * 2.2
        hair_alpha = _coverage(_segment_distance(px, py, joints["head"], below_head), head_r * 1.15)
        paint(hair_alpha, appearance.hair)
    for side in ("r_", "l_"):
        paint(capsule(side + "hip", side + "knee", radius("leg_radius")), appearance.trousers)
        paint(capsule(side + "knee", side + "ankle", radius("leg_radius") * 0.85), appearance.trousers)
        paint(capsule(side + "ankle", side + "ankle", radius("leg_radius") * 1.1), appearance.shoes)
    paint(*_torso(joints, appearance, px, py, size))
    for side in ("r_", "l_"):
        paint(capsule(side + "shoulder", side + "elbow", radius("limb_radius")), appearance.sleeve)
        paint(capsule(side + "elbow", side + "wrist", radius("limb_radius") * 0.8), appearance.skin)
        paint(capsule(side + "wrist", side + "wrist", radius("limb_radius") * 1.05), appearance.skin)
    paint(capsule("neck", "head", radius("limb_radius") * 0.9), appearance.skin)
    paint(capsule("head", "head", head_r), appearance.skin)
    if appearance.hair_style in ("short", "long"):
        # A cap: the head disc's upper part, i.e. the disc shifted up, clipped to the head.
        top = joints["head"] + (joints["head"] - joints["nose"]) * 6.0
        cap = np.minimum(capsule("head", "head", head_r * 1.08),
                         _coverage(_segment_distance(px, py, top, top), head_r * 1.05))
        paint(cap, appearance.hair)
    elif appearance.hair_style == "bun":
        bun = joints["head"] + (joints["head"] - joints["nose"]) * 8.0
        paint(_coverage(_segment_distance(px, py, bun, bun), head_r * 0.55), appearance.hair)
    frames = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, (figure >= 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- faces

@dataclasses.dataclass(frozen=True)
class FaceAppearance:
    """One face identity: RGB colours in [0, 255]; shape factors multiply the template's."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str            # "short" | "long" | "bald"
    iris: np.ndarray
    lips: np.ndarray
    background: str            # as Appearance's
    background_colours: np.ndarray  # (2, 3)
    background_period: float
    half_width: float          # of the face, as a fraction of the frame size
    jaw_length: float          # chin height, multiplies the template's
    eye_size: float            # eye height
    eye_spacing: float         # added to each eye's distance from the face's midline
    mouth_width: float


@dataclasses.dataclass(frozen=True)
class FaceMotion:
    """Per-frame drivers of a face, each (T,) unless noted; angles in radians."""

    centre: np.ndarray         # (T, 2) pixel position of the nose tip
    scale: np.ndarray          # multiplies the face's size
    yaw: np.ndarray            # head turn (positive: the face turns to the image's right)
    roll: np.ndarray           # head tilt in the image plane
    mouth: np.ndarray          # 0 closed .. 1 open
    eyes: np.ndarray           # eye openness: 1 open .. 0 closed (a blink)


_IRIS_COLOURS = np.array([[60, 40, 25], [110, 70, 35], [70, 110, 160], [80, 120, 70],
                          [120, 120, 130]], np.float32)
_LIP_COLOURS = np.array([[190, 90, 90], [160, 70, 80], [210, 120, 120], [130, 60, 60]],
                        np.float32)
_FACE_HAIR_STYLES = ("short", "long", "bald")
# Landmark groups (iBUG-68 numbers) the motion moves.
_JAW, _R_EYE, _L_EYE = np.arange(0, 17), np.arange(36, 42), np.arange(42, 48)
_LOWER_LIPS = np.array([55, 56, 57, 58, 59, 65, 66, 67])
_EYE_LIDS = np.array([1, 2, 4, 5])  # within an eye: the upper (1, 2) and lower (4, 5) lid points
# The rigid features (iBUG-68 numbers): brows, nose bridge, nose base, eyes, lips.
_FACE_PLATES = (np.arange(17, 22), np.arange(22, 27), np.arange(27, 31), np.arange(31, 36),
                _R_EYE, _L_EYE, np.arange(48, 68))
_FOREHEAD_POINTS = 9  # the arc closing the face outline above the brows
_FOREHEAD_HEIGHT = 1.0  # face units above the jaw's ends (y = -0.3)


def sample_face_appearance(rng: np.random.Generator) -> FaceAppearance:
    """Draws one face identity."""
    return FaceAppearance(
        skin=_SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 6, 3).astype(np.float32),
        hair=_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))],
        hair_style=_FACE_HAIR_STYLES[rng.integers(len(_FACE_HAIR_STYLES))],
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
        lips=_LIP_COLOURS[rng.integers(len(_LIP_COLOURS))],
        background=_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))],
        background_colours=rng.uniform(0, 255, (2, 3)).astype(np.float32),
        background_period=float(rng.uniform(0.08, 0.25)),
        half_width=float(rng.uniform(0.26, 0.30)),
        jaw_length=float(rng.uniform(0.9, 1.1)),
        eye_size=float(rng.uniform(1.2, 1.6)),
        eye_spacing=float(rng.uniform(-0.05, 0.05)),
        mouth_width=float(rng.uniform(0.85, 1.15)),
    )


def _blinks(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """(T,) eye openness: open, with a blink (3 frames closing and opening) every 9-15
    frames, the first within the first 12."""
    openness = np.ones(num_frames, np.float32)
    start = int(rng.integers(0, 12))
    for t in range(start, num_frames, int(rng.integers(9, 16))):
        openness[t:t + 3] = np.minimum(openness[t:t + 3], [0.4, 0.0, 0.5][:num_frames - t])
    return openness


def sample_face_motion(rng: np.random.Generator, num_frames: int, size: int) -> FaceMotion:
    """Draws smooth random head motion, a talking mouth and blinks for a size x size frame."""
    def between(low, high):
        return low + (high - low) * 0.5 * (np.clip(smooth_signal(rng, num_frames), -1, 1) + 1)

    centre = np.stack([size * between(0.44, 0.56), size * between(0.50, 0.58)], -1)
    return FaceMotion(centre=centre.astype(np.float32), scale=between(0.9, 1.05),
                      yaw=between(-0.4, 0.4), roll=between(-0.3, 0.3),
                      mouth=between(0.0, 1.0) ** 2, eyes=_blinks(rng, num_frames))  # talking


def face_template(appearance: FaceAppearance) -> np.ndarray:
    """(68 + _FOREHEAD_POINTS, 3) the identity's face in face units (x right, y down, z
    towards the camera; half-width 1, origin at the nose tip): the iBUG landmarks, then the
    forehead arc that closes the outline. Depth puts the face on a cylinder, the nose in
    front of it."""
    xy = example_face_units().copy()
    jaw_y = xy[_JAW, 1]
    xy[_JAW, 1] = np.where(jaw_y > -0.3, -0.3 + (jaw_y + 0.3) * appearance.jaw_length, jaw_y)
    for eye, side in ((_R_EYE, -1.0), (_L_EYE, 1.0)):
        middle = xy[eye, 1].mean()
        xy[eye, 1] = middle + (xy[eye, 1] - middle) * appearance.eye_size
        xy[eye, 0] += side * appearance.eye_spacing
    mouth = np.arange(48, 68)
    xy[mouth, 0] *= appearance.mouth_width
    angle = np.linspace(0, np.pi, _FOREHEAD_POINTS + 2)[1:-1]
    forehead = np.stack([np.cos(angle), -0.3 - _FOREHEAD_HEIGHT * np.sin(angle)], -1)
    xy = np.concatenate([xy, forehead])
    # Depth: each feature a rigid plate at its depth on a cylinder of radius 1 (so turning
    # the head moves it as a whole and keeps its outline convex, as drawn), the nose in
    # front of it; the outline (jaw, forehead) at depth 0, narrowing as the head turns.
    z = np.zeros(len(xy))
    for part in _FACE_PLATES:
        z[part] = np.sqrt(1 - np.mean(xy[part, 0]) ** 2)
    z[36:48] *= 0.85  # the eyes sit in their sockets: inside the outline when the head turns
    z[27:31] += np.linspace(0.1, 0.4, 4)  # the nose bridge, out to the tip
    z[31:36] += 0.25
    return np.concatenate([xy, z[:, None]], -1).astype(np.float32)


def face_points(motion: FaceMotion, appearance: FaceAppearance, size: int) -> np.ndarray:
    """(T, 68 + _FOREHEAD_POINTS, 2) pixel positions: the template with the mouth and eyes
    of each frame, turned (yaw), projected, tilted (roll), scaled and placed."""
    template = face_template(appearance)
    num_frames = len(motion.yaw)
    points = np.broadcast_to(template, (num_frames,) + template.shape).copy()
    points[:, _LOWER_LIPS, 1] += 0.2 * motion.mouth[:, None]
    chin = np.cos(np.linspace(-np.pi / 2, np.pi / 2, 17)) ** 2  # jaw points near the chin move
    points[:, _JAW, 1] += 0.12 * motion.mouth[:, None] * chin
    for eye in (_R_EYE, _L_EYE):
        middle = points[:, eye[[0, 3]], 1].mean(-1, keepdims=True)  # the corners' height
        lids = eye[_EYE_LIDS]
        points[:, lids, 1] = middle + (points[:, lids, 1] - middle) * motion.eyes[:, None]
    yaw = motion.yaw[:, None]
    x = points[..., 0] * np.cos(yaw) + points[..., 2] * np.sin(yaw)
    xy = _rotate(np.stack([x, points[..., 1]], -1).reshape(-1, 2),
                 np.repeat(-motion.roll, points.shape[1])).reshape(num_frames, -1, 2)
    pixels_per_unit = appearance.half_width * size * motion.scale[:, None, None]
    return (motion.centre[:, None] + pixels_per_unit * xy).astype(np.float32)


def _convex_coverage(px: np.ndarray, py: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-ness (T, H, W) of convex polygons (T, N, 2) (either winding):
    the signed distance to the nearest edge's line, with a one-pixel soft edge. A polygon
    of under half a pixel's area covers nothing."""
    a, b = polygon, np.roll(polygon, -1, axis=1)
    cross = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
    area = 0.5 * cross.sum(-1)  # signed: the winding
    edge = b - a
    length = np.maximum(np.hypot(edge[..., 0], edge[..., 1]), 1e-6)
    inside = np.full((len(polygon),) + np.broadcast_shapes(px.shape, py.shape), np.inf, np.float32)
    for i in range(polygon.shape[1]):
        ex, ey = edge[:, i, 0, None, None], edge[:, i, 1, None, None]
        ax, ay = a[:, i, 0, None, None], a[:, i, 1, None, None]
        distance = (ex * (py - ay) - ey * (px - ax)) / length[:, i, None, None]
        inside = np.minimum(inside, distance * np.sign(area)[:, None, None])
    return np.clip(inside + 0.5, 0.0, 1.0) * (np.abs(area) >= 0.5)[:, None, None]


def draw_face(points: np.ndarray, appearance: FaceAppearance, size: int):
    """Draws faces over their background; points (T, 68 + _FOREHEAD_POINTS, 2) from
    `face_points`. Returns frames (T, size, size, 3) uint8 and masks (T, size, size) uint8
    (1 on the head: face and hair). Painted back to front: long hair, neck, face, hair,
    brows, nose, eyes (whites, irises), lips, the open mouth."""
    frames = np.empty((len(points), size, size, 3), np.uint8)
    masks = np.empty((len(points), size, size), np.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, len(points), chunk):
        part = slice(start, start + chunk)
        frames[part], masks[part] = _draw_face_chunk(points[part], appearance, size)
    return frames, masks


def _draw_face_chunk(points: np.ndarray, appearance: FaceAppearance, size: int):
    py = np.arange(size, dtype=np.float32)[:, None]
    px = np.arange(size, dtype=np.float32)[None, :]
    num_frames = len(points)
    canvas = np.broadcast_to(_background(appearance, px, py, size),
                             (num_frames, size, size, 3)).copy()
    head = np.zeros((num_frames, size, size), np.float32)
    scratch = np.zeros_like(head)  # coverage of what is not the head
    outline = np.concatenate([points[:, :17], points[:, 68:]], axis=1)  # jaw, then forehead
    unit = np.hypot(*(points[:, 16] - points[:, 0]).T) / 2  # pixels per face unit

    def paint(alpha, colour, on_head=True):
        _paint(canvas, head if on_head else scratch, alpha, colour)

    def capsule(a, b, radius):
        return _coverage(_segment_distance(px, py, a, b), radius)

    top = points[:, 68 + _FOREHEAD_POINTS // 2]
    chin = points[:, 8]
    if appearance.hair_style == "long":
        paint(capsule(top, 2 * chin - top, 1.15 * unit), appearance.hair)
    paint(capsule(chin, chin + (chin - top) * 0.6, 0.45 * unit), appearance.skin, on_head=False)
    face = _convex_coverage(px, py, outline)
    paint(face, appearance.skin)
    if appearance.hair_style in ("short", "long"):
        # The outline's top part, above a line just over the brows.
        brow = 0.5 * (points[:, 19] + points[:, 24])
        up = top - brow
        up /= np.maximum(np.hypot(*up.T), 1e-6)[:, None]
        hairline = brow + 0.35 * unit[:, None] * up
        above = ((px - hairline[:, 0, None, None]) * up[:, 0, None, None]
                 + (py - hairline[:, 1, None, None]) * up[:, 1, None, None])
        paint(np.minimum(face, np.clip(above + 0.5, 0, 1)), appearance.hair)
    brow_colour = 0.6 * appearance.hair
    for brow in (range(17, 21), range(22, 26)):
        for i in brow:
            paint(capsule(points[:, i], points[:, i + 1], 0.05 * unit), brow_colour)
    nose = 0.8 * appearance.skin
    paint(capsule(points[:, 27], points[:, 30], 0.04 * unit), nose)
    paint(_convex_coverage(px, py, points[:, 30:36]), nose)
    for eye in (_R_EYE, _L_EYE):
        white = _convex_coverage(px, py, points[:, eye])
        paint(white, np.float32([245, 245, 245]))
        centre = points[:, eye].mean(1)
        radius = 0.45 * np.hypot(*(points[:, eye[1]] - points[:, eye[5]]).T)
        paint(np.minimum(white, capsule(centre, centre, radius)), appearance.iris)
    paint(_convex_coverage(px, py, points[:, 48:60]), appearance.lips)
    paint(_convex_coverage(px, py, points[:, 60:68]), np.float32([40, 10, 15]))
    frames = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, (head >= 0.5).astype(np.uint8)


def make_face_video(config: SyntheticConfig, identity: int, video: int) -> records.VideoExample:
    """Draws one face video of one identity; keypoints are its 68 landmarks (face68)."""
    appearance = sample_face_appearance(np.random.default_rng([config.seed, identity]))
    motion = sample_face_motion(video_rng(config.seed, identity, video), config.frames,
                                config.size)
    points = face_points(motion, appearance, config.size)
    frames, masks = draw_face(points, appearance, config.size)
    landmarks = points[:, :layouts.NUM_FACE_POINTS]
    inside = np.all((landmarks >= 0) & (landmarks <= config.size - 1), axis=-1)
    keypoints = np.concatenate([landmarks, inside[..., None]], -1).astype(np.float32)
    layout = KINDS["faces"][1]
    return records.VideoExample(
        frames=frames, keypoints=keypoints,
        pose_images=draw_skeletons(keypoints, layout, config.size, config.size), masks=masks,
        video_id=f"id{identity:05d}_v{video:02d}", identity_id=f"id{identity:05d}",
        layout=layout, fps=config.fps)


# ----------------------------------------------------------------------------- videos

def video_rng(seed: int, identity: int, video: int) -> np.random.Generator:
    """The random stream of one video; appearance draws depend on (seed, identity) only."""
    return np.random.default_rng([seed, identity, video])


def make_video(config: SyntheticConfig, identity: int, video: int) -> records.VideoExample:
    """Draws one video of one identity (appearance shared by all its videos)."""
    if config.kind == "faces":
        return make_face_video(config, identity, video)
    appearance = sample_appearance(np.random.default_rng([config.seed, identity]))
    motion = sample_motion(video_rng(config.seed, identity, video), config.frames, config.size)
    joints = skeleton_joints(motion, appearance, config.size)
    keypoints = openpose18_keypoints(joints, config.size)
    frames, masks = draw_figure(joints, appearance, config.size)
    pose_images = draw_skeletons(keypoints, LAYOUT, config.size, config.size)
    return records.VideoExample(
        frames=frames, keypoints=keypoints, pose_images=pose_images, masks=masks,
        video_id=f"id{identity:05d}_v{video:02d}", identity_id=f"id{identity:05d}",
        layout=LAYOUT, fps=config.fps)


def identity_splits(num_identities: int, test_fraction: float, seed: int) -> dict:
    """{"train": sorted identities, "test": sorted identities}, disjoint, by seeded permutation."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_identities)
    num_test = int(round(num_identities * test_fraction))
    if test_fraction > 0 and num_identities > 1:
        num_test = min(max(num_test, 1), num_identities - 1)
    return {"train": sorted(order[num_test:].tolist()), "test": sorted(order[:num_test].tolist())}


def _encoded_video(args) -> bytes:
    config, identity, video = args
    return records.encode_video(make_video(config, identity, video),
                                image_encoding=config.image_encoding)


def generate(out_dir: str, config: SyntheticConfig) -> dict:
    """Writes the dataset to out_dir and returns its dataset_info dict."""
    ensure_folder(out_dir)
    splits = identity_splits(config.identities, config.test_fraction, config.seed)
    name, layout = KINDS[config.kind]
    info = {
        "name": name, "layout": layout, "record_format_version": records.FORMAT_VERSION,
        "height": config.size, "width": config.size, "frames_per_video": config.frames,
        "fps": config.fps, "config": dataclasses.asdict(config), "splits": {},
    }
    pool = multiprocessing.get_context("spawn").Pool(config.workers) if config.workers else None
    try:
        for split, identities in splits.items():
            jobs = [(config, i, v) for i in identities for v in range(config.videos_per_identity)]
            encoded = pool.imap(_encoded_video, jobs, chunksize=4) if pool else map(_encoded_video, jobs)
            files = write_split_shards(out_dir, name, split, encoded, len(jobs),
                                       config.records_per_shard)
            info["splits"][split] = {"num_records": len(jobs), "identities": identities,
                                     "files": [os.path.basename(f) for f in files]}
    finally:
        if pool:
            pool.close()
            pool.join()
    # Written last and atomically: its presence marks a complete dataset (trainer.ensure_dataset).
    write_json(os.path.join(out_dir, "dataset_info.json"), info, indent=1)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos-per-identity", type=int, default=1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--image-encoding", choices=("raw", "png"), default="raw")
    parser.add_argument("--kind", choices=sorted(KINDS), default="people")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(
            identities=args.identities, frames=args.frames, size=args.size, seed=args.seed,
            videos_per_identity=args.videos_per_identity, test_fraction=args.test_fraction,
            image_encoding=args.image_encoding, workers=args.workers, kind=args.kind)
    except ValueError as e:
        parser.error(str(e))

    def run(_):
        start = time.perf_counter()
        info = generate(args.out, config)
        counts = {s: v["num_records"] for s, v in info["splits"].items()}
        print(f"wrote {counts} videos to {args.out} in {time.perf_counter() - start:.1f} s")

    from consist_jax import cli

    cli.reports_user_errors(run)(argv)  # a full disk or a file at --out: one line, exit 2


if __name__ == "__main__":
    main()
