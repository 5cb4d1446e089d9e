"""Orbax checkpoints of a training run: the train state, every process's data-iterator
state and the run's metadata, saved together so a killed run resumes exactly.

Layout: ``{workdir}/checkpoints/{step}/{state,meta}``. Saves are asynchronous (the
step loop goes on while arrays are written); a checkpoint becomes visible only when
complete, so a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils


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


class Checkpointer:
    """Save every ``every_steps`` steps, keep the last ``keep``; restore the latest."""

    def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep),
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: bytes, meta: dict) -> None:
        """Saves (asynchronously) the state at ``step`` with every process's iterator state."""
        meta = dict(meta, step=int(step), data_states=gather_process_states(data_state))
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes, dict]:
        """(state laid out as ``abstract_state`` says, this process's iterator state, meta)."""
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        meta = restored.meta
        states = meta["data_states"]
        if len(states) != jax.process_count():
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written by {len(states)} process(es); "
                f"resuming with {jax.process_count()} would not continue the same data streams"
            )
        return restored.state, states[jax.process_index()].encode(), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, step: Optional[int] = None, use_ema: bool = True) -> tuple[dict, dict, int]:
    """(params, run config dict, step) from a train.py workdir's checkpoint (latest by default)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ folder (is it a train.py workdir?)")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory!r}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {directory!r}; have {steps}")
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    return jax.tree_util.tree_map(jnp.asarray, params), json.loads(meta["config"]), step


def init_from_checkpoint(params: Any, workdir: str) -> Any:
    """``params`` with every leaf that ``workdir``'s latest checkpoint holds replaced by it.

    The video stage starts so from the image stage: the checkpoint's UNet and pose
    encoder (EMA when kept) come in; leaves it lacks (the motion modules) stay as built.
    A checkpoint leaf we do not have, or of another shape, is an error naming it.
    """
    loaded, _, step = restore_params(workdir)
    ours, theirs = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
    name = "/".join
    unexpected = [name(p) for p in theirs if p not in ours]
    misshapen = [f"{name(p)} {tuple(v.shape)} vs ours {tuple(ours[p].shape)}"
                 for p, v in theirs.items() if p in ours and tuple(v.shape) != tuple(ours[p].shape)]
    if unexpected or misshapen:
        raise ValueError(
            f"model.init_from={workdir!r} (step {step}) does not fit this model: "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(misshapen)} misshapen, e.g. {misshapen[:3]}"
        )
    kept = len(ours) - len(theirs)
    print(f"initialised {len(theirs)} params from {workdir} step {step}; {kept} keep their fresh values",
          flush=True)
    merged = {p: theirs.get(p, v).astype(v.dtype) for p, v in ours.items()}
    return traverse_util.unflatten_dict(merged)
