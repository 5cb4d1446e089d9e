"""Skeleton rendering speed (the data pipeline renders poses on the fly).

    python bench/pose_render.py

Best of 5 runs per case, on this machine's CPU.
"""
import time

import numpy as np

from consist_jax.poses.keypoints import example_pose
from consist_jax.poses.render import draw_skeletons


def best_time(function, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    rng = np.random.default_rng(0)
    cases = [("openpose18", 48, 64), ("dwpose134", 48, 64), ("openpose18", 1, 512), ("dwpose134", 1, 512),
             ("dwpose134", 24, 512)]
    print("| layout | frames | size | ms |")
    print("|---|---|---|---|")
    for layout, frames, size in cases:
        base = example_pose(layout, size, size)
        clip = np.repeat(base[None], frames, axis=0)
        clip[..., :2] += rng.normal(0, size / 64, clip[..., :2].shape)
        seconds = best_time(lambda: draw_skeletons(clip, layout, size, size))
        print(f"| {layout} | {frames} | {size}x{size} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
