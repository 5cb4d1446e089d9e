"""Orbax checkpoints of a training run: the train state, every process's data-iterator
state and the run's metadata, saved together so a killed run resumes exactly.

Layout: ``{workdir}/checkpoints/{step}/{state,meta,file_sizes.json}``. Saves are
asynchronous (the step loop goes on while arrays are written); a checkpoint becomes
visible only when complete, so a run killed mid-save resumes from the previous one.

Reading a step (verifying it, restoring the params for sampling) is
consist_jax/checkpoints.py, which sampling imports without this writer.

Once a save has finished, process 0 records the size of every file it wrote
(``file_sizes.json``): a step is verified against it before use, so a file cut short
(a write interrupted on a network disk) is named instead of failing deep in orbax.
A damaged latest step is passed over for the newest intact one, never deleted: a
resumed run moves it to ``{workdir}/checkpoints_damaged/``.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from consist_jax import files
from consist_jax.checkpoints import (FILE_SIZES, ITEMS, finished_steps, innermost_cause, newest_intact_step,
                                     read_failure, restore_params, verify_step)


PARTIAL_STEP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step here, then renames it


class CheckpointMismatchError(ValueError):
    """A checkpoint's train state does not fit this run's model (a workdir from another config)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. a full disk); the last good checkpoint is kept."""


def gather_process_states(state: bytes) -> list[str]:
    """Every process's data-iterator state (bytes), gathered to all processes as strings."""
    if jax.process_count() == 1:
        return [state.decode()]
    data = np.frombuffer(state, np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: data.size] = data
    everyone = multihost_utils.process_allgather(padded)
    return [bytes(row[: int(n)]).decode() for row, n in zip(everyone, lengths.reshape(-1))]


def record_file_sizes(step_dir: str) -> None:
    """Writes ``step_dir/file_sizes.json``: every file of the finished step's items and its
    size (orbax's own bookkeeping files next to them may be rewritten later)."""
    sizes = {}
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                path = os.path.join(root, name)
                sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
    # Written atomically and checked: a reader never sees half a list.
    files.write_json(os.path.join(step_dir, FILE_SIZES), dict(sorted(sizes.items())), indent=0)


def _path_name(path) -> str:
    """A tree path as "params/conv_in/kernel", the same for a TrainState and its saved dict."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def check_tree_matches(saved: Any, abstract_state: Any, where: str) -> None:
    """Raises CheckpointMismatchError naming the first leaf path (in the run's order) that the
    checkpoint lacks or holds in another shape, else the first leaf only the checkpoint has."""
    saved_shapes = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    ours = [(_path_name(p), tuple(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)]
    for name, shape in ours:
        if name not in saved_shapes:
            problem = f"{name} {shape} is not in the checkpoint"
        elif saved_shapes[name] != shape:
            problem = f"{name} is {saved_shapes[name]} in the checkpoint, {shape} in this run"
        else:
            continue
        raise CheckpointMismatchError(f"{where} does not fit this run's config: {problem} (a workdir from another config?)")
    extra = [name for name in saved_shapes if name not in dict(ours)]
    if extra:
        raise CheckpointMismatchError(
            f"{where} does not fit this run's config: {extra[0]} is in the checkpoint only "
            f"({len(extra)} such leaves; a workdir from another config?)")


# ------------------------------------------------------------------ the run's checkpointer


class _SaveErrorEchoes(logging.Filter):
    """Drops the tracebacks that orbax's writer threads and asyncio log for every array of a
    failed save (over a thousand for one full disk): they name the step's temporary folder,
    or come after the failure was raised, and the Checkpointer raises the failure once, as
    one CheckpointSaveError."""

    def __init__(self):
        super().__init__()
        self.failed = False  # once a failed save was raised, orbax's errors are its echoes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        if self.failed and (from_orbax or record.name == "asyncio"):
            return False
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if PARTIAL_STEP_SUFFIX in text:
            return False
        if from_orbax:
            # orbax keeps the exception and raises it again from wait_until_finished, where
            # it becomes the one CheckpointSaveError: its line stays, its traceback would
            # be a second copy of that error (one per writer thread).
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_SAVE_ERROR_ECHOES = _SaveErrorEchoes()


def _drop_closed_loop_echoes() -> None:
    """When a save fails, tensorstore's writes still in flight call back into orbax's closed
    event loops, each reported as an unraisable 'Event loop is closed' (possibly before the
    failure is noticed), and at exit every unfinished orbax write coroutine is reported too;
    they echo the failure the Checkpointer raises, so sys.unraisablehook drops them."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_echoes", False):
        return

    def hook(report):
        code = getattr(report.object, "cr_code", None)
        closed_loop = report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"
        orbax_write = _SAVE_ERROR_ECHOES.failed and code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or orbax_write):
            previous(report)

    hook.drops_closed_loop_echoes = True
    sys.unraisablehook = hook


