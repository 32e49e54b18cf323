"""COCO RLE masks and the LZ-String wrapping of EgoExo4D's raw relation files.

Masks are ``uint8`` numpy arrays of shape ``(H, W)`` with values 0/1. An RLE is the
JSON form ``{"size": [H, W], "counts": str}`` (COCO *compressed* RLE: column-major
run lengths, alternating background/foreground starting with background, each
written in pycocotools' 6-bit "LEB128-like" text code with deltas from the 4th run
on). Uncompressed RLE (``counts`` a list of ints) is accepted on input.

The raw ``relations_<split>.json`` stores, per (object, camera, frame),
``{"width": W, "height": H, "encodedMask": LZString.compressToEncodedURIComponent(counts)}``.

Every malformed input raises :class:`RLEError` (another name of
:class:`lmeec_jax.data.errors.DataError`, a ``ValueError``) that says what is wrong;
pycocotools itself decodes many broken strings silently into garbage. This module is the
only RLE / LZ-String codec of the package.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from lzstring import LZString
from pycocotools import mask as mask_utils

from .errors import DataError

__all__ = [
    "RLEError",
    "counts_to_runs",
    "runs_to_counts",
    "check_rle",
    "decode_rle",
    "decode_checked",
    "encode_mask",
    "rle_area",
    "compress_counts",
    "decompress_counts",
    "relation_entry_to_rle",
    "rle_to_relation_entry",
]


RLEError = DataError  # a mask that is not a valid COCO RLE (the message says why)


# ----------------------------------------------------------------------------- counts


def counts_to_runs(counts: str) -> List[int]:
    """Run lengths coded in a compressed COCO ``counts`` string.

    Each value is written in groups of 5 bits, least significant first, one group per
    character ``chr(48 + g)``; bit 5 (0x20) of a group means "another group follows",
    bit 4 of the last group is the sign. From the 4th value on, the value is stored as
    the difference to the value two places earlier.
    """
    if not isinstance(counts, str):
        raise RLEError(f"RLE counts must be a string, got {type(counts).__name__}")
    runs: List[int] = []
    i, n = 0, len(counts)
    while i < n:
        value, shift = 0, 0
        while True:
            if i >= n:
                raise RLEError(f"RLE counts string ends in the middle of run {len(runs)} (truncated?)")
            g = ord(counts[i]) - 48
            if g < 0 or g > 63:
                raise RLEError(f"invalid character {counts[i]!r} at position {i} of the RLE counts string")
            i += 1
            value |= (g & 0x1F) << shift
            shift += 5
            if not g & 0x20:
                if g & 0x10:
                    value -= 1 << shift  # sign-extend
                break
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise RLEError(f"run {len(runs)} of the RLE counts is negative ({value})")
        runs.append(value)
    return runs


def runs_to_counts(runs: Sequence[int]) -> str:
    """Inverse of :func:`counts_to_runs` (same text as pycocotools' encoder)."""
    out = []
    for j, r in enumerate(runs):
        x = int(r)
        if x < 0:
            raise RLEError(f"run {j} is negative ({x})")
        if j > 2:
            x -= int(runs[j - 2])
        while True:
            g = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not g & 0x10) or (x == -1 and g & 0x10))
            if more:
                g |= 0x20
            out.append(chr(g + 48))
            if not more:
                break
    return "".join(out)


# ----------------------------------------------------------------------------- RLE objects


def _check_size(size: Any) -> Tuple[int, int]:
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise RLEError(f'RLE "size" must be [height, width], got {size!r}')
    h, w = size
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise RLEError(f'RLE "size" must hold two non-negative integers, got {size!r}')
    return int(h), int(w)


