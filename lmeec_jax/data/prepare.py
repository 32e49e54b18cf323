"""Raw EgoExo4D takes -> the processed layout, as the official
``correspondence/SegSwap/data/process_data.py`` does it.

Per take of the split (``split.json``: ``{"train": [...], "val": [...], "test": [...]}``):

* cameras = union of the cameras annotated for any object in
  ``relations_<split>.json``; the one containing ``aria`` is the ego camera (exactly
  one is required), the others are exo cameras;
* masks: every ``encodedMask`` is LZ-String-decompressed into the COCO RLE counts
  and written as ``{"size": [height, width], "counts": str}`` (full resolution);
* frames: ``<takepath>/<take_name>/frame_aligned_videos/<cam>.mp4``; ``subsample_idx =
  range(0, len(ego video), 30)``; for the ego camera and every exo camera the frames
  at those indices are downscaled by 2 (aria) or 4 (exo) with OpenCV's
  ``INTER_LINEAR`` arithmetic (``(W // s, H // s)``) and written as ``<idx>.jpg``
  (JPEG quality 95, OpenCV's default); frames less than 1408 px high are not written
  at all (the official loop ``break``s on them);
* ``annotation.json = {"masks", "subsample_idx"}`` is written last.

Differences from the official script (on purpose):
* a take counts as done when its ``annotation.json`` exists (the official script
  skips any existing take directory, so an interrupted take stays broken);
* problems (missing ego video, no / several aria cameras, a corrupt mask, an
  unreadable exo video) are collected into a report instead of crashing
  (``breakpoint()`` / exceptions) or printing;
* besides ``<cam>.mp4``, a directory ``<cam>/`` of frame images (natural order, one
  image per video frame) is accepted as the video of a camera;
* videos are read with PyAV (imported lazily; ``pip install av``) instead of decord.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lmeec_jax.evaluation.protocol import is_ego_camera
from lmeec_jax.io import read_json, write_json_atomic

from .egoexo import ANNOTATION_FILE, DataError, load_relations, natsorted, relation_take_masks

FRAME_STEP = 30
MIN_HEIGHT = 1408
EGO_SCALE = 2
EXO_SCALE = 4
JPEG_QUALITY = 95  # cv2.imwrite default


# ----------------------------------------------------------------------------- OpenCV-style resize

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


def _linear_table(src: int, dst: int):
    """OpenCV ``INTER_LINEAR`` source offsets and fixed-point weights along one axis."""
    scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x, inv_scale_x = dst / src
    d = np.arange(dst, dtype=np.float64)
    fx = ((d + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    fx = (fx - sx).astype(np.float32)
    lo = sx < 0
    fx[lo], sx[lo] = 0, 0
    hi = sx >= src - 1
    fx[hi], sx[hi] = 0, src - 1
    a1 = np.rint(fx * _COEF_SCALE).astype(np.int32)  # saturate_cast<short>: round half to even
    a0 = np.rint((np.float32(1) - fx) * _COEF_SCALE).astype(np.int32)
    sx1 = np.minimum(sx + 1, src - 1)
    return sx, sx1, a0, a1


def cv2_resize_linear(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, size)`` (``INTER_LINEAR``) for uint8 HxW[xC] images, ``size=(W, H)``.

    OpenCV's fixed-point arithmetic (11-bit weights; vertical pass as its SIMD kernel).
    An exact 2x reduction is ``INTER_AREA`` in OpenCV (rounded 2x2 mean), which gives
    the same numbers. Checked against opencv-python-headless 4.10: identical for the
    official 2x / 4x reductions and for arbitrary downscales; upscaling may differ by
    1 on a few pixels (OpenCV's scalar tail loop).
    """
    W, H = size
    a = img if img.ndim == 3 else img[..., None]
    h, w = a.shape[:2]
    x0, x1, ax0, ax1 = _linear_table(w, W)
    y0, y1, by0, by1 = _linear_table(h, H)
    ax0, ax1 = ax0[None, :, None], ax1[None, :, None]

    def hpass(rows):  # (H, w, C) uint8 -> (H, W, C) int32, scaled by 2^11
        r = rows.astype(np.int32)
        return r[:, x0] * ax0 + r[:, x1] * ax1

    top, bot = hpass(a[y0]), hpass(a[y1])
    # vertical pass as OpenCV's SIMD kernel (VResizeLinearVec_32s8u) computes it:
    # mulhi((S >> 4), beta) per row, then (sum + 2) >> 2
    t0 = ((top >> 4) * by0[:, None, None]) >> 16
    t1 = ((bot >> 4) * by1[:, None, None]) >> 16
    out = np.clip((t0 + t1 + 2) >> 2, 0, 255).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]


