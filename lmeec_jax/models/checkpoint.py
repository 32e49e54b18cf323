"""Saving and loading model weights: an orbax checkpoint of the parameters plus config.json.

Layout of a model directory (what ``python -m convert`` writes)::

    DIR/config.json   the ModelConfig (name, sizes, image_size, mv_moe)
    DIR/params/       orbax checkpoint of {torch-style name: array}

Parameters are stored under their torch state-dict names (the same names the converter
reads), so a directory can be inspected or exported back without the NNX graph.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import logging
import os
import re
import secrets
import shutil
import time
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmeec_jax.models.config import ModelConfig
from lmeec_jax.models.weights import load_state_dict, to_state_dict

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class ModelDirError(OSError):
    """A model directory cannot be written where asked; ``str()`` is one line naming the path
    and the cause, ``errno`` the reason (EEXIST, ENOTDIR, EACCES, ENOSPC, ...). Whatever was at
    that path is left as it was."""

    def __init__(self, path, reason: str, err: int | None = None):
        super().__init__(err or 0, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def dir_kind(path: str | os.PathLike) -> str:
    """What is at ``path``: ``"missing"``, ``"empty"`` (an empty directory), ``"model"`` (a model
    directory: config.json + params/), ``"other"`` (a directory with other content) or ``"file"``
    (anything else that is not a directory, a dangling link included)."""
    p = Path(path)
    if not p.is_dir():
        return "file" if p.exists() or p.is_symlink() else "missing"
    if (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir():
        return "model"
    try:
        return "other" if any(p.iterdir()) else "empty"
    except OSError:  # unreadable: assume it holds something
        return "other"


def _writable(path: Path) -> bool:
    """Whether this process may create and remove entries in the directory ``path``. Checked with
    the effective ids, so for a non-root user a read-only folder (or file system) reads False;
    root passes any permission bits (but not a read-only mount)."""
    eff = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK | os.X_OK, effective_ids=eff)


def _target(out_dir: str | os.PathLike) -> Path:
    out = Path(os.path.abspath(out_dir))
    return out.resolve() if out.is_symlink() else out  # replace what a link points at, not the link


def prepare_save_target(out_dir: str | os.PathLike, *, overwrite: bool = True, overwrite_other: bool = False,
                        flag: str | None = None) -> Path:
    """Tidy what a killed save left beside ``out_dir`` (see :func:`_clean_stale`), then refuse,
    with :class:`ModelDirError`, what :func:`save_model` would refuse or fail on because of the
    place itself; returns the absolute directory to write. ``flag`` names the option that allows
    replacing, in the messages (default: the keyword names)."""
    out = _target(out_dir)
    if out.parent.is_dir() and _writable(out.parent):
        _clean_stale(out)
    kind = dir_kind(out)
    if kind == "file":
        raise ModelDirError(out, "exists and is not a directory", errno.ENOTDIR)
    if kind == "model" and not overwrite:
        raise ModelDirError(out, f"already holds a model directory; pass {flag or 'overwrite=True'} to replace it",
                            errno.EEXIST)
    if kind == "other" and not (overwrite and overwrite_other):
        raise ModelDirError(out, "is a directory with other files in it (not a model directory); pass "
                            f"{flag or 'overwrite_other=True'} to replace it and everything in it, or choose another "
                            "directory", errno.EEXIST)
    base = out.parent  # where the new directory is built; created if missing
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise ModelDirError(out, f"cannot be created: {base} is not a directory", errno.ENOTDIR)
    for d in (base, out) if kind in ("model", "other") else (base,):
        if not _writable(d):
            raise ModelDirError(out, f"cannot be written: {d} is read-only or not writable by this user",
                                errno.EACCES)
    return out


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")  # how tensorstore reports the OS's refusal


def _drop_closed_loop_noise(hook):
    """``hook`` minus the "Event loop is closed" RuntimeErrors that tensorstore callbacks raise,
    one per pending write, once an orbax save has failed (hundreds of traceback lines)."""
    def filtered(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            hook(unraisable)
    filtered.drops_closed_loop_noise = True
    return filtered


class _DropFailedWriteLogs(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" for a tensorstore write the
    OS refused: one per array after a failed save, which :func:`save_model` reports once."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ValueError) and _OS_ERROR_CODE.search(str(exc)))


_FAILED_WRITE_LOGS = _DropFailedWriteLogs()


def _this_process_only():
    """A model directory is host numpy, read and written by the calling process alone: in a
    multi-process job (``python -m train`` exporting from process 0, every process loading
    ``init_from``) orbax must not wait for the other processes."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _write_params(path: Path, sd: dict[str, np.ndarray]) -> None:
    """Write ``sd`` as an orbax checkpoint at ``path``, synchronously. A write the OS refuses
    (tensorstore's ValueError "... [os_error_code='28']") comes out once, as OSError: orbax's
    error log is off meanwhile, and the noise that follows a failure (some of it later, as
    pending callbacks end and futures are collected) stays filtered out."""
    hook = sys.unraisablehook
    if not getattr(hook, "drops_closed_loop_noise", False):
        sys.unraisablehook = _drop_closed_loop_noise(hook)
    logging.getLogger("asyncio").addFilter(_FAILED_WRITE_LOGS)  # narrow: stays
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.CRITICAL)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=_this_process_only())
    try:
        ckptr.save(path, args=ocp.args.StandardSave(sd))
    except ValueError as e:
        m = _OS_ERROR_CODE.search(str(e))
        if not m:
            raise
        raise OSError(int(m[1]), os.strerror(int(m[1]))) from e
    else:
        sys.unraisablehook = hook  # no failure, no late noise to drop
    finally:
        ckptr.close()
        absl_log.setLevel(level)


