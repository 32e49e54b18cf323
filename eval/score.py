"""`python -m eval score`: score correspondence predictions against the GT.

    python -m eval score --gt GT.json --pred PRED.json --direction ego2exo|exo2ego \
        --protocol official|lmeec [--json OUT.json]

``official``: the EvalAI protocol of EGO4D/ego-exo4d-relation (GT from
``python -m eval build-gt``; predictions in the official JSON layout, masks at the
evaluation size: 480x480 for an aria target, long side 480 for exo, e.g. 270x480).
``lmeec``: LM-EEC's own protocol (480x480 squashed masks, confidence from the mask
area); ``--pred`` may be the inference directory
``<take>/<src>__<tgt>/<object>/<frame>.json``.

Prints IoU and BA x100 (as the papers), CA and LE as fractions; ``--json`` gets
fractions. Exit status 1 when the predictions (or the GT) are invalid.
"""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score predictions (official or LM-EEC protocol)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--gt", required=True, help="GT JSON (build-gt output; or LM-EEC's own GT file with --protocol lmeec)")
    p.add_argument("--pred", required=True, help="prediction JSON, or (--protocol lmeec) the prediction directory")
    p.add_argument("--direction", required=True, choices=("ego2exo", "exo2ego"))
    p.add_argument("--protocol", default="official", choices=("official", "lmeec"))
    p.add_argument("--json", dest="json_out", default=None, help="write the scores (fractions) and issues here")
    p.add_argument("--subset", action="store_true",
                   help="official protocol: score only GT takes present in the predictions (not an official number)")
    p.add_argument("--max-issues", type=int, default=30, help="issues to print (all go to --json)")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.evaluation.metrics import format_table, score
    from lmeec_jax.io import write_json_atomic

    if args.protocol == "official" and os.path.isdir(args.pred):
        print(f"error: {args.pred} is a directory; the official protocol needs the prediction JSON", file=sys.stderr)
        return 1
    kw = {"subset": True} if (args.subset and args.protocol == "official") else {}
    try:
        rep = score(args.gt, args.pred, args.direction, args.protocol, **kw)
    except ValueError as e:  # unreadable input files
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = sorted(rep.issues, key=lambda i: i.level != "error")[: max(args.max_issues, 0)]
    for issue in shown:
        print(issue, file=sys.stderr)
    if len(rep.issues) > len(shown):
        print(f"... {len(rep.issues) - len(shown)} more issues ({len(rep.errors)} errors, {len(rep.warnings)} warnings in all)",
              file=sys.stderr)
    if rep.errors:
        print(f"INVALID: {len(rep.errors)} errors", file=sys.stderr)
    print(format_table(rep))
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        write_json_atomic(args.json_out, rep.to_json(), indent=1)
    return 0 if rep.valid else 1