class _Manager(ocp.CheckpointManager):
    """orbax's manager, except that only the training loop asks JAX's preemption sync point."""

    def reached_preemption(self, step: int) -> bool:
        # orbax asks too, from its finalize thread with the step of the save being finished:
        # that call overwrites the step the sync protocol reads, so a process could be told
        # a sync point it has already passed, and the others would wait for it forever.
        return False


def _join_orbax_writers(timeout_seconds: float = 120.0) -> None:
    """Waits for orbax's writer threads still running. When one array's write fails,
    orbax raises at once while the writers of other arrays go on (seen with the state
    split over 2 devices): a partial step removed under them would be written again."""
    deadline = time.monotonic() + timeout_seconds
    writers = [t for t in threading.enumerate()
               if t is not threading.current_thread() and type(t).__module__.startswith("orbax.")]
    for thread in writers:
        try:
            thread.join(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - orbax's join raises its writer's error again: already reported
            pass
    if any(t.is_alive() for t in writers):
        print(f"orbax writer threads still running after {timeout_seconds:.0f} s; removing the partial "
              "step anyway", file=sys.stderr, flush=True)


def _remove_until_gone(path: str, settle_seconds: float = 1.0, timeout_seconds: float = 60.0) -> None:
    """Removes ``path`` and checks that it stays gone for ``settle_seconds``: tensorstore's
    own threads may still be finishing writes that orbax's threads issued (a file written
    into the folder while it is removed, or just after)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_seconds)
        if not os.path.exists(path):
            return
    print(f"could not remove the partial checkpoint {path}: still being written after "
          f"{timeout_seconds:.0f} s", file=sys.stderr, flush=True)


class Checkpointer:
    """Save every ``every_steps`` steps, keep the last ``keep``; restore the newest intact one.

    A failed save (a full disk, a lost network mount) raises CheckpointSaveError naming the
    step and its folder: at once for a synchronous save, else at the next check_for_errors(),
    save(), wait() or close()."""

    def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep),
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = _Manager(self.directory, options=options, item_names=ITEMS)
        self._pending: Optional[int] = None  # the step being written in the background
        self._failed = False
        for name in ("absl", "asyncio"):  # orbax logs through absl; asyncio reports lost tasks
            logging.getLogger(name).addFilter(_SAVE_ERROR_ECHOES)
        _drop_closed_loop_echoes()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def resume_step(self) -> Optional[int]:
        """The newest intact step (None without checkpoints). Damaged newer steps are moved
        aside, kept, so that the resumed run can write those steps anew."""
        step = newest_intact_step(self.directory)
        for damaged in [s for s in finished_steps(self.directory) if step is not None and s > step]:
            print(f"moved damaged checkpoint step {damaged} to {self.set_aside(damaged)}", flush=True)
        return step

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: bytes, meta: dict) -> None:
        """Saves (asynchronously) the state at ``step`` with every process's iterator state."""
        self.wait()  # the previous save's errors and its file sizes come first
        meta = dict(meta, step=int(step), data_states=gather_process_states(data_state))
        self._pending = int(step)
        with self._save_errors():
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if the background save has failed; does not block (a
        finished save is waited for at once, which also records its file sizes)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending save is written, then records its file sizes."""
        with self._save_errors():
            self.manager.wait_until_finished()
        if self._pending is not None and jax.process_index() == 0:
            step_dir = os.path.join(self.directory, str(self._pending))
            if os.path.isdir(step_dir):  # max_to_keep may have removed it already
                record_file_sizes(step_dir)
        self._pending = None

    def close(self) -> None:
        """Finishes the pending save; after a failed save, releases orbax's threads and
        removes the partial step they leave."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure was already raised once, with its step
                if not self._failed:
                    raise
            if self._failed:
                self._remove_partial_steps()

    def _remove_partial_steps(self) -> None:
        """Deletes orbax's temporary step folders ``{step}.orbax-checkpoint-tmp*`` (no writer
        is left to finish them): a failed save leaves no partial checkpoint to fill the disk."""
        _join_orbax_writers()  # every process: its own writers would write into the folder again
        if jax.process_index() != 0:
            return
        for path in glob.glob(os.path.join(glob.escape(self.directory), f"*{PARTIAL_STEP_SUFFIX}*")):
            _remove_until_gone(path)

    @contextlib.contextmanager
    def _save_errors(self):
        """Any error of a save -> one CheckpointSaveError naming the pending step and its folder."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError from tensorstore arrives wrapped
            self._failed = _SAVE_ERROR_ECHOES.failed = True
            step = self._pending
            last_good = [s for s in finished_steps(self.directory) if s != step]
            kept = f"step {last_good[-1]}" if last_good else "none yet"
            raise CheckpointSaveError(
                f"saving checkpoint step {step} to {os.path.join(self.directory, str(step))} failed: "
                f"{innermost_cause(e)}; stopping. The last good checkpoint ({kept}) is kept."
            ) from None

    def set_aside(self, step: int) -> str:
        """Moves a damaged ``step`` out of orbax's sight (so the run can write it anew) into
        ``{workdir}/checkpoints_damaged/``; returns where. Process 0 moves, all wait."""
        target = os.path.join(self.workdir, "checkpoints_damaged", str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(self.workdir, "checkpoints_damaged", f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"damaged checkpoint {step} set aside")
        self.manager.reload()
        return target

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes, dict]:
        """(state laid out as ``abstract_state`` says, this process's iterator state, meta).

        The step is verified first; a damaged step raises CheckpointDamagedError and one
        from another config CheckpointMismatchError, each naming the file or leaf."""
        verify_step(self.directory, step)
        where = f"checkpoint step {step} in {self.directory}"
        state_dir = os.path.join(self.directory, str(step), "state")
        try:
            saved = ocp.StandardCheckpointer().metadata(state_dir)
        except Exception as e:  # noqa: BLE001 - any read failure is a damaged step
            raise read_failure(where, e) from None
        check_tree_matches(getattr(saved, "item_metadata", saved), abstract_state, where)
        try:
            restored = self.manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise read_failure(where, e) from None
        meta = restored.meta
        states = meta["data_states"]
        if len(states) != jax.process_count():
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written by {len(states)} process(es); "
                f"resuming with {jax.process_count()} would not continue the same data streams"
            )
        return restored.state, states[jax.process_index()].encode(), meta


def init_from_checkpoint(params: Any, workdir: str) -> Any:
    """``params`` with every leaf that ``workdir``'s latest checkpoint holds replaced by it.

    The video stage starts so from the image stage: the checkpoint's UNet and pose
    encoder (EMA when kept) come in; only the motion modules, which it lacks, stay as built.
    A checkpoint leaf we do not have, one of another shape, or another leaf it lacks (e.g.
    cross-attention the image stage was trained without) is an error naming it.
    """
    from consist_jax.convert.motion import is_motion_path

    loaded, _, step = restore_params(workdir)
    ours, theirs = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
    name = "/".join
    unexpected = [name(p) for p in theirs if p not in ours]
    misshapen = [f"{name(p)} {tuple(v.shape)} vs ours {tuple(ours[p].shape)}"
                 for p, v in theirs.items() if p in ours and tuple(v.shape) != tuple(ours[p].shape)]
    missing = [name(p) for p in ours if p not in theirs and not is_motion_path(p)]
    if unexpected or misshapen or missing:
        raise ValueError(
            f"model.init_from={workdir!r} (step {step}) does not fit this model: "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(misshapen)} misshapen, e.g. {misshapen[:3]}; "
            f"{len(missing)} missing outside the motion modules, e.g. {missing[:3]}"
        )
    kept = len(ours) - len(theirs)
    print(f"initialised {len(theirs)} params from {workdir} step {step}; {kept} keep their fresh values",
          flush=True)
    # Host copies: the restored leaves sit on one device, and the caller lays the params
    # over its mesh (with 2+ devices jit refuses arguments committed to one of them).
    merged = {p: np.asarray(theirs[p]).astype(v.dtype) if p in theirs else v for p, v in ours.items()}
    return traverse_util.unflatten_dict(merged)
