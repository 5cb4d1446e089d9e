"""Keypoint layouts: which point is which, how they connect, how they are coloured.

Three layouts:

* ``openpose18`` -- the OpenPose COCO-18 body: nose, neck, right arm, left arm, right
  leg, left leg, eyes, ears (18 points), drawn as OpenPose draws it.
* ``dwpose134`` -- DWPose's whole body (COCO-WholeBody with a neck added and the body
  reordered to OpenPose-18): body 18 + feet 6 + face 68 + left hand 21 + right hand 21,
  drawn as DWPose draws it.
* ``face68`` -- the 68 iBUG/dlib face landmarks alone (the same points, in the same order,
  as DWPose's face): the pose of face reenactment. Drawn as dlib's face overlay joins
  them (jaw, brows, nose, eyes, lips as polylines), each part in its own colour (our
  choice: DWPose draws its face as white dots, which cannot tell an eye from a lip).

"Right"/"left" are the person's, as in OpenPose (the right shoulder of a person facing
the camera appears on the image's left). Colours are RGB and are facts of the
OpenPose/DWPose drawing code, written out here.

A layout is immutable; its arrays are read-only.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np

OPENPOSE_18_NAME = "openpose18"
DWPOSE_134_NAME = "dwpose134"
FACE_68_NAME = "face68"

BODY_NAMES = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)
NECK = 1
NOSE = 0

# The 17 limbs OpenPose draws, in its drawing order, as (from, to) point indices. OpenPose
# lists two more (shoulder-ear) that it never draws; they are left out.
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)

# OpenPose's 18 colours: limb i is drawn in colour i (at 0.6 intensity), joint k in colour k.
# Red -> orange -> yellow -> green -> cyan -> blue -> magenta.
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
LIMB_INTENSITY = 0.6

# Body mirror pairs (right <-> left); nose and neck map to themselves.
BODY_MIRROR_PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))

# Kinematic tree rooted at the neck: parent of each body point (-1 for the root). It is
# exactly the tree of the 17 drawn limbs.
BODY_PARENTS = (1, -1, 1, 2, 3, 1, 5, 6, 1, 8, 9, 1, 11, 12, 0, 0, 14, 15)

# --- DWPose additions -----------------------------------------------------------------
FEET_NAMES = ("l_big_toe", "l_small_toe", "l_heel", "r_big_toe", "r_small_toe", "r_heel")
HAND_POINT_NAMES = (
    "wrist",
    "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip",
    "index_mcp", "index_pip", "index_dip", "index_tip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_tip",
    "ring_mcp", "ring_pip", "ring_dip", "ring_tip",
    "pinky_mcp", "pinky_pip", "pinky_dip", "pinky_tip",
)
# The 20 hand bones in DWPose's drawing order (local indices within one hand).
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19),
    (19, 20),
)
# Hand bone e is drawn in HSV colour (e / 20, 1, 1), rounded to 0..255.
HAND_EDGE_COLORS = (
    (255, 0, 0), (255, 77, 0), (255, 153, 0), (255, 229, 0), (204, 255, 0),
    (128, 255, 0), (51, 255, 0), (0, 255, 25), (0, 255, 102), (0, 255, 179),
    (0, 255, 255), (0, 178, 255), (0, 102, 255), (0, 25, 255), (51, 0, 255),
    (128, 0, 255), (204, 0, 255), (255, 0, 230), (255, 0, 153), (255, 0, 77),
)
HAND_JOINT_COLOR = (0, 0, 255)
FACE_DOT_COLOR = (255, 255, 255)

# Feet are not drawn by DWPose; when asked for (draw_feet=True) we draw them as body
# limbs from the ankle, in the colour of that leg's shin (our choice).
FEET_LIMBS = ((13, 18), (13, 19), (13, 20), (10, 21), (10, 22), (10, 23))
FEET_LIMB_COLORS = (OPENPOSE_COLORS[11],) * 3 + (OPENPOSE_COLORS[8],) * 3

# iBUG-68 face landmarks: mirror pairs (jaw, brows, nose base, eyes, outer and inner lips);
# the nose bridge (27-30) and the lips' centre points map to themselves.
FACE_MIRROR_PAIRS = (
    tuple((i, 16 - i) for i in range(8))
    + ((17, 26), (18, 25), (19, 24), (20, 23), (21, 22))
    + ((31, 35), (32, 34))
    + ((36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46))
    + ((48, 54), (49, 53), (50, 52), (55, 59), (56, 58))
    + ((60, 64), (61, 63), (65, 67))
)

# iBUG-68 parts as dlib's face overlay (render_face_detections) draws them: each part a
# polyline through its points in order; eyes, lips and the nose's underside are closed
# (the nose's loop runs through the tip, point 30). Right/left are the person's.
FACE_PARTS = (
    ("jaw", tuple(range(0, 17)), False),
    ("r_brow", tuple(range(17, 22)), False),
    ("l_brow", tuple(range(22, 27)), False),
    ("nose_bridge", tuple(range(27, 31)), False),
    ("nose_base", tuple(range(30, 36)), True),
    ("r_eye", tuple(range(36, 42)), True),
    ("l_eye", tuple(range(42, 48)), True),
    ("outer_lips", tuple(range(48, 60)), True),
    ("inner_lips", tuple(range(60, 68)), True),
)
# One colour per part (full intensity for the landmark dots; lines at LIMB_INTENSITY),
# the person's right side in warm and left in cool colours as OpenPose's limbs are.
FACE_PART_COLORS = {
    "jaw": (255, 255, 255), "r_brow": (255, 170, 0), "l_brow": (0, 170, 255),
    "nose_bridge": (255, 255, 0), "nose_base": (170, 255, 0), "r_eye": (255, 0, 0),
    "l_eye": (0, 0, 255), "outer_lips": (255, 0, 255), "inner_lips": (0, 255, 170),
}
FACE_NOSE_TIP = 30  # the root of the face layout's tree

FEET_START, FACE_START, LEFT_HAND_START, RIGHT_HAND_START = 18, 24, 92, 113
NUM_FACE_POINTS, NUM_HAND_POINTS = 68, 21


def _face_edges() -> tuple[list, list, list]:
    """(edges, edge colours, point colours) of the face parts, in FACE_PARTS order."""
    edges, edge_colors, point_colors = [], [], [None] * NUM_FACE_POINTS
    for part, points, closed in FACE_PARTS:
        ends = points + (points[0],) if closed else points
        edges += list(zip(ends[:-1], ends[1:]))
        edge_colors += [FACE_PART_COLORS[part]] * (len(ends) - 1)
        for point in points:
            if point_colors[point] is None:  # the nose tip keeps the bridge's colour
                point_colors[point] = FACE_PART_COLORS[part]
    return edges, edge_colors, point_colors


def _read_only(values, dtype) -> np.ndarray:
    array = np.array(values, dtype=dtype)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class PoseLayout:
    """A keypoint layout.

    Attributes:
      name: ``"openpose18"``, ``"dwpose134"`` or ``"face68"``.
      keypoint_names: K names.
      groups: group name -> (start, stop) slice bounds into the K points
        (``body``, and for DWPose ``feet``, ``face``, ``left_hand``, ``right_hand``;
        ``face`` only for face68).
      body_limbs: (17, 2) int, the drawn body limbs in drawing order ((0, 2) for face68).
      body_limb_colors: (17, 3) uint8, full-intensity RGB of each limb (drawn at 0.6).
      joint_colors: (18, 3) uint8, RGB of each body joint.
      flip_permutation: (K,) int, index of each point's mirror counterpart (an
        involution); a horizontally flipped pose is ``points[:, flip_permutation]`` with x
        mirrored.
      parents: (K,) int, the kinematic tree rooted at the neck (-1 for the neck). Feet
        hang from the ankles, face points from the nose, each hand's wrist point from the
        body wrist and its fingers along the hand bones. face68's tree is rooted at the
        nose tip (FACE_NOSE_TIP), every other point hanging from it.
      hand_edges: (20, 2) int, local hand bone indices in drawing order (DWPose only,
        (0, 2) for OpenPose-18).
      hand_edge_colors: (20, 3) uint8.
      feet_limbs, feet_limb_colors: the optional foot limbs (DWPose only).
      face_edges: (E, 2) int, the face polylines' segments as local indices within the
        face group (the iBUG numbers), in drawing order (face68 only; (0, 2) otherwise:
        DWPose draws face dots only).
      face_edge_colors: (E, 3) uint8, full-intensity RGB of each segment's part.
      face_point_colors: (68, 3) uint8, RGB of each face landmark's dot (face68: its
        part's colour; DWPose: white).
    """

    name: str
    keypoint_names: tuple[str, ...]
    groups: Mapping[str, tuple[int, int]]
    body_limbs: np.ndarray
    body_limb_colors: np.ndarray
    joint_colors: np.ndarray
    flip_permutation: np.ndarray
    parents: np.ndarray
    hand_edges: np.ndarray
    hand_edge_colors: np.ndarray
    feet_limbs: np.ndarray
    feet_limb_colors: np.ndarray
    face_edges: np.ndarray
    face_edge_colors: np.ndarray
    face_point_colors: np.ndarray

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    def group_slice(self, group: str) -> slice:
        start, stop = self.groups[group]
        return slice(start, stop)

    def __repr__(self) -> str:
        return f"PoseLayout({self.name!r}, K={self.num_keypoints})"


def _mirror_permutation(num_points: int, pairs) -> list[int]:
    permutation = list(range(num_points))
    for a, b in pairs:
        permutation[a], permutation[b] = b, a
    return permutation


def _no_face_edges(num_face_points: int) -> dict:
    """The face fields of a layout that draws its face (if any) as DWPose's white dots."""
    return dict(face_edges=_read_only(np.zeros((0, 2)), np.int64),
                face_edge_colors=_read_only(np.zeros((0, 3)), np.uint8),
                face_point_colors=_read_only([FACE_DOT_COLOR] * num_face_points, np.uint8))


