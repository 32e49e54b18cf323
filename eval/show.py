"""`python -m eval show`: source and target frames side by side with GT (and prediction) overlaid.

For every video of ``--take`` / ``--object`` in ``--direction`` (optionally only the
camera pair ``--pair SRC__TGT``), each frame of the video (source JPEGs ∩ target
annotation keys, as LM-EEC lists them) becomes ``<out>/<src>__<tgt>/<frame>.png``:
left the source view with its GT mask (green), right the target view with its GT
(green) and the prediction (magenta) read from
``<pred>/<take>/<src>__<tgt>/<object>/<frame>.json`` (COCO RLE of a 480x480 mask,
stretched to the target view). ``<out>/<src>__<tgt>.gif`` animates the frames.
Views are drawn ``--height`` pixels high keeping their aspect ratio.
"""

from __future__ import annotations

import os

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser("show", help="render source/target frames with GT and prediction overlays (PNG + GIF)")
    p.add_argument("--data", required=True, help="processed split directory")
    p.add_argument("--take", required=True)
    p.add_argument("--object", required=True, dest="obj")
    p.add_argument("--direction", choices=("ego2exo", "exo2ego"), default="ego2exo")
    p.add_argument("--pred", default=None, help="prediction directory (<pred>/<take>/<src>__<tgt>/<object>/<frame>.json)")
    p.add_argument("--pair", default=None, help="only this camera pair, e.g. aria01__cam01")
    p.add_argument("--out", required=True)
    p.add_argument("--height", type=int, default=360, help="drawn height of each view")
    p.add_argument("--gif-ms", type=int, default=500, help="GIF frame duration")
    p.set_defaults(func=main)


def render_video(split_dir, rec, out_dir, pred_dir=None, height=360, gif_ms=500, annotation=None):
    """Write the PNGs and the GIF of one video; returns the list of PNG paths."""
    from PIL import Image, ImageDraw

    from lmeec_jax.data.egoexo import ANNOTATION_FILE, ViewMasks, decode_mask, load_annotation
    from lmeec_jax.data.images import read_rgb, resize_mask_nearest
    from lmeec_jax.evaluation.metrics import iou
    from lmeec_jax.evaluation.overlay import GT_COLOUR, PRED_COLOUR, overlay
    from lmeec_jax.io import atomic_write, read_json

    take_dir = os.path.join(split_dir, rec.take)
    ann = annotation or load_annotation(take_dir, rec.take)
    ann_path = os.path.join(take_dir, ANNOTATION_FILE)
    views_gt = {cam: ViewMasks(ann, rec.take, rec.obj, cam, path=ann_path, same_size=False)
                for cam in (rec.src_cam, rec.tgt_cam)}
    pair_dir = os.path.join(out_dir, rec.pair)
    os.makedirs(pair_dir, exist_ok=True)
    pngs, frames = [], []
    for f in rec.frames:
        views = []
        texts = []
        for role, cam in (("source", rec.src_cam), ("target", rec.tgt_cam)):
            img = read_rgb(os.path.join(take_dir, cam, f + ".jpg"), take=rec.take, camera=cam, frame=f)
            h, w = img.shape[:2]
            wh = (max(1, round(w * height / h)), height)
            small = np.asarray(Image.fromarray(img).resize(wh, Image.BILINEAR))
            gt_full = views_gt[cam].get(f)
            gt = None if gt_full is None else resize_mask_nearest(gt_full, wh[::-1])
            small = overlay(small, gt, GT_COLOUR, gt, alpha=0.4)
            label = f"{role} {cam}  frame {f}  " + ("GT" if gt is not None and gt.any() else
                                                    ("GT empty" if gt is not None else "no GT"))
            if role == "target" and pred_dir:
                pp = os.path.join(pred_dir, rec.take, rec.pair, rec.obj, f + ".json")
                if os.path.isfile(pp):
                    pm = decode_mask(read_json(pp, what="prediction"), path=pp)
                    pred = resize_mask_nearest(pm, wh[::-1])
                    small = overlay(small, pred, PRED_COLOUR, pred, alpha=0.3)
                    g480 = resize_mask_nearest(gt_full, pm.shape) if gt_full is not None else np.zeros(pm.shape, bool)
                    label += f"  pred IoU {iou(pm.astype(bool), g480):.2f}"
                else:
                    label += "  no pred"
            views.append(small)
            texts.append(label)
        W = sum(v.shape[1] for v in views) + 8
        canvas = Image.new("RGB", (W, height + 22), (20, 20, 20))
        x = 0
        draw = ImageDraw.Draw(canvas)
        for v, t in zip(views, texts):
            canvas.paste(Image.fromarray(v), (x, 22))
            draw.text((x + 4, 5), t, fill=(255, 255, 255))
            x += v.shape[1] + 8
        path = os.path.join(pair_dir, f"{f}.png")
        with atomic_write(path, "wb") as fh:
            canvas.save(fh, format="PNG")
        pngs.append(path)
        frames.append(canvas)
    if frames:
        with atomic_write(os.path.join(out_dir, f"{rec.pair}.gif"), "wb") as fh:
            frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:], duration=gif_ms, loop=0)
    return pngs


def _path_problem(args):
    """A one-line message if ``--data`` / ``--take`` / ``--pred`` do not name what they must."""
    if not os.path.isdir(args.data):
        what = "not a directory" if os.path.exists(args.data) else "no such directory"
        return f"--data {args.data}: {what}"
    take_dir = os.path.join(args.data, args.take)
    if not os.path.isdir(take_dir):
        takes = sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d)))
        shown = ", ".join(takes[:5]) + (f", ... ({len(takes)} in all)" if len(takes) > 5 else "")
        return f"--take {args.take}: no take directory {take_dir} (takes: {shown or 'none'})"
    if args.pred and not os.path.isdir(args.pred):
        return f"--pred {args.pred}: no such directory"
    return None


def main(args) -> int:
    import sys

    from lmeec_jax.data.egoexo import DataError, list_take_videos, load_annotation

    problem = _path_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        ann = load_annotation(os.path.join(args.data, args.take), args.take)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recs = [r for r in list_take_videos(args.data, args.take, args.direction, annotation=ann)
            if r.obj == args.obj and (args.pair is None or r.pair == args.pair)]
    if not recs:
        objs = sorted(ann["masks"])
        print(f"no {args.direction} video for object {args.obj!r} in take {args.take} (objects: {objs})")
        return 1
    os.makedirs(args.out, exist_ok=True)
    for rec in recs:
        pngs = render_video(args.data, rec, args.out, args.pred, args.height, args.gif_ms, annotation=ann)
        print(f"{rec.pair}: {len(pngs)} frames -> {os.path.join(args.out, rec.pair)}/ and {rec.pair}.gif")
    return 0
