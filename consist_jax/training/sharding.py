"""Device mesh and sharding rules (data parallel + FSDP), decided from config.

Mesh axes are named; the batch is split over every data-like axis (``data`` and
``fsdp``: FSDP is data parallelism whose parameters are also split). A parameter
is either replicated or split over ``fsdp`` along its largest dimension that the
axis size divides; small parameters stay replicated (their all-gathers cost more
than they save).

Pods (config ``mesh``):
  * ``dcn_shape``: per-axis sizes across slices (over the data-centre network), the
    ``shape`` being within one slice (over ICI), as MaxDiffusion's ``dcn_*`` /
    ``ici_*`` parallelism: e.g. axes ("data", "fsdp"), shape (1, -1), dcn_shape (2, 1)
    is data parallel across 2 slices and FSDP within each.
  * ``param_rules``: an ordered list of (parameter-path regex, spec), as big_vision
    does; the first rule whose regex matches (``re.search``) a leaf's path
    ("params/down_blocks.0/resnets.1/conv1/kernel", "opt_state/.../mu/...") decides.
    A spec is "fsdp" (the largest dimension ``fsdp`` divides), "replicated", or one
    entry per dimension (an axis name, a tuple of names, or None). A leaf no rule
    matches, or whose spec does not divide it, is replicated and logged.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")

# mesh.param_rules for the Wan DiT (model.backbone "wan", configs/wan_*_scd.py): every
# projection kernel of the blocks (q, k, v, out of both attentions; the feed-forward) and
# of the embedders split over fsdp along its largest divisible dimension; biases, norms and
# the modulation tables (width-sized vectors) replicated. Paths as in params and opt_state.
WAN_PARAM_RULES = (
    (r"blocks\.\d+/(attn[12]/to_(q|k|v|out\.0)|ffn/net\.[02](\.proj)?)/kernel$", "fsdp"),
    (r"(condition_embedder/.*|patch_embedding|pose_patch_embedding/conv_\w+|proj_out)/kernel$", "fsdp"),
    (r".*", "replicated"),
)


def _resolve_shape(shape: Sequence[int], count: int, what: str) -> list[int]:
    """Fills the one -1 of ``shape`` so that it holds ``count`` devices."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"{what} {tuple(shape)}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if count % known:
            raise ValueError(f"{what} {tuple(shape)} does not divide {count} devices")
        shape[shape.index(-1)] = count // known
    if math.prod(shape) != count:
        raise ValueError(f"{what} {tuple(shape)} needs {math.prod(shape)} devices, but {count} are present")
    return shape


