"""A static HTML report of one prediction run (``python -m eval report``).

The folder written by :func:`build_report` opens in any browser without a server or a
network: ``index.html`` (headline, prediction settings, failed videos, plots, a sortable
per-video table), ``videos/<slug>.html`` (one page per video: numbers, per-frame IoU
curve as inline SVG, per-frame table, and for the worst videos an animated GIF of source
and target side by side with GT and prediction overlaid), ``plots/*.png`` (matplotlib,
Agg) and ``report.json`` (the numbers).

The headline is :func:`lmeec_jax.evaluation.metrics.score` itself (what ``eval score``
prints). Per-frame numbers come from :class:`~lmeec_jax.evaluation.metrics.Pool`'s
``add`` (the scorer's metric functions) over the scorer's samples: the official protocol's
(source GT frames in the target's ``annotated_frames``, GT resized long side -> 480) or
LM-EEC's (the predicted frames, 480x480 GT). Their pooled mean is checked against the
headline and a mismatch is shown on the page.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional

import numpy as np

from lmeec_jax.data.errors import DataError
from lmeec_jax.data.rle import decode_rle
from lmeec_jax.evaluation import metrics as M
from lmeec_jax.evaluation.protocol import EVAL_SIZE, TASK_KEYS, check_direction
from lmeec_jax.io import atomic_write, encode_name, read_json, write_json_atomic

__all__ = ["FrameSample", "VideoResult", "collect", "build_report", "read_predict_report", "resolve_pred"]

METRIC_KEYS = ("iou", "contour_accuracy", "location_error", "balanced_accuracy")


@dataclasses.dataclass
class FrameSample:
    frame: str
    gt_exists: bool
    pred_visible: bool
    confidence: Optional[float]
    iou: Optional[float] = None
    ca: Optional[float] = None
    le: Optional[float] = None
    gt_area: Optional[float] = None  # fraction of the evaluated mask
    pred_area: Optional[float] = None
    gt_rle: Any = None  # target GT as stored (rendering)
    pred_rle: Any = None


@dataclasses.dataclass
class VideoResult:
    take: str
    obj: str
    src: str
    tgt: str
    frames: List[FrameSample]
    failed: Optional[str] = None  # the prediction report's reason

    @property
    def key(self) -> str:  # = VideoRecord.key
        return f"{self.take}/{self.src}__{self.tgt}/{self.obj}"

    @property
    def slug(self) -> str:
        s = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.take}__{self.src}__{self.tgt}__{self.obj}")[:80]
        return f"{s}-{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"

    def _mean(self, attr):
        v = [getattr(s, attr) for s in self.frames if getattr(s, attr) is not None]
        return float(np.mean(v)) if v else None

    def summary(self) -> Dict[str, Any]:
        n = len(self.frames)
        vis = [s.gt_exists == s.pred_visible for s in self.frames]
        return {"iou": self._mean("iou"), "contour_accuracy": self._mean("ca"), "location_error": self._mean("le"),
                "visibility_accuracy": float(np.mean(vis)) if n else None, "gt_area": self._mean("gt_area"),
                "frames": n, "gt_visible": sum(s.gt_exists for s in self.frames)}


# ============================================================================ inputs


def resolve_pred(pred: str, direction: str, protocol: str) -> str:
    """What the scorer reads: the official JSON inside a prediction folder for the official
    protocol, the folder itself for LM-EEC's; a JSON file as is."""
    if os.path.isdir(pred) and protocol == "official":
        return os.path.join(pred, f"predictions_{direction}.json")
    return pred


