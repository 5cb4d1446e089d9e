"""Training metrics: TensorBoard event files and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import os
from typing import Optional

import jax

from consist_jax import files

# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v5": 459.0,  # v5p's device kind; last, as it is a prefix of "TPU v5 lite"
}


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled program (one device's share) as a dict, {} when
    the backend gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returned one dict per device
        analysis = analysis[0]
    return analysis or {}


def peak_flops_per_device(override_tflops: Optional[float] = None) -> Optional[float]:
    """FLOP/s of one device: the config's value, else the table's entry for this device kind."""
    if override_tflops:
        return float(override_tflops) * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


class MetricWriter:
    """Scalars to ``{workdir}/tensorboard`` (process 0 only).

    A write the disk does not take (a full disk) raises one WriteError naming the folder;
    tensorboardX's own later attempts (its writer thread, its flush at exit) are stopped,
    so they do not repeat it as tracebacks."""

    def __init__(self, workdir: str, enabled: bool = True):
        self._writer = None
        self.folder = os.path.join(workdir, "tensorboard")
        if enabled:
            from tensorboardX import SummaryWriter

            try:
                self._writer = SummaryWriter(self.folder)
            except OSError as e:
                raise files.WriteError(f"cannot write TensorBoard events to {self.folder!r}: {e.strerror or e}") from e

    def write(self, step: int, scalars: dict) -> None:
        if self._writer is None:
            return
        try:
            for name, value in scalars.items():
                self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.flush()
        except OSError as e:
            self._fail(e)

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except OSError as e:
            self._fail(e)
        self._writer = None

    def _fail(self, error: OSError) -> None:
        writer, self._writer = self._writer, None
        _stop_event_writers(writer)
        raise files.WriteError(f"cannot write TensorBoard events to {self.folder!r}: "
                               f"{error.strerror or error}") from error


def _stop_event_writers(writer) -> None:
    """Ends a failed SummaryWriter's file writers without another write: each worker thread
    is told to stop, and each writer is marked closed (its exit hook would flush again)."""
    import threading

    previous = threading.excepthook

    def drop_write_errors(args):  # a worker that was mid-flush fails the same way: already raised
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboardX")):
            previous(args)

    threading.excepthook = drop_write_errors
    for file_writer in (writer.all_writers or {}).values():
        events = file_writer.event_writer
        if events._worker is not None:
            events._worker.stop()
        events._closed = True
