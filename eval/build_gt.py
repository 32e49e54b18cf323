"""`python -m eval build-gt`: the official GT JSON from a processed split directory.

    python -m eval build-gt --data SPLIT_DIR --out GT.json [--split NAME] [--relations relations_<split>.json]

SPLIT_DIR holds ``<take>/annotation.json`` (+ ``<cam>/<frame>.jpg``). ``--split`` picks
``SPLIT_DIR/NAME`` or the takes listed under NAME in ``SPLIT_DIR/split_checking.json``
(or ``split.json``). ``annotated_frames`` come from ``--relations`` (official), else
from ``annotation.json``, else a fallback (see ``lmeec_jax/evaluation/gt.py``).
"""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("build-gt", help="build the official GT JSON from a processed split",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="processed split directory (<take>/annotation.json)")
    p.add_argument("--out", required=True, help="GT JSON to write")
    p.add_argument("--split", default=None, help="split name (sub-directory, or key of split_checking.json/split.json)")
    p.add_argument("--relations", default=None, help="raw relations_<split>.json for the official annotated_frames")
    p.add_argument("--no-check", action="store_true", help="do not validate every mask RLE")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.data.errors import DataError
    from lmeec_jax.evaluation.gt import build_gt, write_gt

    warnings = []
    try:
        gt = build_gt(args.data, split=args.split, relations=args.relations, check_masks=not args.no_check,
                      warnings=warnings)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    write_gt(gt, args.out)
    ann = gt["annotations"]
    n_obj = sum(len(t["masks"]) for t in ann.values())
    print(f"wrote {args.out}: {len(ann)} takes, {n_obj} objects "
          f"(annotated_frames from {', '.join(gt['annotated_frames_from']) or 'nothing'})")
    return 0 if ann else 1
