"""File reading and writing shared by the data, evaluation and training code.

* :func:`read_json`: a JSON file, or a one-line :class:`~lmeec_jax.data.errors.DataError`
  naming the file when it is missing, unreadable or not valid JSON;
* :func:`atomic_write`: a file that appears complete or not at all (written to a
  temporary file in the same folder, flushed to disk, then renamed over ``path``);
* :func:`write_json_atomic`: ``json.dump`` through :func:`atomic_write`;
* :func:`encode_name` / :func:`decode_name`: any string (an object name with ``/``, a
  leading dot, hundreds of characters) as one safe file name and back; plain names are
  kept as they are;
* :func:`fingerprint`: a content hash of a file or a directory tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from urllib.parse import quote, unquote
from typing import Any, Iterator, Optional

from lmeec_jax.data.errors import DataError

__all__ = ["read_json", "atomic_write", "write_json_atomic", "encode_name", "decode_name", "fingerprint",
           "unwritable_reason"]


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


MAX_NAME_BYTES = 200  # below the 255-byte limit of common file systems, room for a suffix
_LONG_MARK = "%~"  # encoded long names: <quoted prefix>%~<sha1 of the name>


def _plain(name: str) -> bool:
    return (bool(name) and "/" not in name and "%" not in name and "\0" not in name and not name.startswith(".")
            and len(name.encode("utf-8")) <= MAX_NAME_BYTES)


def encode_name(name: str) -> str:
    """One file name for ``name``: unchanged when it is plain (no ``/``, ``%`` or NUL, no
    leading dot, at most 200 bytes); else percent-encoded (``/`` -> ``%2F``, a leading
    ``.`` -> ``%2E``); a name still too long keeps a prefix plus ``%~`` and its SHA-1
    (:func:`decode_name` then gives the prefix; match such names with ``encode_name``)."""
    if _plain(name):
        return name
    enc = quote(name, safe=" !#$&'()+,;=@[]^_`{}~-")
    if enc.startswith("."):
        enc = "%2E" + enc[1:]
    if len(enc.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()
        head = enc[: MAX_NAME_BYTES - len(digest) - len(_LONG_MARK)]
        head = head[: len(head) - 2] if "%" in head[-2:] else head  # never cut a %XX escape
        enc = head + _LONG_MARK + digest
    return enc


def decode_name(fname: str) -> str:
    """Inverse of :func:`encode_name` (plain names are returned as they are)."""
    if "%" not in fname:
        return fname
    if _LONG_MARK in fname:
        return fname  # hashed: resolve by matching encode_name of the candidate names
    return unquote(fname)


def fingerprint(path) -> str:
    """SHA-256 over the relative names and contents of the files under ``path`` (or of the file)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs)
    for fp in files:
        h.update(os.path.relpath(fp, path).encode("utf-8") + b"\0")
        with open(fp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def unwritable_reason(path) -> Optional[str]:
    """Why a file or folder cannot be created at ``path`` (its nearest existing ancestor is
    not a writable folder), or None."""
    probe = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not a writable folder"
    return None