def read_predict_report(pred: str, direction: str) -> Dict[str, Any]:
    """``predict_report_<direction>.json`` beside ``pred`` ({} when absent or unreadable;
    ``summary`` and ``run`` always dicts, ``videos_failed`` / ``takes_failed`` lists of dicts)."""
    folder = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    path = os.path.join(folder, f"predict_report_{direction}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    out = {k: (data.get(k) if isinstance(data.get(k), dict) else {}) for k in ("summary", "run")}
    out["path"] = path if data else None
    for k in ("videos_failed", "takes_failed"):
        v = out["summary"].get(k)
        out[k] = [e for e in v if isinstance(e, dict)] if isinstance(v, list) else []
    return out


# ============================================================================ samples


def _add(pool: M.Pool, s: FrameSample, gm, pm) -> FrameSample:
    """Score one sample with the scorer's Pool (its metric functions) and keep the values."""
    n = len(pool.iou)
    pool.add(s.gt_exists, s.pred_visible, gm, pm)
    if len(pool.iou) > n:
        s.iou, s.ca, s.le = pool.iou[-1], pool.ca[-1], pool.le[-1]
        s.gt_area = float(np.count_nonzero(gm)) / gm.size
    if pm is not None:
        s.pred_area = float(np.count_nonzero(pm)) / pm.size
    return s


def _collect_official(gt: dict, pred: dict, direction: str, pool: M.Pool, skipped: List[str]) -> List[VideoResult]:
    results = ((pred.get(TASK_KEYS[direction]) or {}).get("results") or {}) if isinstance(pred, dict) else {}
    out = []
    for take, g in gt["annotations"].items():  # the scorer's order: pooled means match to the bit
        p_masks = (results.get(take) or {}).get("masks") or {}
        annotated = g.get("annotated_frames") or {}
        for obj, cams in (g.get("masks") or {}).items():
            egos, exos = M._object_cams(cams)
            if len(egos) != 1 or not exos:
                continue
            for exo in exos:
                src, tgt = M._pair_cams(direction, egos[0], exo)
                p_pair = (p_masks.get(obj) or {}).get(f"{src}_{tgt}") or {}
                tgt_frames = cams.get(tgt) or {}
                tgt_annotated = set((annotated.get(obj) or {}).get(tgt) or [])
                vid = VideoResult(take, obj, src, tgt, [])
                for frame in cams.get(src) or {}:
                    if not (frame.isdigit() and int(frame) in tgt_annotated):
                        continue
                    e = p_pair.get(frame)
                    try:
                        pm = decode_rle(e["pred_mask"])
                        conf = float(e["confidence"])
                        gm = None
                        if frame in tgt_frames:
                            gm = M.reshape_nopad(decode_rle(tgt_frames[frame]))
                    except (DataError, TypeError, KeyError, ValueError) as err:
                        skipped.append(f"{vid.key} frame {frame}: {err}")
                        continue
                    if gm is not None and gm.shape != pm.shape:
                        skipped.append(f"{vid.key} frame {frame}: pred_mask {pm.shape} vs GT {gm.shape}")
                        continue
                    s = FrameSample(frame, frame in tgt_frames, conf > M.CONF_THRESH, conf,
                                    gt_rle=tgt_frames.get(frame), pred_rle=e["pred_mask"])
                    vid.frames.append(_add(pool, s, gm, pm))
                out.append(vid)
    return out


def _collect_lmeec(gt: dict, pred: str, direction: str, pool: M.Pool, skipped: List[str]) -> List[VideoResult]:
    gt_pairs = M._gt_pairs_official(gt["annotations"], direction)
    from_dir = os.path.isdir(pred)
    preds = M.load_lmeec_predictions(pred, M._Ctx(), direction)
    for take, p_objs in preds.items():  # hashed long object names -> the GT's (as score_lmeec)
        encoded = {encode_name(o): o for o in gt_pairs.get(take, {})}
        for name in [n for n in p_objs if n not in gt_pairs.get(take, {}) and n in encoded]:
            p_objs[encoded[name]] = p_objs.pop(name)
    out = []
    for take, p_objs in preds.items():
        for obj, p_pairs in p_objs.items():
            for pair, p_frames in p_pairs.items():
                g = gt_pairs.get(take, {}).get(obj, {}).get(pair)
                if g is None or "aria" not in pair:
                    continue
                vid = VideoResult(take, obj, g["src"], g["tgt"], [])
                for frame, e in p_frames.items():
                    if from_dir and frame not in g["src_frames"]:
                        continue
                    try:
                        pm = decode_rle(e["pred_mask"])
                        conf = e["confidence"]
                        conf = M.lmeec_confidence(pm) if conf is None else float(conf)
                        gm = None
                        if frame in g["frames"]:
                            gm = M.resize_nearest_cv2(decode_rle(g["frames"][frame]), (EVAL_SIZE, EVAL_SIZE))
                    except (DataError, TypeError, KeyError, ValueError) as err:
                        skipped.append(f"{vid.key} frame {frame}: {err}")
                        continue
                    exists = gm is not None and bool(gm.any())
                    if exists and gm.shape != pm.shape:
                        skipped.append(f"{vid.key} frame {frame}: pred_mask {pm.shape} vs GT {gm.shape}")
                        continue
                    s = FrameSample(frame, exists, conf > M.CONF_THRESH, float(conf),
                                    gt_rle=g["frames"].get(frame), pred_rle=e["pred_mask"])
                    vid.frames.append(_add(pool, s, gm if exists else None, pm))
                out.append(vid)
    # GT videos without predictions (failed ones among them): listed, not scored (as score_lmeec)
    seen = {v.key for v in out}
    for take, objs in gt_pairs.items():
        for obj, pairs in objs.items():
            for pair, g in pairs.items():
                v = VideoResult(take, obj, g["src"], g["tgt"], [])
                if v.key not in seen and g["frames"]:
                    out.append(v)
    return out


def collect(gt: Any, pred: str, direction: str, protocol: str):
    """(per-video results, pooled summary, problems) over the scorer's samples."""
    check_direction(direction)
    gt = read_json(gt, what="GT") if isinstance(gt, (str, os.PathLike)) else gt
    if not isinstance(gt, dict) or not isinstance(gt.get("annotations"), dict):
        raise ValueError("the report needs the official GT file (python -m eval build-gt)")
    pool, skipped = M.Pool(), []
    if protocol == "official":
        pj = read_json(pred, what="prediction") if isinstance(pred, (str, os.PathLike)) else pred
        vids = _collect_official(gt, pj, direction, pool, skipped)
    elif protocol == "lmeec":
        vids = _collect_lmeec(gt, pred, direction, pool, skipped)
    else:
        raise ValueError(f"protocol must be 'official' or 'lmeec', got {protocol!r}")
    return vids, pool.summary(), skipped


# ============================================================================ plots


def _plots(vids: List[VideoResult], out_dir: str, pooled: dict) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    samples = [(s, i / max(len(v.frames) - 1, 1)) for v in vids for i, s in enumerate(v.frames)]
    scored = [(s, pos) for s, pos in samples if s.iou is not None]
    ious = np.array([s.iou for s, _ in scored], np.float64)
    files = {}

    def save(fig, name, title):
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files[title] = os.path.basename(path)

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(ious, bins=np.linspace(0, 1, 21), color="#4477aa", edgecolor="white")
    ax.set(xlabel="per-frame IoU", ylabel="frames", title=f"IoU histogram ({len(ious)} frames, GT exists)")
    save(fig, "iou_hist.png", "Per-frame IoU histogram")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    pts = [(s.gt_area, s.iou) for s, _ in scored if s.gt_area and s.gt_area > 0]
    if pts:
        a = np.array(pts)
        ax.scatter(a[:, 0], a[:, 1], s=9, alpha=0.5, color="#aa3377")
        ax.set_xscale("log")
    n_empty = len(scored) - len(pts)
    ax.set(xlabel="GT area / frame area (log)", ylabel="IoU", ylim=(-0.02, 1.02),
           title="IoU vs object size" + (f" ({n_empty} empty GT not shown)" if n_empty else ""))
    save(fig, "iou_vs_size.png", "IoU against object size")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    if scored:
        pos = np.array([p for _, p in scored])
        ax.scatter(pos, ious, s=9, alpha=0.4, color="#228833")
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(pos, edges) - 1, 0, 9)
        means = [ious[idx == b].mean() if np.any(idx == b) else np.nan for b in range(10)]
        ax.plot((edges[:-1] + edges[1:]) / 2, means, "k-o", ms=3, label="mean per decile")
        ax.legend(loc="lower left", fontsize=8)
    ax.set(xlabel="position in the video (0 = first scored frame, 1 = last)", ylabel="IoU", ylim=(-0.02, 1.02),
           title="IoU vs frame position")
    save(fig, "iou_vs_position.png", "IoU against the frame's position in the video")

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    cm = np.zeros((2, 2), int)
    for s, _ in samples:
        cm[int(s.gt_exists), int(s.pred_visible)] += 1
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black" if cm[i, j] < cm.max() / 2 else "white")
    ax.set_xticks([0, 1], ["not visible", "visible"])
    ax.set_yticks([0, 1], ["absent", "exists"])
    ba = pooled.get("balanced_accuracy")
    ax.set(xlabel="predicted (confidence > 0.5)", ylabel="GT",
           title=f"visibility (BA {100 * ba:.2f})" if ba is not None and not math.isnan(ba) else "visibility")
    save(fig, "visibility_confusion.png", "Visibility confusion matrix")
    return files


