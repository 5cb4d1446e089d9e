"""The training loop: config -> a sharded, checkpointed, resumable SCD training run.

    train(config, workdir)

Everything that can be wrong with a config (unknown keys are caught by
ml_collections; missing pretrained paths, a mesh that does not divide the devices,
a batch that does not divide the mesh) raises before any compile.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from consist_jax.data import pipeline as data_pipeline
from consist_jax.diffusion.kinds import training_schedule
from consist_jax.factory import build_model, check_paths
from consist_jax.training import sharding, validate
from consist_jax.training.checkpoint import Checkpointer, init_from_checkpoint
from consist_jax.training.metrics import MetricWriter, cost_analysis, peak_flops_per_device
from consist_jax.training.state import OptimizerConfig, create_train_state, make_optimizer
from consist_jax.training.step import LossConfig, make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def ensure_dataset(data_config: Any) -> None:
    """Generates the synthetic dataset on first use (process 0 writes, the others wait)."""
    synthetic = data_config.get("synthetic")
    info = os.path.join(data_config.pipeline.data_dir, "dataset_info.json")
    if synthetic is None or not synthetic.get("generate", False) or os.path.exists(info):
        if not os.path.exists(info):
            raise FileNotFoundError(f"data.pipeline.data_dir={data_config.pipeline.data_dir!r} has no dataset_info.json")
        return
    if jax.process_index() == 0:
        from consist_jax.data.synthetic import SyntheticConfig, generate

        fields = {k: v for k, v in synthetic.items() if k != "generate"}
        generate(data_config.pipeline.data_dir, SyntheticConfig(**fields))
    multihost_utils.sync_global_devices("synthetic dataset written")


def preflight(config: Any) -> sharding.Mesh:
    """Checks paths, mesh and batch divisibility; returns the mesh. No compile happens here."""
    validate.check_run_config(config)
    check_paths(config.model)
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch_divides(config.train.global_batch_size, mesh, jax.process_count())
    accum = int(config.optim.grad_accum_steps)
    if accum < 1 or config.train.global_batch_size % accum:
        raise ValueError(
            f"optim.grad_accum_steps={accum} must divide the global batch size {config.train.global_batch_size}"
        )
    return mesh


class _Preemption:
    """SIGTERM (cloud preemption): every process saves the same step, then the loop exits.

    One process: a SIGTERM handler sets a flag. Several: hosts see the signal at different
    steps (or only one sees it) while a save is a collective that all must join, so each
    asks JAX's preemption sync manager (started by jax.distributed.initialize, with its own
    SIGTERM notifier) whether ``step`` is the step all processes agreed on through the
    coordination service; no per-step collective, and no Python handler to mask the notifier.
    """

    def __init__(self):
        self._distributed = jax.process_count() > 1
        self._requested = False
        if not self._distributed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._requested = True

    def reached(self, step: int) -> bool:
        """Whether to save at ``step`` and exit; call once per step, steps increasing."""
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def restore(self):
        if not self._distributed:
            signal.signal(signal.SIGTERM, self._previous)


class _Profile:
    """``log.profile_steps``: a ``jax.profiler`` trace of those steps (0-based, the first
    to the last listed) in ``{workdir}/tensorboard`` (TensorBoard's profile tab)."""

    def __init__(self, steps, workdir: str):
        steps = sorted(int(s) for s in (steps or ()))
        self.first, self.last = (steps[0], steps[-1]) if steps else (None, None)
        self.directory = os.path.join(workdir, "tensorboard")
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the trace holds the steps' device work
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _global_batch(batch: dict, batch_sharding, keys: tuple[str, ...]) -> dict:
    """This process's part of the batch (its ``keys``) -> global jax.Arrays laid out over the mesh.

    ``example_id`` is each example's position in the global batch as the data
    pipeline deals it (process p holds positions p, p + P, p + 2P, ...), so the
    training noise of an example does not depend on the number of processes.
    """
    arrays = {k: v for k, v in batch.items() if k in keys}
    local = len(batch["reference"])
    arrays["example_id"] = (jax.process_index() + jax.process_count() * np.arange(local)).astype(np.int32)
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in arrays.items()
    }


