"""Training metrics: TensorBoard event files and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import os
from typing import Optional

import jax

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
    """Scalars to ``{workdir}/tensorboard`` (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