# ============================================================================ overlays


def _view(split_dir, take, cam, frame, mask_rle_list, height):
    """One view drawn ``height`` pixels high: each (rle, colour, alpha) filled + outlined."""
    from PIL import Image

    from lmeec_jax.data.images import read_rgb, resize_mask_nearest
    from lmeec_jax.evaluation.overlay import overlay

    try:
        img = read_rgb(os.path.join(split_dir, take, cam, f"{frame}.jpg"))
    except DataError:
        img = np.full((height, height, 3), 60, np.uint8)  # no / unreadable image: grey, masks still drawn
    h, w = img.shape[:2]
    wh = (max(1, round(w * height / h)), height)
    small = np.asarray(Image.fromarray(img).resize(wh, Image.BILINEAR))
    for rle, colour, alpha in mask_rle_list:
        if rle is None:
            continue
        try:
            m = resize_mask_nearest(decode_rle(rle), wh[::-1])
        except DataError:
            continue
        small = overlay(small, m, colour, m, alpha=alpha)
    return small


def render_gif(vid: VideoResult, gt: dict, split_dir: str, path: str, height: int = 240, ms: int = 500,
               max_frames: int = 60) -> int:
    """Source (GT green) | target (GT green, prediction magenta) per scored frame -> GIF; frames written."""
    from PIL import Image, ImageDraw

    from lmeec_jax.evaluation.overlay import GT_COLOUR, PRED_COLOUR

    src_masks = ((gt["annotations"].get(vid.take) or {}).get("masks") or {}).get(vid.obj, {}).get(vid.src) or {}
    frames = vid.frames
    if len(frames) > max_frames:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    canvases = []
    for s in frames:
        left = _view(split_dir, vid.take, vid.src, s.frame, [(src_masks.get(s.frame), GT_COLOUR, 0.4)], height)
        right = _view(split_dir, vid.take, vid.tgt, s.frame,
                      [(s.gt_rle, GT_COLOUR, 0.4), (s.pred_rle, PRED_COLOUR, 0.3)], height)
        canvas = Image.new("RGB", (left.shape[1] + right.shape[1] + 8, height + 22), (20, 20, 20))
        canvas.paste(Image.fromarray(left), (0, 22))
        canvas.paste(Image.fromarray(right), (left.shape[1] + 8, 22))
        d = ImageDraw.Draw(canvas)
        d.text((4, 5), f"source {vid.src}  frame {s.frame}  (GT green)", fill=(255, 255, 255))
        iou_txt = "n/a" if s.iou is None else f"{s.iou:.2f}"
        d.text((left.shape[1] + 12, 5), f"target {vid.tgt}  GT green, pred magenta  IoU {iou_txt}  "
               f"conf {s.confidence:.2f}", fill=(255, 255, 255))
        canvases.append(canvas.quantize(256, method=Image.Quantize.FASTOCTREE))  # GIF's own quantizer is slow
    if canvases:
        with atomic_write(path, "wb") as fh:
            canvases[0].save(fh, format="GIF", save_all=True, append_images=canvases[1:], duration=ms, loop=0)
    return len(canvases)


