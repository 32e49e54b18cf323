"""`python -m eval score`: score correspondence predictions against the GT.

    python -m eval score --gt GT.json --pred PRED.json --direction ego2exo|exo2ego \
        --protocol official|lmeec [--json OUT.json]

``official``: the EvalAI protocol of EGO4D/ego-exo4d-relation (GT from
``python -m eval build-gt``; predictions in the official JSON layout, masks at the
evaluation size: 480x480 for an aria target, long side 480 for exo, e.g. 270x480).
``lmeec``: LM-EEC's own protocol (480x480 squashed masks, confidence from the mask
area); ``--pred`` may be the inference directory
``<take>/<src>__<tgt>/<object>/<frame>.json``.

Prints the chain the predictions were made with (from ``predict_report_<direction>.json``
beside them: frame list and confidence rule), then IoU and BA x100 (as the papers), CA and
LE as fractions; ``--json`` gets fractions. ``--protocol lmeec`` on a prediction JSON
reproduces LM-EEC's numbers only from 480x480 masks predicted with LM-EEC's chain
(``eval predict --protocol lmeec``); otherwise it refuses and names the folder to pass.

Exit status 1 when the predictions (or the GT) are invalid; 2 when the arguments cannot
be used (an official JSON under ``--protocol lmeec``, an unwritable ``--json``).
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


def _chain(pred: str, direction: str):
    """The ``run`` record of the predict report beside ``pred`` (folder or JSON), or None."""
    import json

    folder = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    try:
        with open(os.path.join(folder, f"predict_report_{direction}.json")) as f:
            run = json.load(f).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def _lmeec_json_refusal(pred: str, direction: str, run) -> str:
    """Why ``--protocol lmeec`` cannot give LM-EEC's numbers from the JSON ``pred`` ('' if it can)."""
    from lmeec_jax.evaluation.protocol import EVAL_SIZE, TASK_KEYS
    from lmeec_jax.io import read_json

    folder = os.path.dirname(os.path.abspath(pred))
    if run is not None and (run.get("frames"), run.get("confidence")) != ("reference", "area"):
        return (f"{pred} was predicted with frames {run.get('frames')}, confidence {run.get('confidence')}: not "
                f"LM-EEC's chain; pass --protocol official, or predict with --protocol lmeec and pass its folder")
    try:
        results = read_json(pred)[TASK_KEYS[direction]]["results"]
        sizes = {tuple(e["pred_mask"]["size"]) for t in results.values() for p in t["masks"].values()
                 for fr in p.values() for e in fr.values()}
    except Exception:  # malformed: the scorer names the problem
        return ""
    if sizes - {(EVAL_SIZE, EVAL_SIZE)}:
        hint = f"--pred {folder}" if run is not None else "the per-frame prediction folder"
        return (f"{pred} holds masks at the official shape ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}), "
                f"LM-EEC's protocol compares {EVAL_SIZE}x{EVAL_SIZE} masks: pass {hint} instead")
    return ""


def main(args) -> int:
    from lmeec_jax.evaluation.metrics import format_table, score
    from lmeec_jax.io import unwritable_reason, write_json_atomic

    if args.protocol == "official" and os.path.isdir(args.pred):
        print(f"error: {args.pred} is a directory; the official protocol needs the prediction JSON", file=sys.stderr)
        return 1
    why = args.json_out and ("a folder" if os.path.isdir(args.json_out) else unwritable_reason(args.json_out))
    if why:
        print(f"error: --json {args.json_out}: cannot write there ({why})", file=sys.stderr)
        return 2
    run = _chain(args.pred, args.direction) if os.path.exists(args.pred) else None
    if run is not None:
        print(f"predictions: protocol {run.get('protocol')}, frames {run.get('frames')}, "
              f"confidence {run.get('confidence')}, precision {run.get('precision')}, dtype {run.get('dtype')}")
        if args.protocol == "lmeec" and os.path.isdir(args.pred) and run.get("frames") != "reference":
            print(f"note: {args.pred} was predicted with frames {run.get('frames')}: LM-EEC's protocol scores it, "
                  "but these are not LM-EEC's numbers (predict with --protocol lmeec for those)", file=sys.stderr)
    if args.protocol == "lmeec" and os.path.isfile(args.pred):
        why = _lmeec_json_refusal(args.pred, args.direction, run)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
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
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            write_json_atomic(args.json_out, rep.to_json(), indent=1)
        except OSError as e:
            print(f"error: --json {args.json_out}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if rep.valid else 1