def _openpose18() -> PoseLayout:
    return PoseLayout(
        name=OPENPOSE_18_NAME,
        keypoint_names=BODY_NAMES,
        groups=MappingProxyType({"body": (0, 18)}),
        body_limbs=_read_only(BODY_LIMBS, np.int64),
        body_limb_colors=_read_only(OPENPOSE_COLORS[:17], np.uint8),
        joint_colors=_read_only(OPENPOSE_COLORS, np.uint8),
        flip_permutation=_read_only(_mirror_permutation(18, BODY_MIRROR_PAIRS), np.int64),
        parents=_read_only(BODY_PARENTS, np.int64),
        hand_edges=_read_only(np.zeros((0, 2)), np.int64),
        hand_edge_colors=_read_only(np.zeros((0, 3)), np.uint8),
        feet_limbs=_read_only(np.zeros((0, 2)), np.int64),
        feet_limb_colors=_read_only(np.zeros((0, 3)), np.uint8),
        **_no_face_edges(0),
    )


def _dwpose134() -> PoseLayout:
    names = (
        BODY_NAMES
        + FEET_NAMES
        + tuple(f"face_{i:02d}" for i in range(NUM_FACE_POINTS))
        + tuple(f"l_hand_{n}" for n in HAND_POINT_NAMES)
        + tuple(f"r_hand_{n}" for n in HAND_POINT_NAMES)
    )
    pairs = (
        BODY_MIRROR_PAIRS
        + tuple((FEET_START + i, FEET_START + 3 + i) for i in range(3))
        + tuple((FACE_START + a, FACE_START + b) for a, b in FACE_MIRROR_PAIRS)
        + tuple((LEFT_HAND_START + i, RIGHT_HAND_START + i) for i in range(NUM_HAND_POINTS))
    )
    parents = list(BODY_PARENTS)
    parents += [13, 13, 13, 10, 10, 10]  # left foot from l_ankle, right foot from r_ankle
    parents += [NOSE] * NUM_FACE_POINTS
    for start, body_wrist in ((LEFT_HAND_START, 7), (RIGHT_HAND_START, 4)):
        hand_parents = [body_wrist] + [0] * (NUM_HAND_POINTS - 1)
        for a, b in HAND_EDGES:
            hand_parents[b] = start + a
        parents += hand_parents
    return PoseLayout(
        name=DWPOSE_134_NAME,
        keypoint_names=names,
        groups=MappingProxyType({
            "body": (0, 18),
            "feet": (FEET_START, FACE_START),
            "face": (FACE_START, LEFT_HAND_START),
            "left_hand": (LEFT_HAND_START, RIGHT_HAND_START),
            "right_hand": (RIGHT_HAND_START, RIGHT_HAND_START + NUM_HAND_POINTS),
        }),
        body_limbs=_read_only(BODY_LIMBS, np.int64),
        body_limb_colors=_read_only(OPENPOSE_COLORS[:17], np.uint8),
        joint_colors=_read_only(OPENPOSE_COLORS, np.uint8),
        flip_permutation=_read_only(_mirror_permutation(len(names), pairs), np.int64),
        parents=_read_only(parents, np.int64),
        hand_edges=_read_only(HAND_EDGES, np.int64),
        hand_edge_colors=_read_only(HAND_EDGE_COLORS, np.uint8),
        feet_limbs=_read_only(FEET_LIMBS, np.int64),
        feet_limb_colors=_read_only(FEET_LIMB_COLORS, np.uint8),
        **_no_face_edges(NUM_FACE_POINTS),
    )


