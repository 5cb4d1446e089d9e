"""Device mesh and sharding rules (data parallel + FSDP), decided from config.

Mesh axes are named; the batch is split over every data-like axis (``data`` and
``fsdp``: FSDP is data parallelism whose parameters are also split). A parameter
is either replicated or split over ``fsdp`` along its largest dimension that the
axis size divides; small parameters stay replicated (their all-gathers cost more
than they save).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh of ``devices`` (default: all) with named ``axes``; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    axes, shape = tuple(axes), [int(s) for s in shape]
    if len(axes) != len(shape):
        raise ValueError(f"mesh axes {axes} and shape {tuple(shape)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but {len(devices)} are present"
        )
    return Mesh(np.asarray(devices).reshape(shape), axes)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axes, everything else whole."""
    return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Split the largest dimension that ``fsdp_size`` divides; replicate small or indivisible leaves."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            return P(*([None] * i + ["fsdp"]))
    return P()


def param_shardings(tree: Any, mesh: Mesh, rule: str = "fsdp", min_size: int = 2**14) -> Any:
    """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs) by ``rule``."""
    if rule not in ("fsdp", "replicated"):
        raise ValueError(f"mesh.param_sharding={rule!r}: expected 'fsdp' or 'replicated'")
    fsdp_size = mesh.shape.get("fsdp", 1) if rule == "fsdp" else 1

    def spec(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

    return jax.tree_util.tree_map(spec, tree)


def check_batch_divides(global_batch: int, mesh: Mesh, process_count: int) -> None:
    """Errors before any compile when the batch cannot be split over devices and hosts."""
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} data-parallel "
            f"devices of mesh {dict(mesh.shape)}"
        )
    if global_batch % process_count:
        raise ValueError(f"global batch size {global_batch} is not divisible by {process_count} processes")
