"""The user's files in, model-ready arrays out: what sample.py and the web page
(consist_jax.app) both read their inputs with, so the two give the same frames.

    reference, reference_pose, poses = inputs.read_inputs(pipe.resolution, "ref.png", "poses.json")
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from consist_jax.poses import extract
from consist_jax.poses.render import render
from consist_jax.sampling import io


def reference_pose_image(path: str, resolution: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
    """The reference's pose: a keypoints file (its first frame; a file without an image size
    is taken to be on the reference's ``canvas``) or one pose image drawn on that canvas."""
    if path.lower().endswith(io.KEYPOINT_SUFFIXES):
        return render(io.read_keypoints(path, resolution, canvas=canvas))[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference pose {path!r} does not exist")
    return io.read_pose_images(path, resolution, canvas)[0]


def read_inputs(resolution: tuple[int, int], reference: str, poses: str, reference_pose: Optional[str] = None,
                align: str = "off", pose_detector: Optional[str] = None, pose_model: Optional[str] = None,
                out: str = "out.mp4") -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(reference (H, W, 3), reference pose (H, W, 3) or None, target poses (F, H, W, 3)):
    uint8 at the model's ``resolution``.

    The reference image's size is the canvas: pose images must be drawn on it, and keypoint
    files that record no image size (plain OpenPose JSON) are taken to be on it. With both
    ONNX models, ``poses`` may be a real video, whose poses are extracted next to ``out``.
    """
    image, canvas = io.read_reference(reference, resolution)
    reference_keypoints = reference_pose if reference_pose and \
        reference_pose.lower().endswith(io.KEYPOINT_SUFFIXES) else None
    poses_path = extract.poses_for_sampling(poses, pose_detector, pose_model, out)
    pose_images, _ = io.read_poses(poses_path, resolution, reference_keypoints=reference_keypoints,
                                   align=align, canvas=canvas)
    ref_pose = reference_pose_image(reference_pose, resolution, canvas) if reference_pose else None
    return image, ref_pose, pose_images
