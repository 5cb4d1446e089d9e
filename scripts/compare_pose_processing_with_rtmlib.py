"""A manual check of consist_jax.poses.extract's pre/post-processing against rtmlib's.

rtmlib is not a dependency: it requires both opencv-python and opencv-contrib-python (two
versions of cv2 in one environment) and downloads weights when a model path does not
exist. To run this check, install it aside without its dependencies:

    pip install --target /tmp/rtmlib_check --no-deps rtmlib==0.0.16 opencv-python-headless
    PYTHONPATH=/tmp/rtmlib_check python scripts/compare_pose_processing_with_rtmlib.py

It prints the largest difference of each stage on random inputs. OpenCV interpolates
with 1/32-pixel fixed-point weights and rounds to uint8, so the images may differ by
about (1/32) x the largest step between neighbouring pixels, plus 1 for rounding; boxes
and keypoints agree to float rounding. Scores differ on purpose: rtmlib averages the x and
y SimCC maxima, DWPose (the peers' code, which we follow) takes the smaller.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from consist_jax.poses import extract  # noqa: E402
from tests import pose_models  # noqa: E402
from rtmlib.tools.object_detection.yolox import YOLOX  # noqa: E402
from rtmlib.tools.pose_estimation.pre_processings import bbox_xyxy2cs, top_down_affine  # noqa: E402
from rtmlib.tools.pose_estimation.rtmpose import RTMPose  # noqa: E402


def main(trials: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    detector = object.__new__(YOLOX)  # no model: only its pre/post-processing
    detector.model_input_size, detector.nms_thr, detector.score_thr = (640, 640), 0.45, 0.3
    detector.det_mode = "human"
    pose = object.__new__(RTMPose)
    pose.model_input_size = (288, 384)
    worst = {"letterbox": 0.0, "crop": 0.0, "crop bound": 0.0, "boxes": 0.0, "keypoints": 0.0}
    for _ in range(trials):
        height, width = rng.integers(100, 900, 2)
        smooth = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
        image = np.asarray(__import__("PIL.Image").Image.fromarray(smooth).resize(
            (int(width), int(height)), 2))  # bilinear: neighbouring pixels differ a little
        ours, ratio = extract.letterbox(image, 640, 640)
        theirs, their_ratio = detector.preprocess(image)
        assert ratio == their_ratio
        worst["letterbox"] = max(worst["letterbox"], np.abs(ours - theirs).max())

        x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        box = np.array([x0, y0, rng.uniform(x0 + 20, width), rng.uniform(y0 + 20, height)])
        matrix = extract.crop_matrix(box, (384, 288))
        ours = extract.bilinear_warp(image, matrix, 384, 288, border="zero")
        center, scale = bbox_xyxy2cs(box, padding=1.25)
        theirs, scale = top_down_affine((288, 384), scale, center, image)
        step = np.abs(np.diff(image.astype(np.float64), axis=0)).max()
        step = max(step, np.abs(np.diff(image.astype(np.float64), axis=1)).max())
        worst["crop"] = max(worst["crop"], np.abs(ours - theirs).max())
        worst["crop bound"] = max(worst["crop bound"], step / 32 + 1)

        corners = rng.uniform(0, 300, (4, 2))
        sizes = rng.uniform(50, 200, (4, 2))
        people = [(*c, *(c + s), o, 0.9, 0) for c, s, o in
                  zip(corners, sizes, rng.uniform(0.2, 1.0, 4))]  # some below 0.3, some overlap
        raw = pose_models.yolox_output(people, ratio)
        ours_boxes = extract.decode_yolox(raw, (640, 640), ratio)
        theirs_boxes = detector.postprocess(raw[None].copy(), ratio)
        order = np.lexsort(theirs_boxes.T[::-1])
        mine = ours_boxes[np.lexsort(ours_boxes[:, :4].T[::-1]), :4]
        worst["boxes"] = max(worst["boxes"], np.abs(mine - theirs_boxes[order]).max())

        simcc_x = rng.normal(size=(1, 133, 576)).astype(np.float32)
        simcc_y = rng.normal(size=(1, 133, 768)).astype(np.float32)
        ours_points = extract.decode_simcc(simcc_x, simcc_y, matrix[None])[0, :, :2]
        theirs_points, _ = pose.postprocess([simcc_x, simcc_y], center, scale)
        worst["keypoints"] = max(worst["keypoints"], np.abs(ours_points - theirs_points[0]).max())
    for name, value in worst.items():
        print(f"{name:>11}: {value:.4g}")


if __name__ == "__main__":
    main()
