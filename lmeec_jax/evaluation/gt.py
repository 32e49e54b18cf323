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

import os
from typing import Any, Dict, List, Optional, Sequence

from lmeec_jax.data.egoexo import ANNOTATION_FILE, list_split_takes, resolve_split
from lmeec_jax.data.errors import DataError
from lmeec_jax.data.rle import check_rle
from lmeec_jax.io import read_json, write_json_atomic

__all__ = ["GTBuildError", "build_gt", "write_gt"]

GTBuildError = DataError  # a processed split that cannot give a GT file (the message says where)


def _int_frames(values: Sequence[Any], where: str) -> List[int]:
    out = []
    for v in values:
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise DataError(f"{where}: annotated frame {v!r} is not an integer")
    return out


def _relations_frames(relations: Dict[str, Any], take: str, obj: str, cam: str) -> List[int]:
    where = f"relations take={take} object={obj} camera={cam}"
    try:
        entry = relations[take]["object_masks"][obj][cam]
    except (KeyError, TypeError):
        raise DataError(f"{where}: missing from the relations file")
    if not isinstance(entry, dict) or "annotated_frames" not in entry:
        raise DataError(f'{where}: no "annotated_frames"')
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
    root, takes = resolve_split(split_dir, split)
    if takes is None:
        takes = list_split_takes(root, annotated_only=True, key=None)
    if relations is not None and not isinstance(relations, dict):
        relations = read_json(relations, what="relations")
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
        vid = read_json(ann_path, take=take)
        masks = vid.get("masks") if isinstance(vid, dict) else None
        if not isinstance(masks, dict):
            raise DataError('no "masks" object', path=ann_path)
        own = vid.get("annotated_frames") if isinstance(vid.get("annotated_frames"), dict) else None
        annotated: Dict[str, Dict[str, List[int]]] = {}
        for obj, cams in masks.items():
            if not isinstance(cams, dict):
                raise DataError(f"{ann_path} object={obj}: camera entry is not an object")
            annotated[obj] = {}
            union = None
            for cam, frames in cams.items():
                if not isinstance(frames, dict):
                    raise DataError(f"{ann_path} object={obj} camera={cam}: frames entry is not an object")
                if check_masks:
                    for frame, rle in frames.items():
                        try:
                            int(frame)
                        except ValueError:
                            raise DataError(f"{ann_path} object={obj} camera={cam} frame={frame}: "
                                            "frame key is not an integer") from None
                        try:
                            check_rle(rle)
                        except DataError as e:
                            raise DataError(f"{ann_path} object={obj} camera={cam} frame={frame}: {e}") from None
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, gt)