_WORK_RE = r"\.{name}\.(saving|replaced)-(\d+)-[0-9a-f]+"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        pass
    return True


def _clean_stale(out: Path) -> None:
    """Remove the work folders that a killed save left beside ``out``. One exception: a
    ``replaced`` folder while ``out`` is missing (killed between the two renames of the
    fallback swap) is the old directory, complete: it is renamed back."""
    pattern = re.compile(_WORK_RE.format(name=re.escape(out.name)))
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = pattern.fullmatch(p.name)
        if not m or _alive(int(m[2])):
            continue
        if m[1] == "replaced" and not os.path.lexists(out) and dir_kind(p) == "model":
            try:
                os.rename(p, out)
            except OSError:  # left for the user to see
                pass
        else:
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE). False where
    the system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc / not Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out: Path) -> Path | None:
    """Put the complete directory ``new`` at ``out``; returns where the old ``out`` now is (to
    delete), or None. A kill at any point leaves the old or the new directory at ``out``: one
    atomic exchange, or (where that is not available) two renames, with :func:`_clean_stale`
    renaming the old one back after a kill between them."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return None
    if _exchange(new, out):
        return new
    old = new.with_name(new.name.replace(".saving-", ".replaced-", 1))
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    return old


def _remove_work(work: Path, settle_s: float = 5.0) -> None:
    """Remove a failed save's work folder. After a refused write, tensorstore's pending writes of
    other arrays may still create files there for a moment: remove until it stays gone (two
    checks 0.1 s apart) or ``settle_s`` passes."""
    deadline = time.monotonic() + settle_s
    while True:
        shutil.rmtree(work, ignore_errors=True)
        time.sleep(0.1)
        if not work.exists() or time.monotonic() > deadline:
            return


def save_model(model: nnx.Module, cfg: ModelConfig, out_dir: str | os.PathLike, *, overwrite: bool = True,
               overwrite_other: bool = False) -> Path:
    """Write ``model``'s parameters and ``cfg`` as the model directory ``out_dir`` (parents are
    created). An existing model directory there is replaced when ``overwrite``; a non-empty
    directory that is not a model directory only when ``overwrite_other`` too (all its files go).

    The new directory is built in a hidden folder beside ``out_dir`` and swapped in only when
    complete, so a kill at any moment leaves either the old or the new complete directory at
    ``out_dir``; a work folder it may leave is removed by the next save there. Raises
    :class:`ModelDirError` (``out_dir`` unchanged, no work folder left) when refused or when
    writing fails (disk full, permissions)."""
    out = prepare_save_target(out_dir, overwrite=overwrite, overwrite_other=overwrite_other)
    sd = {k: np.asarray(v) for k, v in to_state_dict(model).items()}
    work = out.parent / f".{out.name}.saving-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        _write_params(work / PARAMS_DIR, sd)
        (work / CONFIG_FILE).write_text(cfg.to_json())
        old = _swap_in(work, out)
    except BaseException as e:
        _remove_work(work)
        if isinstance(e, OSError) and not isinstance(e, ModelDirError):
            raise ModelDirError(out, f"cannot save the model: {e.strerror or e} (nothing changed there)",
                                e.errno) from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model directory written by `python -m convert`?)")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed model config: {e}") from None


def load_state(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The stored parameters as a torch-named numpy state dict."""
    path = Path(model_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing parameter checkpoint")
    restored = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()).restore(path)
    return {k: np.asarray(v) for k, v in restored.items()}


def load_model(model_dir: str | os.PathLike, *, seed: int = 0, **config_overrides):
    """Build the model described by ``DIR/config.json`` and load its parameters (strict).

    ``config_overrides`` may change fields that do not affect parameter shapes
    (e.g. ``image_size=480``).
    """
    from lmeec_jax.models.sam2 import build_model  # local: keeps this module light

    cfg = load_config(model_dir)
    if config_overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **config_overrides})
    model = build_model(cfg, seed=seed, abstract=True)
    load_state_dict(model, load_state(model_dir))
    return model, cfg
