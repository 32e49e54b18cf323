"""Readers for EgoExo4D correspondence data.

Processed layout (what LM-EEC reads; written by the official ``process_data.py``,
by :mod:`lmeec_jax.data.prepare` and by :mod:`lmeec_jax.data.synthetic`)::

    <split_dir>/<take>/annotation.json
        {"masks": {obj: {cam: {"<frame>": {"size": [H, W], "counts": str}}}},
         "subsample_idx": [...]}            # COCO RLE at full camera resolution
    <split_dir>/<take>/<cam>/<frame>.jpg    # every 30th frame: 0.jpg, 30.jpg, ...

Video listing (``tools/correspondence_inference.py`` of LM-EEC):

* cameras = sub-directories of the take; the ego camera is the one whose name
  contains ``aria`` (the reference keeps the last one in ``os.listdir`` order; we use
  natural order, so with several the last in natural order wins); takes without one
  are skipped;
* for every object of ``annotation["masks"]`` (file order) and every other camera
  directory (natural order) that is annotated for the object:
  ego->exo: source = aria, target = the exo camera;
  exo->ego: source = the exo camera, target = aria (skipped if aria is not
  annotated for the object), so an ego target appears once per exo source;
* frames = natural sort of (source camera's JPEG names) ∩ (target camera's
  annotation keys); ``subsample_idx`` is ignored. ``frames="official"`` lists the
  EvalAI samples instead (see :func:`list_take_videos`).

Raw ``relations_<split>.json``: ``{"annotations": {take: {"take_name", "object_masks":
{obj: {cam: {"annotation": {"<frame>": {"width", "height", "encodedMask"}},
"annotated_frames": [...]}}}}}}`` where ``encodedMask`` is LZ-String
(``compressToEncodedURIComponent``) of the COCO compressed RLE counts string.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lmeec_jax.evaluation.protocol import DIRECTIONS, EVAL_SIZE, check_direction, is_ego_camera
from lmeec_jax.io import read_json

from .errors import DataError
from .images import IMAGE_SIZE, open_rgb, normalize_uint8, resize_mask_nearest, resize_mask_source
from .rle import check_rle, decode_checked, relation_entry_to_rle, rle_to_relation_entry

__all__ = [
    "DataError",
    "DIRECTIONS",
    "VideoRecord",
    "DataReport",
    "EgoExoVideoSource",
    "natural_key",
    "natsorted",
    "is_ego_camera",
    "load_annotation",
    "take_cameras",
    "camera_frames",
    "list_take_videos",
    "list_split_takes",
    "resolve_split",
    "read_take_list",
    "list_videos",
    "list_train_videos",
    "decode_mask",
    "ViewMasks",
    "load_video",
    "load_clip_raw",
    "iter_videos",
    "load_relations",
    "decode_relation_mask",
    "encode_relation_mask",
    "relation_take_masks",
    "relation_annotated_frames",
]

ANNOTATION_FILE = "annotation.json"
SPLIT_FILES = ("split_checking.json", "split.json")  # official split files: {split: [takes]}

# ----------------------------------------------------------------------------- helpers

_NUM = re.compile(r"(\d+)")


def natural_key(s) -> tuple:
    """Sort key of natsort's default order for our names: digit runs compare as numbers."""
    parts = _NUM.split(str(s))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "")


def natsorted(items: Iterable) -> list:
    return sorted(items, key=natural_key)


def load_annotation(take_dir, take: Optional[str] = None) -> dict:
    """``<take_dir>/annotation.json`` with its structure checked (not the masks themselves)."""
    take = take if take is not None else os.path.basename(os.path.normpath(take_dir))
    path = os.path.join(take_dir, ANNOTATION_FILE)
    ann = read_json(path, take=take)
    if not isinstance(ann, dict) or not isinstance(ann.get("masks"), dict):
        raise DataError('annotation has no "masks" object', path=path, take=take)
    for obj, cams in ann["masks"].items():
        if not isinstance(cams, dict):
            raise DataError("annotation masks entry is not an object", path=path, take=take, obj=obj)
        for cam, frames in cams.items():
            if not isinstance(frames, dict):
                raise DataError("annotation camera entry is not an object", path=path, take=take, obj=obj, camera=cam)
    return ann