# ============================================================================ HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td.l,th.l{text-align:left}
th.sort{cursor:pointer;background:#eef}th.sort:hover{background:#dde}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}.bad{background:#fdd}
.warn{color:#a40}img{max-width:100%}.plots img{width:420px;margin:4px}code{background:#f4f4f4}"""

_SORT_JS = """document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.classList.add('sort');th.addEventListener('click',function(){
  var b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.dir!=='asc';
  t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});th.dataset.dir=asc?'asc':'desc';
  rows.sort(function(x,y){var p=x.cells[i].dataset.v,q=y.cells[i].dataset.v;
   var a=p!==undefined&&p!==''?parseFloat(p):x.cells[i].textContent,c=q!==undefined&&q!==''?parseFloat(q):y.cells[i].textContent;
   if(typeof a==='number'&&typeof c==='number'){if(isNaN(a))return 1;if(isNaN(c))return -1;return asc?a-c:c-a;}
   return asc?String(a).localeCompare(String(c)):String(c).localeCompare(String(a));});
  rows.forEach(function(r){b.appendChild(r);});});});});"""

E = html.escape


def _num(v, scale=1.0, nd=3) -> str:
    """A numeric cell: shown rounded, sorted on its ``data-v``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '<td data-v="NaN">n/a</td>'
    x = float(v) * scale
    return f'<td data-v="{x!r}">{x:.{nd}f}</td>'


def _page(title: str, body: str, sortable: bool = False) -> str:
    js = f"<script>{_SORT_JS}</script>" if sortable else ""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{E(title)}</title><style>{_CSS}</style>'
            f"</head><body>{body}{js}</body></html>")


def _headline(metrics: Optional[dict], protocol: str, direction: str) -> str:
    if metrics is None:
        return '<p class="warn">the scorer found the predictions invalid: no score (see the issues below)</p>'
    m = metrics
    return ("<table><tr><th>IoU x100</th><th>CA</th><th>LE</th><th>BA x100</th><th>samples</th><th>GT visible</th></tr>"
            f"<tr>{_num(m.get('iou'), 100, 2)}{_num(m.get('contour_accuracy'))}{_num(m.get('location_error'))}"
            f"{_num(m.get('balanced_accuracy'), 100, 2)}<td>{m.get('n_samples')}</td><td>{m.get('n_gt_visible')}</td></tr>"
            f"</table><p>protocol <b>{E(protocol)}</b>, direction <b>{E(direction)}</b>: IoU and BA x100 as the papers "
            "print them, CA (contour accuracy) and LE (location error, lower is better) as fractions.</p>")


def _kv_table(d: dict) -> str:
    rows = "".join(f'<tr><th class="l">{E(str(k))}</th><td class="l">{E(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>'
                   for k, v in d.items())
    return f"<table>{rows}</table>" if rows else "<p>(none recorded)</p>"


def _svg_curve(vid: VideoResult, w: int = 640, h: int = 180) -> str:
    pts = [(i, s.iou) for i, s in enumerate(vid.frames) if s.iou is not None]
    n = max(len(vid.frames) - 1, 1)
    X = lambda i: 40 + (w - 50) * i / n
    Y = lambda v: 10 + (h - 35) * (1 - v)
    grid = "".join(f'<line x1="40" x2="{w - 10}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                   f'<text x="4" y="{Y(v) + 4:.1f}" font-size="11">{v:.1f}</text>' for v in (0, 0.5, 1))
    line = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in pts)
    dots = "".join(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="2.5" fill="#4477aa"><title>frame '
                   f'{E(vid.frames[i].frame)}: IoU {v:.3f}</title></circle>' for i, v in pts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">{grid}'
            f'<polyline fill="none" stroke="#4477aa" points="{line}"/>{dots}'
            f'<text x="{w / 2:.0f}" y="{h - 5}" font-size="11" text-anchor="middle">scored frame index '
            f'(IoU where the GT exists)</text></svg>')


def _video_row(v: VideoResult, href: str) -> str:
    s = v.summary()
    status = f'<td class="l bad" title="{E(v.failed)}">failed</td>' if v.failed else '<td class="l">ok</td>'
    return (f'<tr><td class="l"><a href="{E(href)}">{E(v.take)}</a></td><td class="l">{E(v.src)} &rarr; {E(v.tgt)}</td>'
            f'<td class="l">{E(v.obj)}</td><td>{s["frames"]}</td>{_num(s["iou"], 100, 2)}{_num(s["contour_accuracy"])}'
            f'{_num(s["location_error"])}{_num(s["visibility_accuracy"], 100, 1)}{_num(s["gt_area"], 100, 3)}{status}</tr>')


_VIDEO_HEAD = ('<thead><tr><th class="l">take</th><th class="l">source &rarr; target</th><th class="l">object</th>'
               "<th>frames</th><th>IoU x100</th><th>CA</th><th>LE</th><th>visibility acc. %</th>"
               '<th>GT area %</th><th class="l">prediction</th></tr></thead>')


def _video_page(v: VideoResult, gif: Optional[str], protocol: str, direction: str) -> str:
    rows = "".join(
        f'<tr><td>{E(f.frame)}</td><td>{"yes" if f.gt_exists else "no"}</td><td>{"yes" if f.pred_visible else "no"}</td>'
        f"{_num(f.confidence)}{_num(f.iou, 100, 2)}{_num(f.ca)}{_num(f.le)}{_num(f.gt_area, 100, 3)}{_num(f.pred_area, 100, 3)}</tr>"
        for f in v.frames)
    body = [f'<p><a href="../index.html">&larr; report</a></p><h1>{E(v.obj)}</h1>',
            f"<p>take <code>{E(v.take)}</code>, {E(v.src)} &rarr; {E(v.tgt)} ({E(direction)}, protocol {E(protocol)})</p>"]
    if v.failed:
        body.append(f'<p class="warn">prediction failed: {E(v.failed)}</p>')
    body.append(f'<table>{_VIDEO_HEAD}<tbody>{_video_row(v, "#")}</tbody></table>')
    if gif:
        body.append(f'<h2>Frames</h2><p>left: source with its GT (green); right: target with GT (green) and the '
                    f'prediction (magenta)</p><img src="{E(gif)}" alt="overlay animation">')
    if any(f.iou is not None for f in v.frames):
        body.append(f"<h2>Per-frame IoU</h2>{_svg_curve(v)}")
    if v.frames:
        body.append('<h2>Frames scored</h2><table class="sortable"><thead><tr><th>frame</th><th>GT exists</th>'
                    "<th>pred visible</th><th>confidence</th><th>IoU x100</th><th>CA</th><th>LE</th>"
                    f"<th>GT area %</th><th>pred area %</th></tr></thead><tbody>{rows}</tbody></table>")
    else:
        body.append("<p>no scored frame</p>")
    return _page(f"{v.key} - report", "".join(body), sortable=bool(v.frames))


def _close(a, b, tol=1e-9) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= tol


def build_report(data: str, pred: str, gt: str, direction: str, out: str, protocol: str = "official",
                 worst: int = 20, all_gifs: bool = False, gif_height: int = 240, gif_max_frames: int = 60) -> dict:
    """Write the report folder ``out``; returns the report's summary (also ``out/report.json``)."""
    t0 = time.perf_counter()
    check_direction(direction)
    pred_in = resolve_pred(pred, direction, protocol)
    gt_data = read_json(gt, what="GT")
    rep = M.score(gt_data, pred_in, direction, protocol)
    vids, pooled, skipped = collect(gt_data, pred_in, direction, protocol)
    pr = read_predict_report(pred, direction)
    failed = {str(e.get("video")): str(e.get("error", "?")) for e in pr["videos_failed"]}
    failed_takes = {str(e.get("take")): str(e.get("error", "?")) for e in pr["takes_failed"]}
    for v in vids:
        v.failed = failed.get(v.key) or failed_takes.get(v.take)
    keys = {v.key for v in vids}
    for key, why in failed.items():  # failed videos the protocol does not score: rows without frames
        parts = key.split("/", 2)
        if key not in keys and len(parts) == 3 and "__" in parts[1]:
            src, tgt = parts[1].split("__", 1)
            vids.append(VideoResult(parts[0], parts[2], src, tgt, [], failed=why))
    check = {k: (pooled.get(k), (rep.metrics or {}).get(k)) for k in METRIC_KEYS + ("n_samples",)}
    consistent = rep.metrics is not None and all(_close(a, b) for a, b in check.values())

    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    plots = _plots(vids, os.path.join(out, "plots"), pooled)
    ranked = sorted((v for v in vids if v.summary()["iou"] is not None), key=lambda v: (v.summary()["iou"], v.key))
    gif_for = {v.key for v in (vids if all_gifs else ranked[: max(worst, 0)])}
    for v in vids:
        gif = None
        if v.key in gif_for and v.frames:
            gif = f"{v.slug}.gif"
            if not render_gif(v, gt_data, data, os.path.join(out, "videos", gif), gif_height, max_frames=gif_max_frames):
                gif = None
        with atomic_write(os.path.join(out, "videos", f"{v.slug}.html")) as f:
            f.write(_video_page(v, gif, protocol, direction))

    body = [f"<h1>LM-EEC {E(direction)} report</h1><h2>Headline</h2>", _headline(rep.metrics, protocol, direction)]
    if not consistent and rep.metrics is not None:
        body.append(f'<p class="warn">per-video numbers pooled ({E(json.dumps(check))}) differ from the scorer\'s</p>')
    body.append(f"<p>{len(vids)} videos; predictions <code>{E(pred_in)}</code>, GT <code>{E(gt)}</code>, "
                f"data <code>{E(data)}</code></p>")
    body.append("<h2>Prediction settings</h2>" + _kv_table(pr["run"]))
    summ = {k: pr["summary"][k] for k in ("videos", "videos_written", "videos_resumed", "frames", "frames_predicted",
                                          "frames_skipped", "official_filled", "seconds", "fps", "ok")
            if k in pr["summary"]}
    body.append("<h3>Prediction run</h3>" + _kv_table(summ))
    if pr["videos_failed"] or pr["takes_failed"]:
        items = "".join(f'<li><code>{E(str(e.get("video") or e.get("take")))}</code>: {E(str(e.get("error", "?")))}</li>'
                        for e in pr["takes_failed"] + pr["videos_failed"])
        body.append(f'<h2 class="warn">Failed ({len(pr["takes_failed"])} takes, {len(pr["videos_failed"])} videos)</h2>'
                    f"<ul>{items}</ul>")
    if rep.errors or skipped:
        items = "".join(f"<li>{E(str(i))}</li>" for i in rep.errors[:50]) + "".join(f"<li>{E(s)}</li>" for s in skipped[:50])
        body.append(f'<h2 class="warn">Scorer errors / unscored frames</h2><ul>{items}</ul>')
    if rep.warnings:
        items = "".join(f"<li>{E(str(i))}</li>" for i in rep.warnings[:100])
        body.append(f"<details><summary>{len(rep.warnings)} scorer warnings</summary><ul>{items}</ul></details>")
    body.append('<h2>Plots</h2><div class="plots">' + "".join(
        f'<figure style="display:inline-block"><img src="plots/{E(fn)}" alt="{E(t)}"><figcaption>{E(t)}</figcaption></figure>'
        for t, fn in plots.items()) + "</div>")
    worst_items = "".join(f'<li><a href="videos/{v.slug}.html">{E(v.key)}</a>: IoU x100 {100 * v.summary()["iou"]:.2f}</li>'
                          for v in ranked[: max(worst, 0)])
    body.append(f"<h2>Worst {min(max(worst, 0), len(ranked))} videos (mean IoU)</h2><ol>{worst_items}</ol>")
    rows = "".join(_video_row(v, f"videos/{v.slug}.html") for v in vids)
    body.append(f'<h2>Videos</h2><p>click a column header to sort</p><table class="sortable" id="videos">'
                f"{_VIDEO_HEAD}<tbody>{rows}</tbody></table>")
    with atomic_write(os.path.join(out, "index.html")) as f:
        f.write(_page(f"LM-EEC {direction} report", "".join(body), sortable=True))

    summary = {"protocol": protocol, "direction": direction, "headline": rep.metrics, "pooled": pooled,
               "consistent": consistent, "videos": len(vids), "gifs": sorted(gif_for),
               "failed": pr["takes_failed"] + pr["videos_failed"], "unscored": skipped,
               "seconds": time.perf_counter() - t0,
               "per_video": [dict(v.summary(), key=v.key, page=f"videos/{v.slug}.html", failed=v.failed) for v in vids]}
    write_json_atomic(os.path.join(out, "report.json"), _clean(summary), indent=1)
    return summary


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
