"""Frame parallelism: the F frames of a clip sharded over one mesh axis.

Every layer of the UNet but the temporal (motion) attention treats each frame on its
own, so a long clip splits across devices frame-wise with no communication there.
The motion module is where frames meet: its GroupNorm reduces over all frames (XLA
inserts the all-reduce) and its attention reads every frame's keys and values, which
``gather_frames`` all-gathers while the queries stay sharded.

Usage (the motion module takes the axis name, the mesh comes from the context)::

    mesh = frames_mesh()                                      # 1-D mesh over all devices
    config = UNetConfig(..., motion=MotionConfig(frames_axis=FRAMES_AXIS))
    with jax.set_mesh(mesh):
        out = jax.jit(unet.apply)(variables, shard_frames(sample, mesh), t, context)

The constraints name only the frames and leave the other dimensions unconstrained. With
data parallelism as well, name both axes, clips first: ``frames_axis=("data", "frames")``
splits the images of the batch over data x frames, so each data shard holds whole clips
and each frames shard runs of their frames.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FRAMES_AXIS = "frames"
Axes = Union[str, tuple[str, ...]]


def frames_mesh(devices: Optional[Sequence[jax.Device]] = None, axis: str = FRAMES_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with one axis named ``axis``.

    Auto axis types: GSPMD propagates the frame sharding through the per-frame layers.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (axis,), axis_types=(AxisType.Auto,))


def shard_frames(x: jax.Array, mesh: Mesh, axis: str = FRAMES_AXIS, frame_dim: int = 1) -> jax.Array:
    """Places x (e.g. latents (B, F, h, w, C)) on ``mesh`` with ``frame_dim`` split over ``axis``.

    For one clip (B = 1) this is the layout ``split_frames`` keeps; with several clips
    the compiled UNet reshuffles it once on entry.
    """
    spec = [None] * x.ndim
    spec[frame_dim] = axis
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def _check_mesh(axis: Axes, key: str = "frames_axis") -> None:
    """Errors naming ``key`` unless every mesh axis of ``axis`` is in the context's mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    names = (axis,) if isinstance(axis, str) else axis
    if mesh.empty or any(name not in mesh.axis_names for name in names):
        raise ValueError(
            f"{key}={axis!r} needs a mesh with that axis in context, e.g. "
            f"`with jax.set_mesh(consist_jax.parallel.frames_mesh(axis={names[0]!r})):` (current mesh axes: "
            f"{() if mesh.empty else mesh.axis_names})"
        )


def split_frames(clips: jax.Array, axis: Optional[Axes]) -> jax.Array:
    """Splits the frames of clips (B, F, ...) over mesh ``axis`` (no-op when axis is None).

    The B*F frames, clip after clip, are cut into equal runs of consecutive frames, one
    per device: with B = 1 that is F split over the axis. Cutting this flat order (rather
    than F alone) matches the UNet's per-image layers, (B*F, h, w, C), so they stay split
    too. ``axis`` may be a tuple of mesh axes, split in order (major first).
    """
    if axis is None:
        return clips
    _check_mesh(axis)
    b, f = clips.shape[:2]
    flat = clips.reshape(b * f, *clips.shape[2:])
    spec = P(axis, *([P.UNCONSTRAINED] * (flat.ndim - 1)))
    return jax.lax.with_sharding_constraint(flat, spec).reshape(clips.shape)


def gather_frames(x: jax.Array, axis: Optional[Axes], frame_dim: int) -> jax.Array:
    """Every device holds all frames of x along ``frame_dim`` (an all-gather over ``axis``).

    Other dimensions stay as the compiler has them (e.g. split over clips or positions).
    """
    if axis is None:
        return x
    _check_mesh(axis)
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[frame_dim] = None
    return jax.lax.with_sharding_constraint(x, P(*spec))