def split_cpu_host(cpu_devices: int) -> None:
    """Makes a CPU-only host ``cpu_devices`` XLA devices (0: leave it one); call it before
    anything asks JAX for devices (JAX raises otherwise).

    XLA:CPU runs a program's ops one after another, each spread over the host's threads;
    a small model's ops are too small to keep every core busy. As several devices the
    batch is split over them (data parallel, gradients summed in memory) and their
    programs run side by side: the demo's step on 2 cores, 0.31 -> 0.25 s. Hosts with an
    accelerator are unaffected (the mesh is built from the default backend's devices).
    """
    if cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices: Optional[Sequence[Any]] = None,
              dcn_shape: Optional[Sequence[int]] = None) -> Mesh:
    """A mesh of ``devices`` (default: all) with named ``axes``; one size may be -1 (the rest).

    With ``dcn_shape`` (per-axis slice counts, product = the number of slices) ``shape``
    is one slice's and the mesh is their product, each slice an ICI block.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"mesh axes {axes} and shape {tuple(shape)} differ in length")
    if dcn_shape is None or math.prod(dcn_shape) == 1:
        return Mesh(np.asarray(devices).reshape(_resolve_shape(shape, len(devices), "mesh shape")), axes)
    dcn = [int(s) for s in dcn_shape]
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if len(dcn) != len(axes) or math.prod(dcn) != slices:
        raise ValueError(
            f"mesh.dcn_shape {tuple(dcn)} must give each of the axes {axes} a slice count, "
            f"multiplying to the {slices} slice(s) present"
        )
    ici = _resolve_shape(shape, len(devices) // slices, "mesh shape (one slice)")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, axes)


def mesh_from_config(mesh_config: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The run config's ``mesh`` section -> Mesh."""
    return make_mesh(mesh_config.axes, mesh_config.shape, devices, mesh_config.get("dcn_shape"))


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axes, everything else whole."""
    return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_flat_gradients(mesh: Mesh, param_shardings: Any) -> None:
    """Raises ValueError (one line, naming the axis or leaf) unless ``mesh.flat_gradients``
    can run: data parallelism only, every parameter whole on every device."""
    for axis in mesh.axis_names:
        if axis not in data_axes(mesh) and mesh.shape[axis] > 1:
            raise ValueError(f"mesh.flat_gradients runs data parallelism only, but mesh axis {axis!r} "
                             f"has {mesh.shape[axis]} devices (set mesh.flat_gradients=False)")
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        if not leaf.is_fully_replicated:
            raise ValueError(f"mesh.flat_gradients needs replicated parameters, but {leaf_path(path)} is "
                             f"split as {leaf.spec} (mesh.param_sharding / mesh.param_rules)")


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Split the largest dimension that ``fsdp_size`` divides; replicate small or indivisible leaves."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            return P(*([None] * i + ["fsdp"]))
    return P()


def param_shardings(tree: Any, mesh: Mesh, rule: str = "fsdp", min_size: int = 2**14,
                    rules: Optional[Sequence[tuple[str, Any]]] = None) -> Any:
    """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs) by ``rule``, or by
    the ordered ``rules`` [(path regex, spec), ...] when given (module doc)."""
    if rule not in ("fsdp", "replicated"):
        raise ValueError(f"mesh.param_sharding={rule!r}: expected 'fsdp' or 'replicated'")
    if rules:
        compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(mesh, _ruled_spec(leaf_path(path), leaf, compiled, mesh, min_size)),
            tree,
        )
    fsdp_size = mesh.shape.get("fsdp", 1) if rule == "fsdp" else 1

    def spec(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

    return jax.tree_util.tree_map(spec, tree)


def shardings_from_config(tree: Any, mesh: Mesh, mesh_config: Any) -> Any:
    """``param_shardings`` as the run config's ``mesh`` section says."""
    return param_shardings(tree, mesh, mesh_config.param_sharding, mesh_config.fsdp_min_size,
                           mesh_config.get("param_rules"))


def leaf_path(path) -> str:
    """A pytree key path as 'params/down_blocks.0/resnets.1/conv1/kernel'."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return "/".join(name(k) for k in path)


def _ruled_spec(path: str, leaf: Any, rules, mesh: Mesh, min_size: int) -> P:
    """The first matching rule's spec for one leaf; replication (logged) where it cannot apply."""
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, spec in rules:
        if pattern.search(path):
            break
    else:
        return _replicated_because(path, shape, "no mesh.param_rules entry matches")
    if spec == "replicated":
        return P()
    if spec == "fsdp":
        fsdp_size = mesh.shape.get("fsdp", 1)
        out = fsdp_spec(shape, fsdp_size, min_size)
        if out == P() and fsdp_size > 1 and math.prod(shape) >= min_size:
            return _replicated_because(path, shape, f"no dimension divides by fsdp={fsdp_size}")
        return out
    entries = tuple(spec)
    if len(entries) != len(shape):
        return _replicated_because(path, shape, f"rule {pattern.pattern!r} spec {entries} has another rank")
    for size, axes in zip(shape, entries):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise ValueError(f"mesh.param_rules {pattern.pattern!r}: axes {unknown} are not mesh axes {mesh.axis_names}")
        if size % math.prod(mesh.shape[a] for a in names):
            return _replicated_because(path, shape, f"rule {pattern.pattern!r} spec {entries} does not divide it")
    return P(*(tuple(a) if isinstance(a, list) else a for a in entries))


def _replicated_because(path: str, shape: tuple, reason: str) -> P:
    logging.warning("sharding: %s %s is replicated: %s", path, shape, reason)
    return P()


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