def _face68() -> PoseLayout:
    edges, edge_colors, point_colors = _face_edges()
    parents = [FACE_NOSE_TIP] * NUM_FACE_POINTS
    parents[FACE_NOSE_TIP] = -1
    return PoseLayout(
        name=FACE_68_NAME,
        keypoint_names=tuple(f"face_{i:02d}" for i in range(NUM_FACE_POINTS)),
        groups=MappingProxyType({"face": (0, NUM_FACE_POINTS)}),
        body_limbs=_read_only(np.zeros((0, 2)), np.int64),
        body_limb_colors=_read_only(np.zeros((0, 3)), np.uint8),
        joint_colors=_read_only(np.zeros((0, 3)), np.uint8),
        flip_permutation=_read_only(_mirror_permutation(NUM_FACE_POINTS, FACE_MIRROR_PAIRS),
                                    np.int64),
        parents=_read_only(parents, np.int64),
        hand_edges=_read_only(np.zeros((0, 2)), np.int64),
        hand_edge_colors=_read_only(np.zeros((0, 3)), np.uint8),
        feet_limbs=_read_only(np.zeros((0, 2)), np.int64),
        feet_limb_colors=_read_only(np.zeros((0, 3)), np.uint8),
        face_edges=_read_only(edges, np.int64),
        face_edge_colors=_read_only(edge_colors, np.uint8),
        face_point_colors=_read_only(point_colors, np.uint8),
    )


OPENPOSE_18 = _openpose18()
DWPOSE_134 = _dwpose134()
FACE_68 = _face68()
LAYOUTS = MappingProxyType({layout.name: layout for layout in (OPENPOSE_18, DWPOSE_134, FACE_68)})
_ALIASES = MappingProxyType({
    "openpose": OPENPOSE_18_NAME, "openpose_18": OPENPOSE_18_NAME, "coco18": OPENPOSE_18_NAME,
    "dwpose": DWPOSE_134_NAME, "dwpose_134": DWPOSE_134_NAME, "wholebody": DWPOSE_134_NAME,
    "face": FACE_68_NAME, "face_68": FACE_68_NAME, "ibug68": FACE_68_NAME, "dlib68": FACE_68_NAME,
})


def get_layout(layout: str | PoseLayout) -> PoseLayout:
    """The layout named ``layout`` (``openpose18``/``dwpose134``/``face68`` or an alias),
    or itself."""
    if isinstance(layout, PoseLayout):
        return layout
    key = str(layout).lower()
    key = _ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise ValueError(f"unknown pose layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[key]
