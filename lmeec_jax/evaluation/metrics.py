"""Ego-exo correspondence metrics and the two scoring protocols (numpy only).

Per-frame metrics (EgoExo4D ``correspondence/evaluation``, adapted from DAVIS):

* :func:`iou` -- ``|P & G| / (|P | G| + 1e-7)``, 1 when the union is empty;
* :func:`boundary_f` -- DAVIS boundary F ("contour accuracy"): :func:`seg2bmap`
  boundaries, each dilated by a disk of radius ``ceil(0.008 * hypot(H, W))``
  (``cv2.dilate`` with ``skimage.morphology.disk``; reproduced here exactly);
* :func:`location_error` -- distance of bounding-box centres (floor division) of the
  two masks zero-padded by H on every side, an empty mask taking the padded array's
  centre with x and y swapped, divided by ``sqrt(480**2 + 480**2)`` whatever the shape;
* :func:`balanced_accuracy` -- sklearn's ``balanced_accuracy_score`` of visibility.

Protocols (:func:`score`):

``official``
    ``evaluate_egoexo.py`` / ``evaluate_exoego.py``. For every take of the GT file,
    object with exactly one aria camera, and exo camera of the object: samples are
    the *source* camera's GT frame keys whose ``int`` is in the *target* camera's
    ``annotated_frames``; the GT "exists" when the target has that frame key (even
    with an empty mask); the GT mask is resized long side -> 480 (``int``
    truncation, OpenCV ``INTER_NEAREST``) and compared with the predicted mask as
    is (no resize: 270x480 for exo, 480x480 for aria). IoU/CA/LE are pooled over
    samples whose GT exists, visibility = ``confidence > 0.5`` over all samples.
    Predictions are validated as ``validate_predictions`` does (every GT take and
    object, one entry per camera pair, every source GT frame, ``pred_mask`` and
    ``confidence``) plus the checks whose failure crashes the official scorer
    (undecodable RLE, mask shape).
``lmeec``
    LM-EEC's ``evaluation/merge_pred.py`` + ``merge_results.py`` +
    ``compute_metrics.py``: GT masks squashed to 480x480; the samples are the
    *predicted* frames (frames, pairs, objects, takes without predictions are not
    scored; we report them as warnings); GT exists only when the target has the
    frame key *and* the mask is not empty; confidence = ``area > 0.001 * H * W``
    of the predicted mask (merge_results), ``> 0.5``; a merged JSON's own
    ``confidence`` is used as is (compute_metrics reads it).
    Not reproduced: merge_pred.py keeps only objects annotated in the *source camera of
    the first pair folder in os.listdir order* (for exo->ego that drops objects lacking
    that particular exo camera, depending on the file system); we keep every object
    annotated in the pair's own cameras. Per-frame files are restricted to the source
    camera's GT frame keys (merge_pred's ``f_ids``) only when the GT is the official
    file; LM-EEC's own GT file does not carry the source frames. LM-EEC's GT file
    (``gt_final_results_*.json``) is not in its repository: from the official GT we
    squash the target masks to 480x480 with OpenCV INTER_NEAREST (our choice).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from lmeec_jax.data.errors import DataError
from lmeec_jax.data.rle import check_rle, decode_rle
from lmeec_jax.evaluation.protocol import DIRECTIONS, EVAL_SIZE, TASK_KEYS, check_direction, is_ego_camera
from lmeec_jax.io import decode_name, encode_name, read_json

__all__ = [
    "EVAL_SIZE",
    "CONF_THRESH",
    "LMEEC_AREA_FRACTION",
    "DIRECTIONS",
    "TASK_KEYS",
    "official_eval_shape",
    "resize_nearest_cv2",
    "reshape_nopad",
    "iou",
    "seg2bmap",
    "disk",
    "dilate_disk",
    "boundary_radius",
    "boundary_f",
    "box_centre_padded",
    "location_error",
    "balanced_accuracy",
    "lmeec_confidence",
    "Issue",
    "Pool",
    "ScoreReport",
    "score",
    "score_official",
    "score_lmeec",
    "load_lmeec_predictions",
    "format_table",
]

CONF_THRESH = 0.5
LMEEC_AREA_FRACTION = 0.001
BOUND_TH = 0.008
IOU_EPS = 1e-7
LE_NORM = math.sqrt(EVAL_SIZE ** 2 + EVAL_SIZE ** 2)


# ============================================================================ resizing


def official_eval_shape(h: int, w: int, max_dim: int = EVAL_SIZE) -> Tuple[int, int]:
    """``utils.reshape_img_nopad``'s output shape: long side -> max_dim, ``int()`` truncation.

    The ratio is computed in float64 exactly as the reference (``1. / L * max_dim``),
    e.g. 2160x3840 -> 270x480, 1408x1408 -> 480x480.
    """
    ratio = 1.0 / h * max_dim if h > w else 1.0 / w * max_dim
    return int(h * ratio), int(w * ratio)


def _nn_index(src: int, dst: int) -> np.ndarray:
    # OpenCV resizeNN: fx = (double)dst/src; ifx = 1./fx; sx = min(cvFloor(x*ifx), src-1).
    # For the dataset's shapes this equals the integer (x*src)//dst; not in general.
    ifx = 1.0 / (dst / src)
    idx = np.floor(np.arange(dst, dtype=np.float64) * ifx).astype(np.int64)
    return np.minimum(idx, src - 1)


def resize_nearest_cv2(mask: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(mask, (W', H'), interpolation=cv2.INTER_NEAREST)`` for a 2-D array."""
    m = np.asarray(mask)
    h, w = m.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (oh, ow) == (h, w):
        return m.copy()
    if oh <= 0 or ow <= 0:
        raise ValueError(f"cannot resize to {oh}x{ow}")
    return m[_nn_index(h, oh)[:, None], _nn_index(w, ow)[None, :]]


