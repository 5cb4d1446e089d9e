"""Parallelism helpers that are not a training concern (frame-parallel video, the DiT's
sequence axis)."""
from consist_jax.parallel.frames import FRAMES_AXIS, frames_mesh, gather_frames, shard_frames, split_frames
from consist_jax.parallel.sequence import SEQUENCE_AXIS, gather_tokens, split_tokens

__all__ = ["FRAMES_AXIS", "SEQUENCE_AXIS", "frames_mesh", "gather_frames", "gather_tokens", "shard_frames",
           "split_frames", "split_tokens"]
