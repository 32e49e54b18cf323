"""File reading and writing shared by the data, evaluation and training code.

* :func:`read_json`: a JSON file, or a one-line :class:`~lmeec_jax.data.errors.DataError`
  naming the file when it is missing, unreadable or not valid JSON;
* :func:`atomic_write`: a file that appears complete or not at all (written to a
  temporary file in the same folder, flushed to disk, then renamed over ``path``);
* :func:`write_json_atomic`: ``json.dump`` through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Iterator, Optional

from lmeec_jax.data.errors import DataError

__all__ = ["read_json", "atomic_write", "write_json_atomic"]


def read_json(path, what: Optional[str] = None, **ctx) -> Any:
    """The parsed JSON file at ``path``.

    ``what`` names the file in the messages (``"GT"`` -> ``"GT file not found"``); ``ctx``
    (take / camera / frame / obj) goes into the :class:`DataError`.
    """
    path = os.fspath(path)
    noun = f"{what} file" if what else "file"
    if not os.path.isfile(path):
        raise DataError(f"{noun} not found", path=path, **ctx)
    try:
        with open(path, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{noun} is truncated or invalid JSON ({e})", path=path, **ctx) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{noun} is unreadable ({type(e).__name__}: {e})", path=path, **ctx) from e


@contextlib.contextmanager
def atomic_write(path, mode: str = "w") -> Iterator[Any]:
    """``with atomic_write(path, "wb") as f: ...``: ``f`` is a new temporary file beside
    ``path``; when the block ends normally it is flushed, fsync'ed and renamed to ``path``
    (``os.replace``), so readers see the old file or the complete new one. If the block
    raises, the temporary file is removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens a new file for writing ('w' or 'wb'), got mode {mode!r}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    f = open(tmp, "x" + mode[1:])  # "x": a new file, with the permissions open(path, "w") gives
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj: Any, **dump_kwargs) -> None:
    """``json.dump(obj, f, **dump_kwargs)`` into ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)
