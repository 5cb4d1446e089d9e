"""Orbax checkpoints of a training run: the train state, every process's data-iterator
state and the run's metadata, saved together so a killed run resumes exactly.

Layout: ``{workdir}/checkpoints/{step}/{state,meta}``. Saves are asynchronous (the
step loop goes on while arrays are written); a checkpoint becomes visible only when
complete, so a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
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