def reshape_nopad(mask: np.ndarray, max_dim: int = EVAL_SIZE) -> np.ndarray:
    """The official GT resize (``utils.reshape_img_nopad``)."""
    return resize_nearest_cv2(mask, official_eval_shape(*mask.shape[:2], max_dim=max_dim))


# ============================================================================ per-frame metrics


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Jaccard index as ``metrics.db_eval_iou`` (one frame, no void pixels)."""
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} shapes differ")
    g = np.asarray(gt).astype(bool)
    p = np.asarray(pred).astype(bool)
    inter = int(np.count_nonzero(g & p))
    union = int(np.count_nonzero(g | p))
    if union == 0:
        return 1.0
    return inter / (union + IOU_EPS)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """DAVIS one-pixel boundary map: a pixel that differs from its right, lower or
    lower-right neighbour (outside the image counts as background); on the last row
    only the right neighbour counts, on the last column only the lower one, and the
    bottom-right pixel is never a boundary."""
    s = np.asarray(seg).astype(bool)
    h, w = s.shape
    right = np.zeros_like(s)
    down = np.zeros_like(s)
    diag = np.zeros_like(s)
    right[:, :-1] = s[:, 1:]
    down[:-1, :] = s[1:, :]
    diag[:-1, :-1] = s[1:, 1:]
    b = (s ^ right) | (s ^ down) | (s ^ diag)
    b[-1, :] = s[-1, :] ^ right[-1, :]
    b[:, -1] = s[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """``skimage.morphology.disk(radius)``: offsets with ``dx**2 + dy**2 <= r**2``."""
    r = int(radius)
    d = np.arange(-r, r + 1)
    return ((d[:, None] ** 2 + d[None, :] ** 2) <= r * r).astype(np.uint8)


def dilate_disk(b: np.ndarray, radius: int) -> np.ndarray:
    """Binary ``cv2.dilate(b, disk(radius))`` (pixels outside the image are ignored).

    The disk is split in rows: row ``dy`` spans ``|dx| <= isqrt(r^2 - dy^2)``, so the
    dilation is an OR over dy of row-shifted horizontal run dilations.
    """
    x = np.asarray(b).astype(bool)
    h, w = x.shape
    r = int(radius)
    if r <= 0 or h == 0 or w == 0:
        return x.copy()
    csum = np.zeros((h, w + 1), np.int32)
    np.cumsum(x, axis=1, out=csum[:, 1:])
    cols = np.arange(w)
    runs: Dict[int, np.ndarray] = {}
    out = np.zeros_like(x)
    for dy in range(-r, r + 1):
        k = math.isqrt(r * r - dy * dy)
        if k not in runs:
            lo = np.clip(cols - k, 0, w)
            hi = np.clip(cols + k + 1, 0, w)
            runs[k] = (csum[:, hi] - csum[:, lo]) > 0
        hk = runs[k]
        if abs(dy) >= h:
            continue
        if dy >= 0:
            out[: h - dy] |= hk[dy:]
        else:
            out[-dy:] |= hk[: h + dy]
    return out


def boundary_radius(shape: Tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Disk radius of ``f_measure``: ``ceil(bound_th * ||shape||)`` (5 for 270x480, 6 for 480^2)."""
    if bound_th >= 1:
        if float(bound_th) != int(bound_th):
            raise ValueError("a pixel bound_th must be an integer")
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm(shape)))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """DAVIS boundary F-measure (``metrics.f_measure``), the "contour accuracy"."""
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} shapes differ")
    r = boundary_radius(pred.shape, bound_th)
    fg_b = seg2bmap(pred)
    gt_b = seg2bmap(gt)
    n_fg = int(np.count_nonzero(fg_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        fg_match = int(np.count_nonzero(fg_b & dilate_disk(gt_b, r)))
        gt_match = int(np.count_nonzero(gt_b & dilate_disk(fg_b, r)))
        precision = fg_match / float(n_fg)
        recall = gt_match / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def box_centre_padded(mask: np.ndarray, pad: int) -> Tuple[int, int]:
    """(x, y) of ``metrics.compute_size_boundry_centroid`` on the mask zero-padded by
    ``pad`` on every side: floor-division box centre; for an empty mask the padded
    array's (H'//2, W'//2) returned as (x, y), i.e. swapped, as the reference does."""
    m = np.asarray(mask).astype(bool)
    h, w = m.shape
    if not m.any():
        return (h + 2 * pad) // 2, (w + 2 * pad) // 2
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    cx = (int(cols[0]) + int(cols[-1]) + 2 * pad) // 2
    cy = (int(rows[0]) + int(rows[-1]) + 2 * pad) // 2
    return cx, cy


def location_error(gt: np.ndarray, pred: np.ndarray, size: Tuple[int, int] = (EVAL_SIZE, EVAL_SIZE)) -> float:
    """``utils.location_score``: centre distance over ``sqrt(size_h^2 + size_w^2)``."""
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} shapes differ")
    pad = gt.shape[0]
    gx, gy = box_centre_padded(gt, pad)
    px, py = box_centre_padded(pred, pad)
    d = math.sqrt((gx - px) ** 2 + (gy - py) ** 2)
    return d / math.sqrt(size[0] ** 2 + size[1] ** 2)


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """sklearn ``balanced_accuracy_score``: mean recall over the classes present in
    ``y_true`` (a class only predicted is ignored); NaN for no samples."""
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.size != p.size:
        raise ValueError("y_true and y_pred differ in length")
    if t.size == 0:
        return float("nan")
    recalls = [np.count_nonzero((t == c) & (p == c)) / np.count_nonzero(t == c) for c in np.unique(t)]
    return float(np.mean(recalls))


def lmeec_confidence(mask: np.ndarray) -> int:
    """LM-EEC ``merge_results.py``: ``int(area > 0.001 * H * W)``."""
    h, w = mask.shape
    return int(int(np.count_nonzero(mask)) > LMEEC_AREA_FRACTION * h * w)


# ============================================================================ pooling


@dataclasses.dataclass
class Issue:
    level: str  # "error" | "warning"
    message: str
    take: Optional[str] = None
    obj: Optional[str] = None
    pair: Optional[str] = None
    frame: Optional[str] = None
    source: Optional[str] = None  # "pred" | "gt" | a file path

    def location(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source)
        for k in ("take", "obj", "pair", "frame"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{'object' if k == 'obj' else k}={v}")
        return " ".join(parts)

    def __str__(self) -> str:
        loc = self.location()
        return f"{self.level}: {loc + ': ' if loc else ''}{self.message}"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Pool:
    """Samples pooled over all (take, object, camera pair, frame)."""

    def __init__(self):
        self.iou: List[float] = []
        self.ca: List[float] = []
        self.le: List[float] = []
        self.exist_acc: List[bool] = []
        self.gt_exists: List[int] = []
        self.pred_exists: List[int] = []

    def add(self, gt_exists: bool, pred_visible: bool, gt_mask=None, pred_mask=None) -> None:
        if gt_exists:
            self.iou.append(iou(gt_mask, pred_mask))
            self.ca.append(boundary_f(gt_mask, pred_mask))
            self.le.append(location_error(gt_mask, pred_mask))
            self.exist_acc.append(bool(np.any(gt_mask)) == bool(np.any(pred_mask)))
        self.gt_exists.append(int(bool(gt_exists)))
        self.pred_exists.append(int(bool(pred_visible)))

    def __len__(self) -> int:
        return len(self.gt_exists)

    @staticmethod
    def _mean(v: List[float]) -> float:
        return float(np.mean(np.asarray(v, np.float64))) if v else float("nan")

    def summary(self) -> Dict[str, Any]:
        return {
            "iou": self._mean(self.iou),
            "contour_accuracy": self._mean(self.ca),
            "location_error": self._mean(self.le),
            "balanced_accuracy": balanced_accuracy(self.gt_exists, self.pred_exists),
            "existence_accuracy": self._mean(self.exist_acc),
            "n_samples": len(self.gt_exists),
            "n_gt_visible": int(sum(self.gt_exists)),
            "n_pred_visible": int(sum(self.pred_exists)),
        }


@dataclasses.dataclass
class ScoreReport:
    protocol: str
    direction: str
    metrics: Optional[Dict[str, Any]]  # None when the predictions are invalid
    issues: List[Issue]
    counts: Dict[str, int]

    @property
    def errors(self) -> List[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> List[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        out = {"protocol": self.protocol, "direction": self.direction, "valid": self.valid}
        if self.metrics is not None:
            out.update({k: clean(v) for k, v in self.metrics.items()})
        out["counts"] = dict(self.counts)
        out["n_errors"] = len(self.errors)
        out["n_warnings"] = len(self.warnings)
        out["issues"] = [i.to_dict() for i in self.issues[:1000]]
        return out


# ============================================================================ helpers


class _Ctx:
    """Collects issues; ``err``/``warn`` with a location."""

    def __init__(self):
        self.issues: List[Issue] = []
        self.n_errors = 0

    def err(self, message, **loc) -> None:
        self.issues.append(Issue("error", message, **loc))
        self.n_errors += 1

    def warn(self, message, **loc) -> None:
        self.issues.append(Issue("warning", message, **loc))


def _load_json_arg(x, what: str):
    """``x`` itself, or the JSON file it names (DataError, a ValueError, if it cannot be read)."""
    return read_json(x, what=what) if isinstance(x, (str, os.PathLike)) else x


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating))


def _pair_cams(direction: str, ego: str, exo: str) -> Tuple[str, str]:
    return (ego, exo) if direction == "ego2exo" else (exo, ego)


def _object_cams(cams: Iterable[str]) -> Tuple[List[str], List[str]]:
    cams = list(cams)
    return [c for c in cams if is_ego_camera(c)], [c for c in cams if not is_ego_camera(c)]


def _first_shape(cam_masks: Any) -> Optional[Tuple[int, int]]:
    if isinstance(cam_masks, dict):
        for rle in cam_masks.values():
            try:
                (h, w), _ = check_rle(rle)
                return h, w
            except DataError:
                continue
    return None


# ============================================================================ official protocol


def _gt_annotations(gt: Any, ctx: _Ctx) -> Optional[Dict[str, Any]]:
    if not isinstance(gt, dict) or not isinstance(gt.get("annotations"), dict):
        ctx.err('GT is not an official GT file (needs {"annotations": {take: ...}}; build it with `python -m eval build-gt`)', source="gt")
        return None
    return gt["annotations"]


def score_official(gt: Any, pred: Any, direction: str, *, subset: bool = False) -> ScoreReport:
    """Official EvalAI protocol (see module docstring).

    ``gt``: the official GT dict (``build-gt`` / ``process_annotations.py``) or its path.
    ``pred``: the official prediction dict or its path.
    ``subset``: score only the GT takes present in the predictions (not official; the
    official validator requires every take).
    """
    check_direction(direction)
    gt = _load_json_arg(gt, "GT")
    pred = _load_json_arg(pred, "prediction")
    ctx = _Ctx()
    pool = Pool()
    counts = {"takes": 0, "objects": 0, "pairs": 0}
    task = TASK_KEYS[direction]
    report = lambda: ScoreReport("official", direction, pool.summary() if ctx.n_errors == 0 else None, ctx.issues, counts)

    ann = _gt_annotations(gt, ctx)
    if ann is None:
        return report()
    if not isinstance(pred, dict) or task not in pred:
        ctx.err(f'predictions have no "{task}" entry (direction {direction}); top-level keys: '
                f"{sorted(pred) if isinstance(pred, dict) else type(pred).__name__}", source="pred")
        return report()
    p_task = pred[task]
    if not isinstance(p_task, dict) or not isinstance(p_task.get("results"), dict):
        ctx.err(f'predictions "{task}" has no "results" object', source="pred")
        return report()
    results = p_task["results"]

    takes = list(ann)
    if subset:
        kept = [t for t in takes if t in results]
        if len(kept) < len(takes):
            ctx.warn(f"--subset: scoring {len(kept)} of {len(takes)} GT takes (not an official number)", source="pred")
        takes = kept
    elif len(results) != len(ann):
        ctx.err(f"predictions have {len(results)} takes, GT has {len(ann)}", source="pred")
    for t in results:
        if t not in ann:
            ctx.err("take is not in the GT", source="pred", take=t)

    for take in takes:
        g = ann[take]
        if take not in results:
            ctx.err("take missing from the predictions", source="pred", take=take)
            continue
        p = results[take]
        if not isinstance(p, dict):
            ctx.err("take entry is not an object", source="pred", take=take)
            continue
        for key in ("masks", "subsample_idx"):
            if key not in p:
                ctx.err(f'take entry lacks "{key}"', source="pred", take=take)
        if not isinstance(g, dict) or not isinstance(g.get("masks"), dict):
            ctx.err('GT take has no "masks" object', source="gt", take=take)
            continue
        p_masks = p.get("masks")
        if not isinstance(p_masks, dict):
            continue
        counts["takes"] += 1
        if len(p_masks) != len(g["masks"]):
            ctx.err(f"predictions have {len(p_masks)} objects, GT has {len(g['masks'])}", source="pred", take=take)
        annotated = g.get("annotated_frames")
        if not isinstance(annotated, dict):
            ctx.err('GT take has no "annotated_frames"', source="gt", take=take)
            continue
        # mask shape of each camera in this take (for predictions on frames without GT)
        cam_shape: Dict[str, Tuple[int, int]] = {}
        for obj_cams in g["masks"].values():
            if isinstance(obj_cams, dict):
                for cam, fr in obj_cams.items():
                    if cam not in cam_shape:
                        s = _first_shape(fr)
                        if s is not None:
                            cam_shape[cam] = s
        for obj, cams in g["masks"].items():
            if obj not in p_masks:
                ctx.err("object missing from the predictions", source="pred", take=take, obj=obj)
                continue
            if not isinstance(cams, dict):
                ctx.err("GT object entry is not an object", source="gt", take=take, obj=obj)
                continue
            egos, exos = _object_cams(cams)
            if not egos or not exos:
                continue  # the official scorer skips objects without ego or exo annotation
            if len(egos) > 1:
                ctx.err(f"object has {len(egos)} aria cameras {egos}; the official scorer asserts one", source="gt", take=take, obj=obj)
                continue
            ego = egos[0]
            counts["objects"] += 1
            p_obj = p_masks[obj] if isinstance(p_masks[obj], dict) else {}
            for exo in exos:
                src, tgt = _pair_cams(direction, ego, exo)
                pair = f"{src}_{tgt}"
                loc = dict(take=take, obj=obj, pair=pair)
                if pair not in p_obj:
                    ctx.err("camera pair missing from the predictions", source="pred", **loc)
                    continue
                p_pair = p_obj[pair]
                if not isinstance(p_pair, dict):
                    ctx.err("camera pair entry is not an object", source="pred", **loc)
                    continue
                counts["pairs"] += 1
                src_frames = cams.get(src) or {}
                tgt_frames = cams.get(tgt) or {}
                ann_obj = annotated.get(obj)
                if not isinstance(ann_obj, dict) or tgt not in ann_obj:
                    ctx.err(f"GT annotated_frames lacks camera {tgt}", source="gt", **loc)
                    continue
                tgt_annotated = set(ann_obj[tgt] or [])
                if any(isinstance(v, str) for v in tgt_annotated):
                    ctx.warn("GT annotated_frames holds strings; the official scorer compares ints and matches none",
                             source="gt", **loc)
                tgt_shape = cam_shape.get(tgt)
                eval_shape = official_eval_shape(*tgt_shape) if tgt_shape else None
                for frame in src_frames:
                    floc = dict(loc, frame=frame)
                    entry = p_pair.get(frame)
                    if entry is None and frame not in p_pair:
                        ctx.err("frame missing from the predictions", source="pred", **floc)
                        continue
                    if not isinstance(entry, dict):
                        ctx.err("frame entry is not an object", source="pred", **floc)
                        continue
                    lacking = [k for k in ("pred_mask", "confidence") if k not in entry]
                    if lacking:
                        ctx.err(f"frame entry lacks {lacking}", source="pred", **floc)
                        continue
                    try:
                        scored = int(frame) in tgt_annotated
                    except ValueError:
                        ctx.err("GT frame key is not an integer", source="gt", **floc)
                        continue
                    if not scored:
                        continue
                    conf = entry["confidence"]
                    if not _is_number(conf) or (isinstance(conf, float) and math.isnan(conf)):
                        ctx.err(f"confidence is not a number ({conf!r})", source="pred", **floc)
                        continue
                    try:
                        pm = decode_rle(entry["pred_mask"])
                    except DataError as e:
                        ctx.err(f"bad pred_mask: {e}", source="pred", **floc)
                        continue
                    gt_exists = frame in tgt_frames
                    gm = None
                    if gt_exists:
                        try:
                            gm = reshape_nopad(decode_rle(tgt_frames[frame]))
                        except DataError as e:
                            ctx.err(f"bad GT mask of camera {tgt}: {e}", source="gt", **floc)
                            continue
                        if pm.shape != gm.shape:
                            ctx.err(f"pred_mask is {pm.shape[0]}x{pm.shape[1]}, the GT at evaluation size is "
                                    f"{gm.shape[0]}x{gm.shape[1]} (long side {EVAL_SIZE}, aspect kept)", source="pred", **floc)
                            continue
                    elif eval_shape is not None and pm.shape != eval_shape:
                        # not compared by the official scorer (no GT on this frame), but wrong all the same
                        ctx.warn(f"pred_mask is {pm.shape[0]}x{pm.shape[1]}, expected {eval_shape[0]}x{eval_shape[1]}",
                                 source="pred", **floc)
                    if ctx.n_errors:
                        continue  # invalid anyway: spare the metric computation
                    pool.add(gt_exists, conf > CONF_THRESH, gm, pm)
    return report()


# ============================================================================ LM-EEC protocol


_PAIR_DIR = re.compile(r"^(?P<src>.+?)__(?P<tgt>.+)$")


def _frame_order(name: str):
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _gt_pairs_official(ann: Dict[str, Any], direction: str) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """{take: {obj: {"<src>_<tgt>": {"src": src, "tgt": tgt, "src_frames": set, "frames": {frame: rle}}}}}."""
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for take, g in ann.items():
        masks = g.get("masks") if isinstance(g, dict) else None
        if not isinstance(masks, dict):
            continue
        tk = out.setdefault(take, {})
        for obj, cams in masks.items():
            if not isinstance(cams, dict):
                continue
            egos, exos = _object_cams(cams)
            ob = tk.setdefault(obj, {})
            for ego in egos:
                for exo in exos:
                    src, tgt = _pair_cams(direction, ego, exo)
                    ob[f"{src}_{tgt}"] = {"src": src, "tgt": tgt, "src_frames": set(cams.get(src) or {}),
                                          "frames": dict(cams.get(tgt) or {}), "squash": True}
    return out


def _gt_pairs_lmeec(gt: Dict[str, Any], task: str, ctx: _Ctx) -> Optional[Dict[str, Dict[str, Dict[str, dict]]]]:
    """LM-EEC's own GT file: prediction layout with 480x480 GT in ``pred_mask``."""
    key = task if task in gt else (TASK_KEYS["ego2exo"] if TASK_KEYS["ego2exo"] in gt else None)
    if key is None or not isinstance(gt[key], dict) or not isinstance(gt[key].get("results"), dict):
        ctx.err(f'GT file has neither "annotations" nor "{task}"/"results"', source="gt")
        return None
    if key != task:
        ctx.warn(f'GT file has no "{task}" entry; using "{key}" as LM-EEC\'s compute_metrics.py does', source="gt")
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for take, g in gt[key]["results"].items():
        masks = g.get("masks") if isinstance(g, dict) else None
        if not isinstance(masks, dict):
            continue
        for obj, pairs in masks.items():
            if not isinstance(pairs, dict):
                continue
            for pair, frames in pairs.items():
                if not isinstance(frames, dict):
                    continue
                out.setdefault(take, {}).setdefault(obj, {})[pair] = {
                    "src": None, "tgt": None, "src_frames": None, "squash": False,
                    "frames": {f: (e.get("pred_mask") if isinstance(e, dict) and "pred_mask" in e else e)
                               for f, e in frames.items()},
                }
    return out


def _read_json_file(path: str, ctx: _Ctx, **loc):
    try:
        return read_json(path)
    except DataError as e:
        ctx.err(e.problem, source=path, **loc)
        return None


def load_lmeec_predictions(path: str, ctx: Optional[_Ctx] = None, direction: Optional[str] = None) -> Dict[str, Any]:
    """Predictions as LM-EEC's evaluation reads them, normalised to
    ``{take: {obj: {"<src>_<tgt>": {frame: {"pred_mask": rle, "confidence": c|None, "path": str}}}}}``.

    Accepted inputs:

    * the inference output directory ``<path>/<take>/<src>__<tgt>/<object>/<frame>.json``
      (each file a COCO RLE, or ``{"pred_mask": RLE, ...}``); a take directory holding
      only ``annotations.json`` (``merge_pred.py`` output, pair keys ``<src>__<tgt>``)
      is read from that file;
    * a merged JSON file (``merge_results.py`` / official layout):
      ``{"ego-exo"|"exo-ego": {"results": {take: {"masks": {obj: {"<src>_<tgt>": {frame: {"pred_mask", "confidence"}}}}}}}}``.

    ``confidence`` is ``None`` for directory inputs (the protocol derives it from the
    mask area, as ``merge_results.py`` does).
    """
    ctx = ctx if ctx is not None else _Ctx()
    out: Dict[str, Any] = {}
    if os.path.isdir(path):
        for take in sorted(os.listdir(path)):
            tdir = os.path.join(path, take)
            if not os.path.isdir(tdir):
                continue
            pair_dirs = sorted(d for d in os.listdir(tdir) if _PAIR_DIR.match(d) and os.path.isdir(os.path.join(tdir, d)))
            if pair_dirs:
                for pd in pair_dirs:
                    m = _PAIR_DIR.match(pd)
                    pair = f"{m['src']}_{m['tgt']}"
                    for oname in sorted(os.listdir(os.path.join(tdir, pd))):
                        odir = os.path.join(tdir, pd, oname)
                        if oname.startswith(".") or not os.path.isdir(odir):
                            continue  # dot-folders: unfinished writes (encoded names never start with a dot)
                        obj = decode_name(oname)
                        for fn in sorted(os.listdir(odir), key=_frame_order):
                            if not fn.endswith(".json"):
                                continue
                            fp = os.path.join(odir, fn)
                            data = _read_json_file(fp, ctx, take=take, obj=obj, pair=pair, frame=fn[:-5])
                            if data is None:
                                continue
                            rle = data.get("pred_mask", data) if isinstance(data, dict) else data
                            out.setdefault(take, {}).setdefault(obj, {}).setdefault(pair, {})[fn[:-5]] = {
                                "pred_mask": rle, "confidence": None, "path": fp}
            elif os.path.isfile(os.path.join(tdir, "annotations.json")):
                fp = os.path.join(tdir, "annotations.json")
                data = _read_json_file(fp, ctx, take=take)
                masks = data.get("masks") if isinstance(data, dict) else None
                if not isinstance(masks, dict):
                    ctx.err('merged take file has no "masks" object', source=fp, take=take)
                    continue
                for obj, pairs in masks.items():
                    for pkey, frames in (pairs or {}).items():
                        m = _PAIR_DIR.match(pkey)
                        pair = f"{m['src']}_{m['tgt']}" if m else pkey
                        for frame, rle in (frames or {}).items():
                            out.setdefault(take, {}).setdefault(obj, {}).setdefault(pair, {})[frame] = {
                                "pred_mask": rle.get("pred_mask", rle) if isinstance(rle, dict) else rle,
                                "confidence": None, "path": fp}
        if not out:
            ctx.err("no predictions found (expected <take>/<src>__<tgt>/<object>/<frame>.json)", source=path)
        return out
    data = _load_json_arg(path, "prediction")
    if not isinstance(data, dict):
        ctx.err("prediction JSON is not an object", source=path)
        return out
    task = TASK_KEYS.get(direction or "", None)
    key = task if task in data else next((k for k in TASK_KEYS.values() if k in data), None)
    if key is None:
        ctx.err(f'prediction JSON has no "ego-exo"/"exo-ego" entry (keys: {sorted(data)})', source=path)
        return out
    if task is not None and key != task:
        ctx.warn(f'prediction JSON has no "{task}" entry; using "{key}"', source=path)
    results = data[key].get("results") if isinstance(data[key], dict) else None
    if not isinstance(results, dict):
        ctx.err(f'prediction JSON "{key}" has no "results" object', source=path)
        return out
    for take, t in results.items():
        masks = t.get("masks") if isinstance(t, dict) else None
        if not isinstance(masks, dict):
            ctx.err('take entry has no "masks" object', source=path, take=take)
            continue
        for obj, pairs in masks.items():
            if not isinstance(pairs, dict):
                ctx.err("object entry is not an object", source=path, take=take, obj=obj)
                continue
            for pair, frames in pairs.items():
                if not isinstance(frames, dict):
                    ctx.err("camera pair entry is not an object", source=path, take=take, obj=obj, pair=pair)
                    continue
                for frame, e in frames.items():
                    if not isinstance(e, dict) or "pred_mask" not in e:
                        ctx.err('frame entry lacks "pred_mask"', source=path, take=take, obj=obj, pair=pair, frame=frame)
                        continue
                    out.setdefault(take, {}).setdefault(obj, {}).setdefault(pair, {})[frame] = {
                        "pred_mask": e["pred_mask"], "confidence": e.get("confidence"), "path": path}
    return out


def score_lmeec(gt: Any, pred: Any, direction: str) -> ScoreReport:
    """LM-EEC's own protocol (see module docstring).

    ``gt``: the official GT dict/path (squashed to 480x480 here) or LM-EEC's own GT file
    (``{"ego-exo": {"results": ...}}`` with 480x480 masks in ``pred_mask``).
    ``pred``: a prediction directory or merged JSON path (:func:`load_lmeec_predictions`),
    or an already loaded official-layout dict.
    """
    check_direction(direction)
    gt = _load_json_arg(gt, "GT")
    ctx = _Ctx()
    pool = Pool()
    counts = {"takes": 0, "objects": 0, "pairs": 0, "gt_pairs": 0, "gt_pairs_predicted": 0}
    report = lambda: ScoreReport("lmeec", direction, pool.summary() if ctx.n_errors == 0 else None, ctx.issues, counts)
    task = TASK_KEYS[direction]

    if isinstance(gt, dict) and isinstance(gt.get("annotations"), dict):
        gt_pairs = _gt_pairs_official(gt["annotations"], direction)
    elif isinstance(gt, dict):
        gt_pairs = _gt_pairs_lmeec(gt, task, ctx)
        if gt_pairs is None:
            return report()
    else:
        ctx.err("GT file is not a JSON object", source="gt")
        return report()

    if isinstance(pred, dict):
        preds = {}
        results = (pred.get(task) or {}).get("results") if isinstance(pred.get(task), dict) else None
        if not isinstance(results, dict):
            ctx.err(f'predictions have no "{task}"/"results"', source="pred")
            return report()
        for take, t in results.items():
            for obj, pairs in ((t or {}).get("masks") or {}).items():
                for pair, frames in (pairs or {}).items():
                    for frame, e in (frames or {}).items():
                        preds.setdefault(take, {}).setdefault(obj, {}).setdefault(pair, {})[frame] = {
                            "pred_mask": e.get("pred_mask") if isinstance(e, dict) else None,
                            "confidence": e.get("confidence") if isinstance(e, dict) else None, "path": None}
        from_dir = False
    else:
        from_dir = os.path.isdir(os.fspath(pred))
        preds = load_lmeec_predictions(os.fspath(pred), ctx, direction)

    for take, p_objs in preds.items():  # long object names are hashed in folder names: match the GT's
        encoded = {encode_name(o): o for o in gt_pairs.get(take, {})}
        for name in [n for n in p_objs if n not in gt_pairs.get(take, {}) and n in encoded]:
            p_objs[encoded[name]] = p_objs.pop(name)
    n_outside = 0
    for take, p_objs in preds.items():
        if take not in gt_pairs:
            ctx.err("take is not in the GT", source="pred", take=take)
            continue
        counts["takes"] += 1
        g_objs = gt_pairs[take]
        for obj, p_pairs in p_objs.items():
            if obj not in g_objs:
                ctx.warn("object not in the GT: not scored", source="pred", take=take, obj=obj)
                continue
            counts["objects"] += 1
            for pair, p_frames in p_pairs.items():
                loc = dict(take=take, obj=obj, pair=pair)
                if "aria" not in pair:
                    ctx.warn("camera pair without an aria camera: not scored", source="pred", **loc)
                    continue
                if pair not in g_objs[obj]:
                    ctx.warn(f"camera pair not in the GT for {direction}: not scored", source="pred", **loc)
                    continue
                g = g_objs[obj][pair]
                counts["pairs"] += 1
                for frame, e in p_frames.items():
                    floc = dict(loc, frame=frame)
                    # merge_pred.py reads only the source camera's annotated frames
                    if from_dir and g["src_frames"] is not None and frame not in g["src_frames"]:
                        n_outside += 1
                        continue
                    try:
                        pm = decode_rle(e["pred_mask"])
                    except DataError as err:
                        ctx.err(f"bad pred_mask: {err}", source=e.get("path"), **floc)
                        continue
                    conf = e["confidence"]
                    if conf is None:
                        conf = lmeec_confidence(pm)
                    elif not _is_number(conf):
                        ctx.err(f"confidence is not a number ({conf!r})", source=e.get("path"), **floc)
                        continue
                    gt_exists, gm = False, None
                    if frame in g["frames"]:
                        try:
                            gm = decode_rle(g["frames"][frame])
                        except DataError as err:
                            ctx.err(f"bad GT mask: {err}", source="gt", **floc)
                            continue
                        if g["squash"]:
                            gm = resize_nearest_cv2(gm, (EVAL_SIZE, EVAL_SIZE))
                        gt_exists = bool(gm.any())
                    if gt_exists and pm.shape != gm.shape:
                        ctx.err(f"pred_mask is {pm.shape[0]}x{pm.shape[1]}, LM-EEC's protocol compares "
                                f"{gm.shape[0]}x{gm.shape[1]} masks", source=e.get("path"), **floc)
                        continue
                    if ctx.n_errors:
                        continue
                    pool.add(gt_exists, conf > CONF_THRESH, gm, pm)
    if n_outside:
        ctx.warn(f"{n_outside} predicted frames are not source-annotated frames; merge_pred.py ignores them", source="pred")
    # coverage: GT pairs with no prediction at all are silently unscored by LM-EEC's code
    missing = []
    for take, objs in gt_pairs.items():
        for obj, pairs in objs.items():
            for pair, g in pairs.items():
                if not g["frames"] and not g["src_frames"]:
                    continue
                counts["gt_pairs"] += 1
                if pair in preds.get(take, {}).get(obj, {}):
                    counts["gt_pairs_predicted"] += 1
                else:
                    missing.append((take, obj, pair))
    if missing:
        ctx.warn(f"{len(missing)} of {counts['gt_pairs']} GT camera pairs have no predictions; "
                 "LM-EEC's protocol does not score them", source="pred")
        for take, obj, pair in missing[:20]:
            ctx.warn("no predictions for this camera pair", source="pred", take=take, obj=obj, pair=pair)
    return report()


def score(gt: Any, pred: Any, direction: str, protocol: str = "official", **kw) -> ScoreReport:
    if protocol == "official":
        return score_official(gt, pred, direction, **kw)
    if protocol == "lmeec":
        return score_lmeec(gt, pred, direction, **kw)
    raise ValueError(f"protocol must be 'official' or 'lmeec', got {protocol!r}")


# ============================================================================ printing


def _fmt(v, scale=1.0, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v * scale:.{nd}f}"


def format_table(rep: ScoreReport) -> str:
    """IoU and BA x100 (as the papers print them), CA and LE as fractions."""
    head = f"protocol {rep.protocol}, {rep.direction}"
    if rep.metrics is None:
        return head + ": predictions invalid, no score"
    m = rep.metrics
    lines = [
        f"{head}: {m['n_samples']} samples, {m['n_gt_visible']} with the object visible in the GT "
        f"({rep.counts.get('takes', 0)} takes, {rep.counts.get('objects', 0)} objects, {rep.counts.get('pairs', 0)} camera pairs)",
        f"{'IoU':>8} {'CA':>8} {'LE':>8} {'BA':>8}",
        f"{_fmt(m['iou'], 100, 2):>8} {_fmt(m['contour_accuracy']):>8} {_fmt(m['location_error']):>8} "
        f"{_fmt(m['balanced_accuracy'], 100, 2):>8}",
    ]
    return "\n".join(lines)
