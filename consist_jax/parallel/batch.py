"""The batch axis under a mesh: which devices a leading axis is split over.

The trainer lays a batch over its mesh's axes in order ("data", then "fsdp"). Two
things go wrong when SPMD is left to itself at large device counts (found compiling
the video stage for a v5p-128, BENCHMARKS.md "TPU"):
  * a loop that walks the flattened batch in chunks (the VAE encode of the frames)
    gathers every example onto every device to slice a global chunk, unless each step
    takes a chunk from every device's own part (``leading_split``);
  * a projection whose small weight is FSDP-split can be computed with the weight kept
    split and a whole batch of activations (or their gradients) gathered instead;
    ``constrain_leading`` pins the activations to the batch split (the constraint's
    transpose pins their gradients too), so the weight is what gets gathered.
Without a mesh (sampling on one device) both are no-ops.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec as P


def leading_axes(n: int, mesh: Any = None) -> tuple[str, ...]:
    """Mesh axes a leading axis of ``n`` items is split over: each axis of size > 1 in
    mesh order while it divides what is left. mesh: default the one set with
    ``jax.set_mesh`` (() without one, or inside ``shard_map``)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh._any_axis_manual:
            return ()
    axes, devices = [], 1
    for axis, size in mesh.shape.items():
        if size > 1 and n % (devices * size) == 0:
            axes.append(axis)
            devices *= size
    return tuple(axes)


def leading_split(n: int) -> int:
    """How many devices a leading axis of ``n`` items is split over (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1
    for axis in leading_axes(n):
        devices *= mesh.shape[axis]
    return devices


def constrain_leading(x: jax.Array) -> jax.Array:
    """``x`` with its leading axis split over ``leading_axes``, the other axes left to XLA
    (meshes of Auto axes, as the trainer builds; under Explicit axes the types decide)."""
    axes = leading_axes(x.shape[0])
    if not axes or any(t != AxisType.Auto for t in jax.sharding.get_abstract_mesh().axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *[P.UNCONSTRAINED] * (x.ndim - 1)))