def take_cameras(take_dir) -> List[str]:
    """Camera directories of a take, natural order."""
    return natsorted(d for d in os.listdir(take_dir) if os.path.isdir(os.path.join(take_dir, d)))


def camera_frames(cam_dir) -> List[str]:
    """JPEG frame names of a camera directory (``30.jpg`` -> ``"30"``), natural order.

    The reference takes ``int(name.split(".")[0])`` of every entry, then compares as
    strings, so ``"030.jpg"`` would read as ``"30"``; we keep only ``<digits>.jpg``
    files and normalise the same way.
    """
    out = []
    for f in os.listdir(cam_dir):
        stem, ext = os.path.splitext(f)
        if ext.lower() in (".jpg", ".jpeg") and stem.isdigit():
            out.append(str(int(stem)))
    return natsorted(set(out))


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One (take, source camera, target camera, object) video."""

    take: str
    src_cam: str
    tgt_cam: str
    obj: str
    frames: Tuple[str, ...]
    direction: str
    # frames whose *source* camera has no annotation key (the reference crashes on
    # these; we keep them in ``frames`` so temporal indices stay right, and skip them)
    src_missing: Tuple[str, ...] = ()

    @property
    def pair(self) -> str:
        return f"{self.src_cam}__{self.tgt_cam}"

    @property
    def key(self) -> str:
        """``<take>/<src>__<tgt>/<object>``: the per-frame prediction directory."""
        return f"{self.take}/{self.pair}/{self.obj}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DataReport:
    """Bad takes / videos found while listing or loading, plus empty videos."""

    problems: List[dict] = dataclasses.field(default_factory=list)
    empty_videos: List[str] = dataclasses.field(default_factory=list)
    missing_src_frames: int = 0

    def add(self, err: Exception, *, take=None, video: Optional[str] = None) -> None:
        entry = {"take": take, "video": video, "error": str(err), "kind": type(err).__name__}
        if isinstance(err, DataError):
            entry.update(path=err.path, camera=err.camera, frame=err.frame, problem=err.problem)
            entry["take"] = entry["take"] or err.take
        self.problems.append(entry)

    def __len__(self) -> int:
        return len(self.problems)

    def summary(self) -> str:
        lines = [f"{len(self.problems)} problem(s), {len(self.empty_videos)} video(s) without frames, "
                 f"{self.missing_src_frames} frame(s) without a source annotation"]
        for p in self.problems:
            lines.append(f"  - {p.get('video') or p.get('take')}: {p['error']}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


FRAME_LISTS = ("official", "reference")


def _annotated_frames(ann: dict, obj: str, cam: str) -> Optional[set]:
    """The frame names ``annotation["annotated_frames"][obj][cam]`` lists, or None."""
    table = ann.get("annotated_frames")
    listed = table.get(obj) if isinstance(table, dict) else None
    listed = listed.get(cam) if isinstance(listed, dict) else None
    return {str(f) for f in listed} if isinstance(listed, (list, tuple)) else None


def list_take_videos(
    split_dir, take: str, direction: str, annotation: Optional[dict] = None, report: Optional[DataReport] = None,
    frames: str = "reference",
) -> List[VideoRecord]:
    """Videos of one take for ``direction`` (see module docstring). Raises DataError.

    ``frames``: ``"reference"`` (LM-EEC: source JPEGs ∩ the target's annotation keys) or
    ``"official"`` (the EvalAI samples, without reading the target masks: source JPEGs ∩
    the target's ``annotated_frames`` where the annotation lists them, else ∩ the source
    GT keys); in both, frames without a source GT key stay in the list and are skipped.
    """
    check_direction(direction)
    if frames not in FRAME_LISTS:
        raise ValueError(f"frames must be one of {FRAME_LISTS}, got {frames!r}")
    take_dir = os.path.join(split_dir, take)
    if not os.path.isdir(take_dir):
        raise DataError("take directory missing", path=take_dir, take=take)
    ann = annotation if annotation is not None else load_annotation(take_dir, take)
    masks = ann["masks"]
    cams = take_cameras(take_dir)
    egos = [c for c in cams if is_ego_camera(c)]
    if not egos:
        return []
    ego = egos[-1]
    exos = [c for c in cams if c != ego]
    jpegs: Dict[str, List[str]] = {}
    out = []
    for obj, annotated in masks.items():
        for cam in exos:
            if cam not in annotated:
                continue
            if direction == "ego2exo":
                src, tgt = ego, cam
            else:
                src, tgt = cam, ego
                if annotated.get(ego) is None:
                    continue
            if src not in jpegs:
                jpegs[src] = camera_frames(os.path.join(take_dir, src))
            src_keys = annotated.get(src) or {}
            if frames == "reference":
                keep = set(annotated[tgt].keys())
            else:
                keep = _annotated_frames(ann, obj, tgt)
                keep = set(src_keys) if keep is None else keep
            names = tuple(f for f in jpegs[src] if f in keep)
            missing = tuple(f for f in names if f not in src_keys)
            rec = VideoRecord(take, src, tgt, obj, names, direction, missing)
            if not names:
                if report is not None:
                    report.empty_videos.append(rec.key)
                continue
            if report is not None:
                report.missing_src_frames += len(missing)
            out.append(rec)
    return out


def list_split_takes(split_dir, takes: Optional[Sequence[str]] = None, *, annotated_only: bool = False,
                     key: Optional[Callable[[str], Any]] = natural_key) -> List[str]:
    """Takes of a split: the given list, else every sub-directory of ``split_dir``
    (``annotated_only``: those holding an ``annotation.json``), sorted by ``key`` (natural
    order; ``None``: plain string order)."""
    if takes is not None:
        return list(takes)
    names = (d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if annotated_only:
        names = (d for d in names if os.path.isfile(os.path.join(split_dir, d, ANNOTATION_FILE)))
    return sorted(names, key=key)


def resolve_split(split_dir, split: Optional[str] = None) -> Tuple[str, Optional[List[str]]]:
    """(directory holding the takes, the takes a split file lists, or None) for ``split_dir``
    and an optional ``split`` name.

    ``split`` may name a sub-directory (``<root>/<split>/<take>``, LM-EEC's layout) or a
    key of ``split_checking.json`` / ``split.json`` in ``split_dir`` (the official layout:
    all takes in one directory, the split file lists them). Without ``split`` (or for a
    sub-directory) the takes are left to :func:`list_split_takes`.
    """
    split_dir = os.fspath(split_dir)
    if not os.path.isdir(split_dir):
        raise DataError("not a directory", path=split_dir)
    if split is None:
        return split_dir, None
    if os.path.isdir(os.path.join(split_dir, split)):
        return os.path.join(split_dir, split), None
    for name in SPLIT_FILES:
        sp = os.path.join(split_dir, name)
        if os.path.isfile(sp):
            table = read_json(sp, what="split")
            if isinstance(table, dict) and split in table:
                return split_dir, [str(t) for t in table[split]]
    raise DataError(f"split {split!r}: neither {os.path.join(split_dir, split)} nor a "
                    f"{'/'.join(SPLIT_FILES)} in {split_dir} listing it")


def read_take_list(path) -> List[str]:
    """A take list: a text file (one per line) or a split json ({split: [takes]} -> all)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        data = read_json(path)
        if isinstance(data, dict):
            return [t for v in data.values() for t in v]
        return list(data)
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def list_videos(
    split_dir, direction: str, takes: Optional[Sequence[str]] = None, report: Optional[DataReport] = None,
    frames: str = "reference",
) -> List[VideoRecord]:
    """All videos of a split (``frames``: see :func:`list_take_videos`); a take that cannot
    be listed is skipped and reported (into ``report`` if given, else the first error is raised)."""
    out = []
    for take in list_split_takes(split_dir, takes):
        try:
            out.extend(list_take_videos(split_dir, take, direction, report=report, frames=frames))
        except DataError as e:
            if report is None:
                raise
            report.add(e, take=take)
    return out


def list_train_videos(
    split_dir, num_frames: int = 8, takes: Optional[Sequence[str]] = None, report: Optional[DataReport] = None
) -> List[VideoRecord]:
    """Training videos as LM-EEC's ``EgoExoRawDataset`` lists them (ego->exo only).

    Per object: ego camera = first annotated camera containing ``aria``; for every other
    annotated camera that has a directory, frames = natural sort of (aria annotation
    keys ∩ exo annotation keys); videos with fewer than ``num_frames`` frames are dropped.
    (The reference lists takes with ``sorted(os.listdir)``; we use natural order.)
    """
    out = []
    for take in list_split_takes(split_dir, takes):
        take_dir = os.path.join(split_dir, take)
        try:
            if not os.path.isfile(os.path.join(take_dir, ANNOTATION_FILE)):
                continue  # the reference skips takes without annotation
            masks = load_annotation(take_dir, take)["masks"]
        except DataError as e:
            if report is None:
                raise
            report.add(e, take=take)
            continue
        for obj, cams in masks.items():
            egos = [c for c in cams if is_ego_camera(c)]
            if not egos:
                continue
            ego = egos[0]
            ego_keys = set(cams[ego].keys())
            for cam, data in cams.items():
                if cam == ego or not os.path.isdir(os.path.join(take_dir, cam)):
                    continue
                frames = tuple(natsorted(ego_keys & set(data.keys())))
                if len(frames) < num_frames:
                    continue
                out.append(VideoRecord(take, ego, cam, obj, frames, "ego2exo"))
    return out


# ----------------------------------------------------------------------------- masks


def decode_mask(rle: Any, *, path=None, expect_hw: Optional[Tuple[int, int]] = None, **ctx) -> np.ndarray:
    """Decode one COCO RLE to uint8 HxW, checking it; DataError on a bad mask.

    Checks: the RLE is valid (:func:`lmeec_jax.data.rle.check_rle`: ``size`` two ints, the
    runs add up to H*W) with a non-empty size; if ``expect_hw`` (the frame's size) is given,
    the mask has the same aspect ratio (within 1%; masks are stored at the camera's full
    resolution, 2x / 4x the processed JPEGs). The error carries ``path`` and ``ctx``.
    """
    try:
        (h, w), runs = check_rle(rle)
        if h == 0 or w == 0:
            raise DataError(f"mask has an invalid size {rle['size']!r}")
        if expect_hw is not None:
            eh, ew = expect_hw
            if abs(h * ew - w * eh) > 0.01 * w * eh:
                raise DataError(f"mask size {h}x{w} does not fit the {eh}x{ew} frame (aspect ratio)")
        return decode_checked(rle, (h, w), runs)
    except DataError as e:
        raise e.with_context(path=path, **ctx) from None


class ViewMasks:
    """The GT masks of one object in one camera of a take, decoded frame by frame.

    ``get(frame, expect_hw)``: the frame's uint8 0/1 mask at the annotation's resolution
    (:func:`decode_mask`; ``expect_hw`` is the frame's size), or None where the camera has
    no annotation key for ``frame``. Errors are DataErrors naming ``path`` (the annotation
    file), take, camera, frame and object; with ``same_size`` a mask whose size differs
    from the camera's first decoded one is an error too. ``hw``: that first size (None
    before any mask is decoded).
    """

    def __init__(self, annotation: dict, take: str, obj: str, cam: str, *, path=None, same_size: bool = True):
        self.frames = (annotation["masks"].get(obj) or {}).get(cam) or {}
        self.take, self.obj, self.cam = take, obj, cam
        self.path = path
        self.same_size = same_size
        self.hw: Optional[Tuple[int, ...]] = None

    def __contains__(self, frame: str) -> bool:
        return frame in self.frames

    def get(self, frame: str, expect_hw: Optional[Tuple[int, int]] = None) -> Optional[np.ndarray]:
        if frame not in self.frames:
            return None
        ctx = dict(take=self.take, camera=self.cam, frame=frame, obj=self.obj)
        m = decode_mask(self.frames[frame], path=self.path, expect_hw=expect_hw, **ctx)
        if self.hw is None:
            self.hw = m.shape
        elif self.same_size and m.shape != self.hw:
            raise DataError(f"mask size {m.shape} differs from the camera's {self.hw}", path=self.path, **ctx)
        return m


# ----------------------------------------------------------------------------- loading


def _frame_image(path, image_size, **ctx):
    im = open_rgb(path, **ctx)
    hw = (im.height, im.width)
    return normalize_uint8(np.asarray(im.resize((image_size, image_size)))), hw


def load_video(
    split_dir,
    rec: VideoRecord,
    image_size: int = IMAGE_SIZE,
    annotation: Optional[dict] = None,
    target_size: Optional[Tuple[int, int]] = (EVAL_SIZE, EVAL_SIZE),
    load_target_images: bool = True,
) -> dict:
    """Frames and masks of a video.

    Returns a dict with
      ``src_images``, ``tgt_images``: float32 (T, S, S, 3), ImageNet-normalised;
      ``src_masks``: bool (T, S, S), GT source mask resized as LM-EEC does (antialiased
        bilinear to SxS, ``>= 0.5``); zeros where the source has no annotation key;
      ``src_present``: bool (T,), the source camera has an annotation key;
      ``src_valid``: bool (T,), present and non-empty at full resolution (LM-EEC runs
        only these frames; the others are skipped but still count as time steps);
      ``tgt_masks``: bool (T, *target_size) target GT resized nearest (PIL), or a list of
        full-resolution uint8 masks (None where absent) if ``target_size`` is None;
      ``tgt_present``: bool (T,), the target camera has an annotation key;
      ``record``, ``frames``, ``src_hw``/``tgt_hw`` (JPEG sizes), ``src_mask_hw``/``tgt_mask_hw``.
    Raises DataError naming the file on any bad input.
    """
    take_dir = os.path.join(split_dir, rec.take)
    ann_path = os.path.join(take_dir, ANNOTATION_FILE)
    ann = annotation if annotation is not None else load_annotation(take_dir, rec.take)
    if ann["masks"].get(rec.obj) is None:
        raise DataError("object not in annotation", path=ann_path, take=rec.take, obj=rec.obj)
    src_view = ViewMasks(ann, rec.take, rec.obj, rec.src_cam, path=ann_path)
    tgt_view = ViewMasks(ann, rec.take, rec.obj, rec.tgt_cam, path=ann_path)
    T, S = len(rec.frames), image_size
    src_images = np.empty((T, S, S, 3), np.float32)
    tgt_images = np.empty((T, S, S, 3), np.float32) if load_target_images else None
    src_masks = np.zeros((T, S, S), bool)
    src_present = np.zeros(T, bool)
    src_valid = np.zeros(T, bool)
    tgt_present = np.zeros(T, bool)
    tgt_masks: Any = np.zeros((T,) + tuple(target_size), bool) if target_size is not None else [None] * T
    src_hw = tgt_hw = None

    for t, f in enumerate(rec.frames):
        sctx = dict(take=rec.take, camera=rec.src_cam, frame=f)
        tctx = dict(take=rec.take, camera=rec.tgt_cam, frame=f)
        src_images[t], hw = _frame_image(os.path.join(take_dir, rec.src_cam, f + ".jpg"), S, **sctx)
        src_hw = src_hw or hw
        if load_target_images:
            tgt_images[t], thw = _frame_image(os.path.join(take_dir, rec.tgt_cam, f + ".jpg"), S, **tctx)
            tgt_hw = tgt_hw or thw
        m = src_view.get(f, expect_hw=hw)
        if m is not None:
            src_present[t] = True
            if m.any():
                src_valid[t] = True
                src_masks[t] = resize_mask_source(m, S)
        m = tgt_view.get(f, expect_hw=tgt_hw)
        if m is not None:
            tgt_present[t] = True
            if target_size is not None:
                tgt_masks[t] = resize_mask_nearest(m, target_size)
            else:
                tgt_masks[t] = m
    return dict(
        record=rec,
        frames=list(rec.frames),
        src_images=src_images,
        tgt_images=tgt_images,
        src_masks=src_masks,
        src_present=src_present,
        src_valid=src_valid,
        tgt_masks=tgt_masks,
        tgt_present=tgt_present,
        src_hw=src_hw,
        tgt_hw=tgt_hw,
        src_mask_hw=src_view.hw,
        tgt_mask_hw=tgt_view.hw,
    )


def load_clip_raw(
    split_dir, rec: VideoRecord, indices: Optional[Sequence[int]] = None, annotation: Optional[dict] = None
) -> dict:
    """Frames ``rec.frames[i] for i in indices`` at their stored resolution, for training
    augmentation: ``src_frames``/``tgt_frames`` uint8 (T, H, W, 3) (JPEG size) and
    ``src_masks``/``tgt_masks`` uint8 (T, h, w) 0/1 at the annotation's resolution (raw
    camera size in EgoExo4D, 2x / 4x the JPEG; zeros where the camera has no key), plus
    ``src_present``/``tgt_present`` (T,) bool and ``frames``. DataError on bad input."""
    take_dir = os.path.join(split_dir, rec.take)
    ann_path = os.path.join(take_dir, ANNOTATION_FILE)
    ann = annotation if annotation is not None else load_annotation(take_dir, rec.take)
    idx = list(range(len(rec.frames))) if indices is None else list(indices)
    frames = [rec.frames[i] for i in idx]
    out: Dict[str, Any] = {"frames": frames, "record": rec}
    for role, cam in (("src", rec.src_cam), ("tgt", rec.tgt_cam)):
        view = ViewMasks(ann, rec.take, rec.obj, cam, path=ann_path)
        imgs, masks = [], []
        for f in frames:
            img = np.asarray(open_rgb(os.path.join(take_dir, cam, f + ".jpg"), take=rec.take, camera=cam, frame=f))
            imgs.append(img)
            masks.append(view.get(f, expect_hw=img.shape[:2]))
        present = [m is not None for m in masks]
        if len({im.shape for im in imgs}) > 1:
            raise DataError("frames of one camera differ in size", path=os.path.join(take_dir, cam),
                            take=rec.take, camera=cam)
        hw = view.hw or (imgs[0].shape[:2] if imgs else (0, 0))
        out[f"{role}_frames"] = np.stack(imgs) if imgs else np.zeros((0, 0, 0, 3), np.uint8)
        out[f"{role}_masks"] = np.stack([m if m is not None else np.zeros(hw, np.uint8) for m in masks]) \
            if masks else np.zeros((0,) + tuple(hw), np.uint8)
        out[f"{role}_present"] = np.array(present, bool)
    return out


class EgoExoVideoSource:
    """``grain.RandomAccessDataSource`` over the videos of a processed split.

    ``source[i]`` is a :class:`VideoRecord` (``load=False``) or the :func:`load_video`
    dict (``load=True``). Takes that cannot be listed are skipped and kept in
    ``self.report``. Picklable (for grain worker processes).
    """

    def __init__(
        self,
        split_dir,
        direction: str = "ego2exo",
        takes: Optional[Sequence[str]] = None,
        load: bool = False,
        image_size: int = IMAGE_SIZE,
        records: Optional[Sequence[VideoRecord]] = None,
        **load_kwargs,
    ):
        self.split_dir = os.fspath(split_dir)
        self.direction = check_direction(direction)
        self.load = load
        self.image_size = image_size
        self.load_kwargs = load_kwargs
        self.report = DataReport()
        self.records = list(records) if records is not None else list_videos(
            self.split_dir, direction, takes, report=self.report
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        if not self.load:
            return rec
        return load_video(self.split_dir, rec, self.image_size, **self.load_kwargs)

    def __repr__(self) -> str:
        return (f"EgoExoVideoSource(split_dir={self.split_dir!r}, direction={self.direction!r}, "
                f"videos={len(self.records)}, load={self.load})")


def iter_videos(
    split_dir,
    direction: str,
    takes: Optional[Sequence[str]] = None,
    report: Optional[DataReport] = None,
    image_size: int = IMAGE_SIZE,
    records: Optional[Sequence[VideoRecord]] = None,
    **load_kwargs,
) -> Iterator[dict]:
    """Loaded videos of a split; a bad take or video is skipped and recorded in ``report``."""
    report = report if report is not None else DataReport()
    if records is None:
        records = list_videos(split_dir, direction, takes, report=report)
    ann_cache: Dict[str, Any] = {}
    for rec in records:
        try:
            if rec.take not in ann_cache:
                ann_cache.clear()  # records come grouped by take
                ann_cache[rec.take] = load_annotation(os.path.join(split_dir, rec.take), rec.take)
            yield load_video(split_dir, rec, image_size, annotation=ann_cache[rec.take], **load_kwargs)
        except DataError as e:
            report.add(e, take=rec.take, video=rec.key)


# ----------------------------------------------------------------------------- raw relations


def load_relations(path) -> dict:
    """``relations_<split>.json`` -> its ``annotations`` dict (take uid -> take entry)."""
    data = read_json(path, what="relations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), dict):
        raise DataError('relations file has no "annotations" object', path=path)
    return data["annotations"]


def decode_relation_mask(entry: dict, *, path=None, **ctx) -> dict:
    """``{"width", "height", "encodedMask"}`` -> COCO RLE ``{"size": [H, W], "counts": str}``
    (what ``process_data.py::decode_mask`` writes; the runs are not checked here, the
    readers check them). DataError (with ``path`` and ``ctx``) if it cannot be decoded."""
    try:
        return relation_entry_to_rle(entry, check=False)
    except DataError as e:
        raise e.with_context(path=path, **ctx) from None


encode_relation_mask = rle_to_relation_entry  # inverse of decode_relation_mask (for building test inputs)


def relation_take_masks(take_entry: dict, *, path=None, take=None) -> dict:
    """``object_masks`` of a raw take -> processed ``masks`` (obj -> cam -> frame -> RLE)."""
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    try:
        objs = take_entry["object_masks"]
    except (KeyError, TypeError) as e:
        raise DataError("take entry has no object_masks", path=path, take=take) from e
    for obj, cams in objs.items():
        out[obj] = {}
        for cam, data in cams.items():
            out[obj][cam] = {}
            for frame, entry in (data.get("annotation") or {}).items():
                out[obj][cam][frame] = decode_relation_mask(entry, path=path, take=take, camera=cam, frame=frame, obj=obj)
    return out


def relation_annotated_frames(take_entry: dict) -> dict:
    """obj -> cam -> list of annotated frame indices (ints) of a raw take."""
    return {
        obj: {cam: list(data.get("annotated_frames", [])) for cam, data in cams.items()}
        for obj, cams in take_entry.get("object_masks", {}).items()
    }
