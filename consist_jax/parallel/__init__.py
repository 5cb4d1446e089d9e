"""Parallelism helpers that are not a training concern (frame-parallel video)."""
from consist_jax.parallel.frames import FRAMES_AXIS, frames_mesh, gather_frames, shard_frames, split_frames

__all__ = ["FRAMES_AXIS", "frames_mesh", "gather_frames", "shard_frames", "split_frames"]