TRAIN_KEYS = ("reference", "reference_pose", "target", "target_pose", "region_mask", "context")


def train_keys(loss: LossConfig) -> tuple[str, ...]:
    """The batch keys the train step reads: TRAIN_KEYS, and the person's mask when the loss
    weights it (else it is not shipped to the devices)."""
    return TRAIN_KEYS + (("target_mask",) if loss.reads_figure_mask else ())


def check_figure_masks(batch: dict, keys: tuple[str, ...], config: Any) -> bool:
    """Whether a figure-weighted loss has person masks to weight: on records without them the
    data pipeline's ``target_mask`` is all ones and the weight changes nothing (your own
    videos, data/build_own.py), which the run says on its first batch rather than silently."""
    if "target_mask" not in keys or not np.all(batch["target_mask"] == 1):
        return True
    if jax.process_index() == 0:
        print(f"note: train.figure_loss_weight={config.train.figure_loss_weight} weights nothing here: the first "
              f"batch of {config.data.pipeline.data_dir!r} has no person masks (its records carry none), so the "
              "loss is a plain mean", flush=True)
    return False


class TrainProgram(NamedTuple):
    """The jitted train step as training runs it, and the shardings of its arguments."""

    step: Any  # jit(train_step)(state, batch, rng, frozen) -> (state, metrics); state donated
    optimizer: Any
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    state_sharding: Any
    frozen_sharding: Any
    batch_sharding: Any
    batch_keys: tuple[str, ...]  # of the data pipeline's batch, those the step reads


def build_train_program(config: Any, model: Any, params: Any, frozen: Any, mesh: sharding.Mesh) -> TrainProgram:
    """The exact train step of ``config`` on ``mesh`` (shardings, donation, remat, dtype,
    optimiser, accumulation). params / frozen: arrays or ShapeDtypeStructs (only their
    shapes are read), so ``train`` and the ahead-of-time compile report share it."""
    optim = OptimizerConfig.from_config(config.optim)
    optimizer = make_optimizer(optim, params)
    loss_cfg = LossConfig.from_config(dict(config.train, prediction_type=config.diffusion.prediction_type))
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, optimizer, optim.ema_decay > 0), params)
    state_sharding = sharding.shardings_from_config(abstract_state, mesh, config.mesh)
    flat_gradients_over = None
    if config.mesh.get("flat_gradients", False):
        sharding.check_flat_gradients(mesh, state_sharding.params)
        flat_gradients_over = (mesh, sharding.data_axes(mesh))
    step_fn = make_train_step(model, training_schedule(config), loss_cfg, optimizer, optim, flat_gradients_over)
    frozen_sharding = sharding.shardings_from_config(frozen, mesh, config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding, repl, frozen_sharding),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )
    return TrainProgram(jitted, optimizer, abstract_state, state_sharding, frozen_sharding, batch_sharding,
                        train_keys(loss_cfg))