# ----------------------------------------------------------------------------- video reading


def video_path(takepath: str, take_name: str, cam: str) -> str:
    return os.path.join(takepath, take_name, "frame_aligned_videos", f"{cam}.mp4")


def _frames_dir(takepath: str, take_name: str, cam: str) -> str:
    return os.path.join(takepath, take_name, "frame_aligned_videos", cam)


def camera_video_exists(takepath: str, take_name: str, cam: str) -> bool:
    return os.path.isfile(video_path(takepath, take_name, cam)) or os.path.isdir(_frames_dir(takepath, take_name, cam))


def iter_video_frames(takepath: str, take_name: str, cam: str) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a camera, in order: the mp4 (PyAV) or a directory of images."""
    mp4 = video_path(takepath, take_name, cam)
    if os.path.isfile(mp4):
        try:
            import av  # optional dependency (extra "video")
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError("reading mp4 needs PyAV (pip install av)", path=mp4, camera=cam) from e
        try:
            with av.open(mp4) as container:
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    yield frame.to_ndarray(format="rgb24")
        except DataError:
            raise
        except Exception as e:  # av.error.* (corrupt / unsupported file)
            raise DataError(f"cannot decode video ({type(e).__name__}: {e})", path=mp4, camera=cam) from e
        return
    d = _frames_dir(takepath, take_name, cam)
    if os.path.isdir(d):
        names = natsorted(f for f in os.listdir(d) if os.path.splitext(f)[1].lower() in (".jpg", ".jpeg", ".png"))
        for n in names:
            p = os.path.join(d, n)
            try:
                with Image.open(p) as im:
                    yield np.asarray(im.convert("RGB"))
            except OSError as e:
                raise DataError(f"corrupt frame image ({e})", path=p, camera=cam) from e
        return
    raise DataError("video missing", path=mp4, camera=cam)


# ----------------------------------------------------------------------------- per take


@dataclasses.dataclass
class PrepareReport:
    done: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)  # already processed
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)  # take -> why
    warnings: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    def warn(self, take: str, msg: str) -> None:
        self.warnings.setdefault(take, []).append(msg)

    def summary(self) -> str:
        lines = [f"processed {len(self.done)}, already done {len(self.skipped)}, failed {len(self.failed)}"]
        for t, why in self.failed.items():
            lines.append(f"  FAILED {t}: {why}")
        for t, ws in self.warnings.items():
            for w in ws:
                lines.append(f"  warning {t}: {w}")
        return "\n".join(lines)


def _save_frames(frames: Iterator[np.ndarray], out_dir: str, scale: int, min_height: int, quality: int,
                 wanted: Optional[Sequence[int]] = None) -> Tuple[int, List[int], Optional[str]]:
    """Write every 30th frame (or the ``wanted`` indices) of a stream, downscaled.

    Returns (number of frames in the stream, indices written, note). Reading stops after
    the last wanted index; with ``wanted=None`` the whole stream is read (its length
    defines ``subsample_idx``). Frames lower than ``min_height`` are never written
    (the official loop breaks on the first one).
    """
    os.makedirs(out_dir, exist_ok=True)
    wanted_set = set(wanted) if wanted is not None else None
    last = max(wanted) if wanted else (-1 if wanted is not None else None)
    n, written, small = 0, [], None
    for idx, img in enumerate(frames):
        n = idx + 1
        if last is not None and idx > last:
            break
        take_it = (idx % FRAME_STEP == 0) if wanted_set is None else (idx in wanted_set)
        if not take_it or small is not None:
            continue
        H, W = img.shape[:2]
        if H < min_height:
            small = H
            continue
        Image.fromarray(cv2_resize_linear(img, (W // scale, H // scale))).save(
            os.path.join(out_dir, f"{idx}.jpg"), quality=quality)
        written.append(idx)
    note = None
    if small is not None:
        note = f"frames are {small} px high (< {min_height}): not all written, as the official script does"
    elif wanted is not None and len(written) < len(wanted):
        note = f"video ends early: {len(written)} of {len(wanted)} subsampled frames written"
    return n, written, note


def prepare_take(
    take_id: str,
    take_entry: dict,
    takepath: str,
    outputpath: str,
    report: PrepareReport,
    *,
    relations_path: Optional[str] = None,
    min_height: int = MIN_HEIGHT,
    ego_scale: int = EGO_SCALE,
    exo_scale: int = EXO_SCALE,
    jpeg_quality: int = JPEG_QUALITY,
) -> bool:
    """Process one take; returns True if written. Failures go into ``report``."""
    out = os.path.join(outputpath, take_id)
    try:
        take_name = take_entry["take_name"]
        objects = take_entry["object_masks"]
    except (KeyError, TypeError):
        report.failed[take_id] = "relations entry lacks take_name / object_masks"
        return False
    cams = set()
    for cam_dict in objects.values():
        cams.update(cam_dict.keys())
    egos = sorted(c for c in cams if is_ego_camera(c))
    exos = natsorted(c for c in cams if not is_ego_camera(c))
    if len(egos) != 1:
        report.failed[take_id] = f"expected exactly one aria camera, found {egos}"
        return False
    ego = egos[0]
    try:
        masks = relation_take_masks(take_entry, path=relations_path, take=take_id)
    except DataError as e:
        report.failed[take_id] = str(e)
        return False
    if not camera_video_exists(takepath, take_name, ego):
        report.failed[take_id] = f"{video_path(takepath, take_name, ego)} does not exist"
        return False
    os.makedirs(out, exist_ok=True)
    try:
        n, _, note = _save_frames(iter_video_frames(takepath, take_name, ego), os.path.join(out, ego),
                                  ego_scale, min_height, jpeg_quality)
    except DataError as e:
        report.failed[take_id] = str(e)
        return False
    subsample_idx = list(range(0, n, FRAME_STEP))
    if note:
        report.warn(take_id, f"{ego}: {note}")
    for cam in exos:
        if not camera_video_exists(takepath, take_name, cam):
            report.warn(take_id, f"{cam} not available")
            continue
        try:
            _, _, note = _save_frames(iter_video_frames(takepath, take_name, cam), os.path.join(out, cam),
                                      exo_scale, min_height, jpeg_quality, wanted=subsample_idx)
        except DataError as e:
            report.warn(take_id, f"{cam}: {e}")
            continue
        if note:
            report.warn(take_id, f"{cam}: {note}")
    write_json_atomic(os.path.join(out, ANNOTATION_FILE), {"masks": masks, "subsample_idx": subsample_idx})
    return True


def prepare_split(
    takepath: str,
    annotation_path: str,
    split_path: str,
    split: str,
    outputpath: str,
    *,
    takes: Optional[Sequence[str]] = None,
    progress: bool = True,
    **kw,
) -> PrepareReport:
    """Process every take of ``split`` (resumable: takes with an annotation.json are skipped)."""
    report = PrepareReport()
    data_split = read_json(split_path, what="split")
    if not isinstance(data_split, dict) or split not in data_split:
        raise DataError(f"split {split!r} not in split file", path=split_path)
    take_list = list(takes) if takes is not None else list(data_split[split])
    os.makedirs(outputpath, exist_ok=True)
    annos = load_relations(annotation_path)
    it = take_list
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(take_list, desc=f"prepare {split}", unit="take")
        it = bar
    for take_id in it:
        if os.path.isfile(os.path.join(outputpath, take_id, ANNOTATION_FILE)):
            report.skipped.append(take_id)
            continue
        if take_id not in annos:
            report.failed[take_id] = "take not in the relations file"
            continue
        if prepare_take(take_id, annos[take_id], takepath, outputpath, report, relations_path=annotation_path, **kw):
            report.done.append(take_id)
        if bar is not None:
            bar.set_postfix(failed=len(report.failed))
    return report
