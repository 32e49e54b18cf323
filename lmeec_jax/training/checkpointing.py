"""Training checkpoints: an orbax ``CheckpointManager`` holding the train state and, beside
it, the grain data iterator.

Layout: ``<dir>/<step>/state`` (the train-state pytree, orbax standard format) and
``<dir>/<step>/data/process_<i>-of-<n>.json`` (each host's grain iterator state). Saves are
asynchronous; the last ``keep`` are kept. Orbax writes a step into a temporary directory and
renames it when complete (atomic finalize), so a run killed mid-save leaves only finished
steps visible: :meth:`Checkpointer.latest_step` ignores unfinished ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

STATE = "state"
DATA = "data"


class _FrozenIteratorState:
    """The iterator's state captured at save time (async saves write it later)."""

    def __init__(self, state: dict):
        self._bytes = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._bytes


class Checkpointer:
    """``save(step, state, data_iter)`` / ``restore(step, abstract_state, data_iter)``."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()},
        )

    def latest_step(self) -> Optional[int]:
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        args = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iter.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter=None):
        """Restore ``state`` (shapes, dtypes and shardings from ``abstract_state``) and, in
        place, the iterator. Returns the state."""
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out[STATE]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
