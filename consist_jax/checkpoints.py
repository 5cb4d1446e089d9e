"""Reading a train.py workdir's checkpoints: verifying a step and restoring its params.

Training (the writer, training/checkpoint.py) and sampling both import this module;
it brings no trainer, data pipeline or signal handling along.

Layout: ``{workdir}/checkpoints/{step}/{state,meta,file_sizes.json}``. A step is
verified against ``file_sizes.json`` (every file's size as written) before use, so a
file cut short is named instead of failing deep in orbax; a damaged newest step is
passed over for the newest intact one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

ITEMS = ("state", "meta")
FILE_SIZES = "file_sizes.json"


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step is incomplete, cut short or unreadable; the message names the file."""


def finished_steps(directory: str) -> list[int]:
    """The steps orbax finished writing under ``directory`` (unfinished ones are temp folders)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _read_json(path: str, where: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointDamagedError(f"{where}: {path} is unreadable ({e})") from e


def verify_step(directory: str, step: int) -> None:
    """Raises CheckpointDamagedError naming the first missing, unreadable or cut-short file of
    checkpoint ``step``. Sizes are checked where the step has a file_sizes.json (steps saved
    before it existed, or by a run killed just after the save, are checked for structure only;
    their read errors are still caught when restoring)."""
    step_dir = os.path.join(directory, str(step))
    where = f"checkpoint step {step} in {directory}"
    for item in ITEMS:
        if not os.path.isdir(os.path.join(step_dir, item)):
            raise CheckpointDamagedError(f"{where} lacks its {item!r} item ({os.path.join(step_dir, item)} is missing)")
    _read_json(os.path.join(step_dir, "meta", "metadata"), where)
    sizes_path = os.path.join(step_dir, FILE_SIZES)
    if not os.path.isfile(sizes_path):
        return
    for name, size in _read_json(sizes_path, where).items():
        path = os.path.join(step_dir, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual is None:
            raise CheckpointDamagedError(f"{where}: {path} is missing ({size} bytes were written)")
        if actual != size:
            raise CheckpointDamagedError(f"{where}: {path} is {actual} bytes, {size} were written (cut short?)")


def newest_intact_step(directory: str) -> Optional[int]:
    """The newest step that passes verify_step (None when there is no checkpoint). Damaged
    newer steps are named on the console and left on disk; all damaged is an error."""
    steps = finished_steps(directory)
    damaged = []
    for step in reversed(steps):
        try:
            verify_step(directory, step)
        except CheckpointDamagedError as e:
            damaged.append(str(e))
            continue
        for message in damaged:
            print(f"{message}; using step {step}, the newest intact one", flush=True)
        return step
    if damaged:
        raise CheckpointDamagedError(f"every checkpoint in {directory} is damaged, e.g. {damaged[0]}")
    return None


def innermost_cause(error: BaseException) -> str:
    """An orbax/tensorstore error chain as one line: its innermost cause names the array and file."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"


def read_failure(where: str, error: BaseException) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"{where} could not be read: {innermost_cause(error)}")


class _ItemAloneNote(logging.Filter):
    """orbax warns "Metadata file does not exist" when one item of a step is read on its own
    (the step's metadata file lies a folder up): expected here, and a second line beside a
    CLI's one-line output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _without_item_alone_note():
    note, absl_logger = _ItemAloneNote(), logging.getLogger("absl")  # orbax logs through absl
    absl_logger.addFilter(note)
    try:
        yield
    finally:
        absl_logger.removeFilter(note)


def read_state(state_dir: str) -> dict:
    """A saved train state (dict) on this host's first device, whatever mesh and number of
    processes wrote it (orbax would otherwise lay it out as saved, and fail on another topology)."""
    checkpointer = ocp.StandardCheckpointer()
    with _without_item_alone_note():
        saved = checkpointer.metadata(state_dir).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                        dict(saved))
        return checkpointer.restore(state_dir, target)


def restore_params(workdir: str, step: Optional[int] = None, use_ema: bool = True) -> tuple[dict, dict, int]:
    """(params, run config dict, step) from a train.py workdir's checkpoint ``step``, verified
    (a damaged one is an error naming the file), or by default the newest intact one (damaged
    newer steps are named on the console and passed over)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ folder (is it a train.py workdir?)")
    steps = finished_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory!r}")
    if step is None:
        step = newest_intact_step(directory)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {directory!r}; have {steps}")
    else:
        verify_step(directory, step)
    where = f"checkpoint step {step} in {directory}"
    meta = _read_json(os.path.join(directory, str(step), "meta", "metadata"), where)
    if "config" not in meta:
        raise CheckpointDamagedError(f"{where}: meta/metadata has no 'config' (keys: {sorted(meta)})")
    try:
        state = read_state(os.path.join(directory, str(step), "state"))
    except Exception as e:  # noqa: BLE001 - any read failure is a damaged step
        raise read_failure(where, e) from None
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    return jax.tree_util.tree_map(jnp.asarray, params), json.loads(meta["config"]), step
