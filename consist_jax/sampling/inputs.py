"""The user's files in, model-ready arrays out: what sample.py and the web page
(consist_jax.app) both read their inputs with, so the two give the same frames.

    reference, reference_pose, poses = inputs.read_inputs(pipe.resolution, "ref.png", "poses.json")
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from consist_jax.poses import extract
from consist_jax.sampling import io


def read_inputs(resolution: tuple[int, int], reference: str, poses: str, reference_pose: Optional[str] = None,
                align: str = "off", pose_detector: Optional[str] = None, pose_model: Optional[str] = None,
                out: str = "out.mp4") -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(reference (H, W, 3), reference pose (H, W, 3) or None, target poses (F, H, W, 3)):
    uint8 at the model's ``resolution``, each fitted around the person
    (``io.read_sample_inputs``). With both ONNX models, ``poses`` may be a real video, whose
    poses are extracted next to ``out`` first.
    """
    poses_path = extract.poses_for_sampling(poses, pose_detector, pose_model, out)
    return io.read_sample_inputs(reference, poses_path, resolution, reference_pose_path=reference_pose, align=align)