def train(config: Any, workdir: str) -> dict:
    """Trains as ``config`` says, checkpointing under ``workdir``; resumes from its latest
    checkpoint when ``config.resume`` is set. Returns the last logged metrics."""
    mesh = preflight(config)
    if jax.process_index() == 0:
        print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} device(s), "
              f"global batch {config.train.global_batch_size}", flush=True)
    ensure_dataset(config.data)
    rng = jax.random.key(config.seed)
    model_rng, train_rng = jax.random.split(rng)
    model, params, frozen = build_model(config.model, model_rng)
    program = build_train_program(config, model, params, frozen, mesh)
    optimizer, abstract_state, state_sharding = program.optimizer, program.abstract_state, program.state_sharding
    batch_sharding = program.batch_sharding
    frozen = jax.device_put(frozen, program.frozen_sharding)

    checkpointer = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                config.checkpoint.async_save)
    data_cfg = dict(config.data.pipeline, batch_size=config.train.global_batch_size // jax.process_count())
    data = data_pipeline.make_pipeline(data_cfg, "train", seed=config.seed)
    start = checkpointer.resume_step() if config.resume else None
    if start is not None:
        target = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sharding
        )
        state, data_state, _ = checkpointer.restore(start, target)
        data.set_state(data_state)
        print(f"resumed from step {start} in {checkpointer.directory}", flush=True)
    else:
        start = 0
        if config.model.get("init_from", ""):
            params = init_from_checkpoint(params, config.model.init_from)
        ema = abstract_state.ema_params is not None  # as the program was built
        state = jax.jit(lambda p: create_train_state(p, optimizer, ema),
                        out_shardings=state_sharding)(params)
    del params

    first = next(data)
    check_figure_masks(first, program.batch_keys, config)
    batch = _global_batch(first, batch_sharding, program.batch_keys)
    with jax.set_mesh(mesh):  # the attention kernels read the targeted devices from it
        compiled = program.step.lower(state, batch, jax.random.fold_in(train_rng, start), frozen).compile()
    flops = _flops(compiled)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    preemption = _Preemption()
    profile = _Profile(config.log.get("profile_steps"), workdir)
    meta = {"config": config.to_json_best_effort()}
    last, logged_step, timer = {}, start, time.perf_counter()
    try:
        for step in range(start, config.train.num_steps):
            if step > start:
                batch = _global_batch(next(data), batch_sharding, program.batch_keys)
            profile.before(step)
            state, metrics = compiled(state, batch, jax.random.fold_in(train_rng, step), frozen)
            checkpointer.check_for_errors()  # a failed background save stops the run now
            profile.after(step, metrics)
            done = step + 1
            final = done == config.train.num_steps
            preempted = preemption.reached(done)  # read once: the signal may land at any moment
            save_now = checkpointer.should_save(done) or final or preempted
            if done % config.log.every_steps == 0 or final or save_now:
                # A host sync: also guarantees no non-finite state is ever saved.
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(host["loss"]):
                    raise NonFiniteLossError(
                        f"loss is {host['loss']} at step {done}; stopping. The last good checkpoint "
                        f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is kept."
                    )
                now = time.perf_counter()
                last = _rates(host, (now - timer) / (done - logged_step), config, flops)
                last["data/skipped"] = float(data.stats()["skipped"])
                logged_step, timer = done, now
                writer.write(done, last)
                print(_progress_line(done, config.train.num_steps, last), flush=True)
            if save_now:
                checkpointer.save(done, state, data.get_state(), dict(meta, data_stats=data.stats()))
            if preempted:
                checkpointer.wait()  # the process is about to be killed: finish writing now
                print(f"SIGTERM: saved a checkpoint at step {checkpointer.latest_step()}; exiting", flush=True)
                break
    finally:
        profile.stop()
        checkpointer.close()
        writer.close()
        preemption.restore()
    return last


def _flops(compiled) -> Optional[float]:
    """FLOPs of one compiled step (one device's share) from XLA's cost analysis."""
    analysis = cost_analysis(compiled)
    return float(analysis.get("flops", 0.0)) if analysis else None


def _rates(host: dict, step_seconds: float, config: Any, flops: Optional[float]) -> dict:
    out = dict(host)
    out["step_time_s"] = step_seconds
    out["samples_per_s"] = config.train.global_batch_size / max(step_seconds, 1e-9)
    peak = peak_flops_per_device(config.log.get("peak_tflops_per_device"))
    if flops and peak:
        # cost_analysis counts the whole (SPMD-partitioned) program of one device.
        out["mfu"] = flops / step_seconds / peak
    return out


def _progress_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"grad_norm {m['grad_norm']:.3f}",
             f"lr {m['lr']:.2e}", f"{m['step_time_s']:.2f} s/step", f"{m['samples_per_s']:.1f} samples/s"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if m.get("data/skipped"):
        parts.append(f"{int(m['data/skipped'])} bad examples skipped")
    return " | ".join(parts)
