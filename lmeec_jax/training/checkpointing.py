"""Training checkpoints: an orbax ``CheckpointManager`` holding the train state and, beside
it, the grain data iterator.

Layout: ``<dir>/<step>/state`` (the train-state pytree, orbax standard format) and
``<dir>/<step>/data/process_<i>-of-<n>.json`` (each host's grain iterator state). Saves are
asynchronous; the last ``keep`` are kept. Orbax writes a step into a temporary directory and
renames it when complete (atomic finalize), so a run killed mid-save leaves only finished
steps visible: :meth:`Checkpointer.latest_step` ignores unfinished ones.

Storage faults are :class:`CheckpointError` (one line naming the step's path and the cause): a
failed save (also an asynchronous one: :meth:`Checkpointer.check` raises it between training
steps, as soon as the background write has failed), and a checkpoint that cannot be read.
:meth:`Checkpointer.restore_latest` falls back to the newest step that restores; the unreadable
newer ones are moved aside (``<dir>.unreadable/<step>``), never deleted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "abstract_like", "error_line"]

STATE = "state"
DATA = "data"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (one line: the path and the cause)."""


def error_line(e: BaseException) -> str:
    """One line of an exception: its type and first line (orbax / tensorstore errors are long)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}" if not isinstance(e, OSError) else text


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
        self._error: Optional[CheckpointError] = None
        self._watcher: Optional[threading.Thread] = None

    def latest_step(self) -> Optional[int]:
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously if enabled); raises :class:`CheckpointError`
        if this or an earlier save failed."""
        if self._watcher is not None:  # orbax waits for the previous save anyway: report its failure as its own
            self._watcher.join()
        self.check()
        args = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iter.get_state()))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:
            raise self._save_failed(step, e) from e
        if saved:
            self._watch(step)
        return saved

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        return CheckpointError(f"checkpoint save of step {step} to {self.step_path(step)} failed: {error_line(e)}")

    def _watch(self, step: int) -> None:
        """A thread that waits for the background write of ``step`` and records its failure."""
        def wait():
            try:
                self.manager.wait_until_finished()
            except BaseException as e:  # noqa: BLE001 - reported by check()
                self._error = self._error or self._save_failed(step, e)

        self._watcher = threading.Thread(target=wait, name=f"checkpoint-{step}-watch", daemon=True)
        self._watcher.start()

    def check(self) -> None:
        """Raise the :class:`CheckpointError` of a failed (background) save, if any."""
        if self._error is not None:
            raise self._error

    def restore(self, step: int, abstract_state: Any, data_iter=None):
        """Restore ``state`` (shapes, dtypes and shardings from ``abstract_state``) and, in
        place, the iterator. Returns the state; :class:`CheckpointError` if it cannot be read."""
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.step_path(step)} cannot be restored: {error_line(e)}") from e
        return out[STATE]

    def restore_latest(self, abstract_state: Any, data_iter=None, log=print):
        """Restore the newest step that reads back; returns ``(step, state)`` or ``(None, None)``
        when there is no checkpoint. Newer unreadable steps (truncated, partial) are reported
        and moved to ``<dir>.unreadable/``; if no step restores (e.g. another model), nothing
        is moved and the newest step's :class:`CheckpointError` is raised."""
        steps = sorted(self.all_steps(), reverse=True)
        bad: list[tuple[int, CheckpointError]] = []
        for step in steps:
            try:
                state = self.restore(step, abstract_state, data_iter)
            except CheckpointError as e:
                bad.append((step, e))
                continue
            for b, e in bad:
                dest = self.directory.with_name(self.directory.name + ".unreadable") / f"{b}-{time.strftime('%Y%m%dT%H%M%S')}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.step_path(b), dest)
                log(f"warning: {e}; moved to {dest}; restoring step {step}")
            if bad:
                self.manager.reload()
            return step, state
        if bad:
            raise bad[0][1]
        return None, None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._error = self._error or CheckpointError(f"checkpoint save to {self.directory} failed: {error_line(e)}")
        self.check()

    def close(self) -> None:
        """Wait for the pending save and release the manager; never raises (a failed save is
        reported by :meth:`check` / :meth:`wait`)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - already reported
            pass
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
