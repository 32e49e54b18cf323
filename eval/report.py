"""`python -m eval report`: a static HTML report of one prediction run (no server, no network).

    python -m eval report --data SPLIT --pred PRED_DIR --gt GT.json --direction ego2exo|exo2ego \
        --out REPORT_DIR [--protocol official|lmeec] [--worst 20] [--all-gifs]

``--pred``: the ``eval predict`` output folder (the official protocol reads its
``predictions_<direction>.json``, LM-EEC's the per-frame files; a JSON file is read as
is); its ``predict_report_<direction>.json`` gives the settings and the failed videos.
Writes ``REPORT_DIR/index.html`` (headline = ``eval score``'s numbers, settings, failed
videos, plots, a per-video table sortable by clicking a header), ``videos/*.html`` (one
page per video; an animated GIF of source | target with GT green and prediction magenta
for the ``--worst`` N videos, or every video with ``--all-gifs``), ``plots/*.png`` and
``report.json``. Exit status 1 when the scorer finds the predictions invalid (the report
is still written), 2 for unusable arguments.
"""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="static HTML report of predictions (headline, plots, per-video pages)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="processed split directory (frames for the overlays)")
    p.add_argument("--pred", required=True, help="eval predict output folder (or a prediction JSON)")
    p.add_argument("--gt", required=True, help="GT JSON (python -m eval build-gt)")
    p.add_argument("--direction", required=True, choices=("ego2exo", "exo2ego"))
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--protocol", default="official", choices=("official", "lmeec"))
    p.add_argument("--worst", type=int, default=20, help="videos (lowest mean IoU) that get an overlay GIF")
    p.add_argument("--all-gifs", action="store_true", help="an overlay GIF for every video")
    p.add_argument("--gif-height", type=int, default=240, help="drawn height of each view in the GIFs")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.data.errors import DataError
    from lmeec_jax.evaluation.report import build_report, resolve_pred

    pred_in = resolve_pred(args.pred, args.direction, args.protocol)
    for what, path in (("--data", args.data), ("--gt", args.gt), ("--pred", pred_in)):
        if not os.path.exists(path):
            print(f"error: {what} {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        s = build_report(args.data, args.pred, args.gt, args.direction, args.out, protocol=args.protocol,
                         worst=args.worst, all_gifs=args.all_gifs, gif_height=args.gif_height)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h = s["headline"]
    if h is None:
        print("the scorer found the predictions invalid: no headline (issues listed in the report)", file=sys.stderr)
    else:
        print(f"protocol {s['protocol']}, {s['direction']}: IoU {100 * h['iou']:.2f}  CA {h['contour_accuracy']:.3f}  "
              f"LE {h['location_error']:.3f}  BA {100 * h['balanced_accuracy']:.2f}  ({h['n_samples']} samples)")
    if not s["consistent"] and h is not None:
        print("warning: per-video numbers pooled differ from the scorer's headline", file=sys.stderr)
    if s["failed"]:
        print(f"{len(s['failed'])} failed take(s)/video(s) listed in the report", file=sys.stderr)
    print(f"{s['videos']} videos, {len(s['gifs'])} GIFs in {s['seconds']:.1f} s -> "
          f"{os.path.join(args.out, 'index.html')}")
    return 0 if h is not None else 1
