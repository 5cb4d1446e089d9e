"""Sequence parallelism for the DiT: the tokens of a long clip split over a mesh axis.

A Wan block treats every token on its own except in self-attention, so the hidden
states (B, N, D) of one clip can live split along N: each device holds N / S tokens of
every clip it holds (S: the axis size) and runs the norms, projections, cross-attention
and feed-forward on its slice with no communication. Self-attention is where tokens
meet: each device keeps its queries and reads every key and value, which
``gather_tokens`` all-gathers along N (the reference's too, so its cache is whole).

Set with ``model.wan.sequence_axis`` (``WanTransformerConfig.sequence_axis``): a mesh
axis name, e.g. "sequence" with mesh axes ("data", "fsdp", "sequence"); the batch stays
split over the data axes, the tokens over this one. The constraints name only the token
dimension (and keep the width whole), so under XLA's SPMD partitioner they are all it
takes. The compiled splash kernel runs under ``shard_map`` over batch and heads
(``attention_kernels.per_device``): the partitioner moves the sequence split into a
batch or head split around each kernel call (an all-to-all, as DeepSpeed-Ulysses
does), so each device attends whole sequences of its share of clips or heads.
"""
from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from consist_jax.parallel.frames import Axes, _check_mesh, gather_frames

SEQUENCE_AXIS = "sequence"
KEY = "sequence_axis"


def split_tokens(x: jax.Array, axis: Optional[Axes]) -> jax.Array:
    """Hidden states x (B, N, D) with N split over mesh ``axis`` (no-op when None); the
    batch as the compiler has it, the width whole."""
    if axis is None:
        return x
    _check_mesh(axis, KEY)
    return jax.lax.with_sharding_constraint(x, P(P.UNCONSTRAINED, axis, None))


def gather_tokens(x: jax.Array, axis: Optional[Axes]) -> jax.Array:
    """Keys or values x (B, N, H, D): every device holds all N tokens (no-op when None)."""
    if axis is None:
        return x
    _check_mesh(axis, KEY)
    return gather_frames(x, axis, frame_dim=1)
