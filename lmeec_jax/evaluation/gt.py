"""The official correspondence GT file, built from a processed split directory.

Layout (``correspondence/evaluation/process_annotations.py``)::

    {"version": "xx", "challenge": "xx",
     "annotations": {take: {"masks": {obj: {cam: {"<frame>": RLE}}},   # annotation.json, as is
                            "subsample_idx": [...],
                            "annotated_frames": {obj: {cam: [int, ...]}}}}}

``annotated_frames[obj][cam]`` is, officially, the raw ``relations_<split>.json``
field ``annotations[take]["object_masks"][obj][cam]["annotated_frames"]``. A processed
split does not carry it, so in order of preference it comes from:

1. ``relations`` (the raw relations file, as the official script does);
2. an ``"annotated_frames"`` entry of the take's ``annotation.json`` (the synthetic
   data writes one);
3. a fallback: for every camera of the object, the union of the object's mask frame
   keys over all its cameras (the frames someone annotated the object on). This is
   our assumption, not the official data; a warning says when it is used.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lmeec_jax.data.rle import RLEError, check_rle

__all__ = ["GTBuildError", "build_gt", "list_split_takes", "write_gt"]

ANNOTATION_FILE = "annotation.json"
SPLIT_FILES = ("split_checking.json", "split.json")


class GTBuildError(ValueError):
    """A processed split that cannot give a GT file (the message says where)."""


def _read_json(path: str) -> Any:
    try:
        with open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GTBuildError(f"{path}: file missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GTBuildError(f"{path}: invalid JSON ({e})")


def _int_frames(values: Sequence[Any], where: str) -> List[int]:
    out = []
    for v in values:
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise GTBuildError(f"{where}: annotated frame {v!r} is not an integer")
    return out


def list_split_takes(split_dir: str, split: Optional[str] = None) -> Tuple[str, List[str]]:
    """(directory holding the takes, take ids) for ``split_dir`` and optional ``split``.

    ``split`` may name a sub-directory (``<root>/<split>/<take>``, LM-EEC's layout) or a
    key of ``split_checking.json`` / ``split.json`` in ``split_dir`` (the official
    layout: all takes in one directory, the split file lists them).
    """
    if not os.path.isdir(split_dir):
        raise GTBuildError(f"{split_dir}: not a directory")
    root = split_dir
    if split is not None:
        if os.path.isdir(os.path.join(split_dir, split)):
            root = os.path.join(split_dir, split)
        else:
            for name in SPLIT_FILES:
                sp = os.path.join(split_dir, name)
                if os.path.isfile(sp):
                    table = _read_json(sp)
                    if isinstance(table, dict) and split in table:
                        return root, [str(t) for t in table[split]]
            raise GTBuildError(f"split {split!r}: neither {os.path.join(split_dir, split)} nor a "
                               f"{'/'.join(SPLIT_FILES)} in {split_dir} listing it")
    takes = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, ANNOTATION_FILE)))
    return root, takes


def _relations_frames(relations: Dict[str, Any], take: str, obj: str, cam: str) -> List[int]:
    where = f"relations take={take} object={obj} camera={cam}"
    try:
        entry = relations[take]["object_masks"][obj][cam]
    except (KeyError, TypeError):
        raise GTBuildError(f"{where}: missing from the relations file")
    if not isinstance(entry, dict) or "annotated_frames" not in entry:
        raise GTBuildError(f'{where}: no "annotated_frames"')
    return _int_frames(entry["annotated_frames"], where)


def build_gt(
    split_dir: str,
    split: Optional[str] = None,
    relations: Optional[Any] = None,
    check_masks: bool = True,
    warnings: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Official GT dict for a processed split (see module docstring).

    ``relations``: path or loaded dict of a raw ``relations_<split>.json`` (its
    ``"annotations"`` object, or the whole file). ``check_masks``: validate every RLE
    (structure, runs adding up to H*W) without decoding. Messages about fallbacks and
    skipped takes are appended to ``warnings``.
    """
    warnings = warnings if warnings is not None else []
    root, takes = list_split_takes(split_dir, split)
    if relations is not None and not isinstance(relations, dict):
        relations = _read_json(os.fspath(relations))
    if isinstance(relations, dict) and isinstance(relations.get("annotations"), dict):
        relations = relations["annotations"]
    sources = set()
    out: Dict[str, Any] = {"version": "xx", "challenge": "xx", "annotations": {}}
    n_fallback = 0
    for take in takes:
        ann_path = os.path.join(root, take, ANNOTATION_FILE)
        if not os.path.isfile(ann_path):
            warnings.append(f"take={take}: {ann_path} missing, take skipped")
            continue
        vid = _read_json(ann_path)
        masks = vid.get("masks") if isinstance(vid, dict) else None
        if not isinstance(masks, dict):
            raise GTBuildError(f'{ann_path}: no "masks" object')
        own = vid.get("annotated_frames") if isinstance(vid.get("annotated_frames"), dict) else None
        annotated: Dict[str, Dict[str, List[int]]] = {}
        for obj, cams in masks.items():
            if not isinstance(cams, dict):
                raise GTBuildError(f"{ann_path} object={obj}: camera entry is not an object")
            annotated[obj] = {}
            union = None
            for cam, frames in cams.items():
                if not isinstance(frames, dict):
                    raise GTBuildError(f"{ann_path} object={obj} camera={cam}: frames entry is not an object")
                if check_masks:
                    for frame, rle in frames.items():
                        try:
                            int(frame)
                            check_rle(rle)
                        except ValueError as e:
                            msg = str(e) if isinstance(e, RLEError) else "frame key is not an integer"
                            raise GTBuildError(f"{ann_path} object={obj} camera={cam} frame={frame}: {msg}")
                if relations is not None:
                    annotated[obj][cam] = _relations_frames(relations, take, obj, cam)
                    sources.add("relations")
                elif own is not None and isinstance(own.get(obj), dict) and cam in own[obj]:
                    annotated[obj][cam] = _int_frames(own[obj][cam], f"{ann_path} annotated_frames object={obj} camera={cam}")
                    sources.add("annotation.json")
                else:
                    if union is None:
                        union = sorted({int(f) for fr in cams.values() if isinstance(fr, dict) for f in fr})
                    annotated[obj][cam] = list(union)
                    sources.add("fallback")
                    n_fallback += 1
        entry = dict(vid)
        entry["annotated_frames"] = annotated
        out["annotations"][take] = entry
    if n_fallback:
        warnings.append(f"annotated_frames of {n_fallback} (object, camera) entries are a fallback (the union of the "
                        "object's mask frames over its cameras); pass the raw relations file for the official ones")
    if not out["annotations"]:
        warnings.append(f"no takes with {ANNOTATION_FILE} found under {root}")
    out["split"] = split
    out["annotated_frames_from"] = sorted(sources)
    return out


def write_gt(gt: Dict[str, Any], path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(gt, f)
    os.replace(tmp, path)