def check_rle(rle: Any, expect_size: Optional[Tuple[int, int]] = None) -> Tuple[Tuple[int, int], List[int]]:
    """Validate an RLE; returns ``((H, W), runs)``. Raises :class:`RLEError`."""
    if not isinstance(rle, dict):
        raise RLEError(f"mask must be a COCO RLE object {{'size', 'counts'}}, got {type(rle).__name__}")
    missing = [k for k in ("size", "counts") if k not in rle]
    if missing:
        raise RLEError(f"RLE object lacks {' and '.join(repr(k) for k in missing)} (keys: {sorted(rle)})")
    h, w = _check_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as e:
            raise RLEError(f"RLE counts bytes are not ASCII ({e})") from e
    if isinstance(counts, str):
        runs = counts_to_runs(counts)
    elif isinstance(counts, (list, tuple)):
        runs = []
        for j, v in enumerate(counts):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise RLEError(f"uncompressed RLE run {j} is not a non-negative integer ({v!r})")
            runs.append(int(v))
    else:
        raise RLEError(f"RLE counts must be a string (or a list of ints), got {type(counts).__name__}")
    total = sum(runs)
    if total != h * w:
        raise RLEError(f"RLE runs cover {total} pixels but size {h}x{w} has {h * w}")
    if expect_size is not None and (h, w) != tuple(expect_size):
        raise RLEError(f"mask is {h}x{w}, expected {expect_size[0]}x{expect_size[1]}")
    return (h, w), runs


def decode_rle(rle: Any, expect_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Validated decode of one RLE to a ``uint8`` (H, W) array of 0/1."""
    (h, w), runs = check_rle(rle, expect_size)
    return decode_checked(rle, (h, w), runs)


def decode_checked(rle: Any, size: Tuple[int, int], runs: List[int]) -> np.ndarray:
    """Decode an RLE that :func:`check_rle` has validated (``size, runs = check_rle(rle)``)."""
    h, w = size
    if h == 0 or w == 0:
        return np.zeros((h, w), np.uint8)
    counts = rle["counts"]
    if isinstance(counts, str):
        obj = {"size": [h, w], "counts": counts.encode("ascii")}
    elif isinstance(counts, bytes):
        obj = {"size": [h, w], "counts": counts}
    else:
        obj = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(obj)
    return np.ascontiguousarray(m, dtype=np.uint8)


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """Compressed COCO RLE (JSON-ready: counts is a str) of a 2-D mask (nonzero = 1)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    m = np.asfortranarray((m != 0).astype(np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")}


def rle_area(rle: Any) -> int:
    """Foreground pixel count (odd runs) of a validated RLE."""
    _, runs = check_rle(rle)
    return int(sum(runs[1::2]))


# ----------------------------------------------------------------------------- LZ-String


def compress_counts(counts: str) -> str:
    """``LZString.compressToEncodedURIComponent`` of a counts string."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise TypeError(f"counts must be a str, got {type(counts).__name__}")
    return LZString.compressToEncodedURIComponent(counts)


def decompress_counts(encoded: str) -> str:
    """Inverse of :func:`compress_counts`; :class:`RLEError` if it is not LZ-String."""
    if not isinstance(encoded, str):
        raise RLEError(f"encodedMask must be a string, got {type(encoded).__name__}")
    if encoded == "":
        raise RLEError("encodedMask is empty")
    try:
        out = LZString.decompressFromEncodedURIComponent(encoded)
    except Exception as e:  # the lzstring package raises KeyError / UnboundLocalError on garbage
        raise RLEError(f"encodedMask is not LZ-String URI-component data ({type(e).__name__}: {e})") from e
    if not out:
        raise RLEError("encodedMask decompresses to nothing (not LZ-String data?)")
    return out


def relation_entry_to_rle(entry: Any, check: bool = True) -> Dict[str, Any]:
    """Raw relations entry ``{"width", "height", "encodedMask"}`` -> RLE ``{"size": [H, W],
    "counts": str}``, validated with :func:`check_rle` unless ``check`` is False (then only
    the entry's keys, the LZ-String data and the counts being ASCII text are checked)."""
    if not isinstance(entry, dict):
        raise RLEError(f"relation mask entry must be an object, got {type(entry).__name__}")
    missing = [k for k in ("width", "height", "encodedMask") if k not in entry]
    if missing:
        raise RLEError(f"relation mask entry lacks {missing}")
    counts = decompress_counts(entry["encodedMask"])
    if not counts.isascii():
        raise RLEError("decoded encodedMask is not an RLE counts string (not ASCII)")
    rle = {"size": [entry["height"], entry["width"]], "counts": counts}
    if check:
        check_rle(rle)
    return rle


def rle_to_relation_entry(rle: Any) -> Dict[str, Any]:
    """Validated RLE -> raw relations entry (inverse of :func:`relation_entry_to_rle`)."""
    (h, w), runs = check_rle(rle)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        counts = runs_to_counts(runs)
    return {"width": w, "height": h, "encodedMask": compress_counts(counts)}
