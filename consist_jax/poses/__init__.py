"""Poses: keypoint layouts, the pose container, readers, the one renderer, alignment and
sequence utilities (numpy only).

    from consist_jax.poses import OPENPOSE_18, draw_skeletons, load_poses, align_poses
    poses = load_poses("driving/openpose_json/")                # PoseSequence
    images = draw_skeletons(points, "openpose18", 64, 64)       # (T, 64, 64, 3) uint8

``consist_jax.poses.render`` is the renderer module; its ``render(pose_seq)`` is not
re-exported here so that the module name stays unshadowed.
"""
from consist_jax.poses.align import (
    ALIGN_MODES,
    Alignment,
    align_poses,
    apply_alignment,
    fit_alignment,
)
from consist_jax.poses.io import load_poses, save_poses
from consist_jax.poses.keypoints import (
    PoseSequence,
    convert_layout,
    example_pose,
    to_layout_points,
)
from consist_jax.poses.layouts import (
    DWPOSE_134,
    FACE_68,
    LAYOUTS,
    OPENPOSE_18,
    PoseLayout,
    get_layout,
)
from consist_jax.poses.render import draw_skeletons
from consist_jax.poses.sequence import (
    crop_around_person,
    crop_poses,
    flip_horizontal,
    flip_keypoints,
    person_box,
    resample_fps,
    resize_poses,
    smooth_poses,
    stride_frames,
)

__all__ = [
    "ALIGN_MODES", "Alignment", "DWPOSE_134", "FACE_68", "LAYOUTS", "OPENPOSE_18", "PoseLayout",
    "PoseSequence", "align_poses", "apply_alignment", "convert_layout", "crop_around_person",
    "crop_poses", "draw_skeletons", "example_pose", "fit_alignment", "flip_horizontal",
    "flip_keypoints", "get_layout", "load_poses", "person_box", "resample_fps",
    "resize_poses", "save_poses", "smooth_poses", "stride_frames", "to_layout_points",
]
