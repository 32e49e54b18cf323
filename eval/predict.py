"""`python -m eval predict`: run LM-EEC over a processed split and write its predictions.

    python -m eval predict --checkpoint DIR|random:<config> --data SPLIT_DIR \
        --direction ego2exo|exo2ego --out OUT_DIR [--chunk K] [--max-objects B] \
        [--batch-buckets 1,2,4,8] [--takes T1,T2] [--official-shape] \
        [--dtype float32|bfloat16] [--precision highest|default] [--no-progress]

Writes, as LM-EEC's ``tools/correspondence_inference.py`` does, one file per predicted
frame, ``OUT_DIR/<take>/<src_cam>__<tgt_cam>/<object>/<frame>.json`` = the pycocotools
RLE ``{"size": [480, 480], "counts": str}`` of the 0/1 mask (frames whose source mask is
empty or absent are skipped: no file), plus

* ``OUT_DIR/predictions_<direction>.json``: the official EvalAI submission
  (``{"ego-exo"|"exo-ego": {"version", "challenge", "results": ...}}``), masks at the
  official shape (480x480 aria target, 270x480 exo), ``confidence`` = sigmoid(object
  score); every source GT frame is present (frames without a prediction get an empty mask
  with confidence 0), so it passes the official validator;
* ``OUT_DIR/predict_report_<direction>.json``: counts, timing and every skipped video.

``--official-shape`` also writes the per-frame files at the official shape (default: the
reference's 480x480 squares, what LM-EEC's own protocol reads).
``--checkpoint random:lmeec_hiera_nano`` (or ``random:lmeec_hiera_b+``) uses random weights.
Objects of one camera pair with the same frame list run as one batch (padded to 1/2/4/...
``--max-objects``, or to ``--batch-buckets``), videos run ``--chunk`` frames per jitted
call: the model compiles once per batch size used.

Exit status: 0 if every video was written; 1 if a take or video was skipped because of bad
input (missing / corrupt frame, malformed annotation: each named in the output).
"""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="run LM-EEC on a processed split (per-frame JSONs + official JSON)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="model directory (python -m convert) or random:<config-name>, e.g. random:lmeec_hiera_nano")
    p.add_argument("--data", required=True, help="processed split directory (<take>/annotation.json, <take>/<cam>/<frame>.jpg)")
    p.add_argument("--direction", required=True, choices=("ego2exo", "exo2ego"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--chunk", type=int, default=8, help="frames per jitted call (default 8)")
    p.add_argument("--max-objects", type=int, default=8,
                   help="largest object batch; batches are padded to 1/2/4/.../this (default 8)")
    p.add_argument("--batch-buckets", default=None,
                   help="comma-separated batch sizes to pad to (default 1,2,4,...,--max-objects); "
                        "e.g. the single value 8 compiles one shape for the whole split")
    p.add_argument("--takes", default=None, help="comma-separated take ids (default: every take of --data)")
    p.add_argument("--official-shape", action="store_true",
                   help="write the per-frame JSONs at the official target shape instead of 480x480")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (float32: parity; bfloat16: like the reference's CUDA autocast)")
    p.add_argument("--precision", default=None, choices=("highest", "default"),
                   help="matmul precision (default: highest for float32, default for bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:<config> weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.models.load import MissingMVMoE
    from lmeec_jax.inference.predictor import Predictor

    if args.chunk < 1 or args.max_objects < 1:
        print("error: --chunk and --max-objects must be >= 1", file=sys.stderr)
        return 2
    takes = [t.strip() for t in args.takes.split(",") if t.strip()] if args.takes else None
    try:
        buckets = [int(b) for b in args.batch_buckets.split(",") if b.strip()] if args.batch_buckets else None
    except ValueError:
        print(f"error: --batch-buckets must be comma-separated integers, got {args.batch_buckets!r}", file=sys.stderr)
        return 2
    if buckets and (min(buckets) < 1 or max(buckets) < args.max_objects):
        print("error: --batch-buckets must be >= 1 and include a size >= --max-objects", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.load(args.checkpoint, seed=args.seed, dtype=args.dtype, precision=args.precision,
                                   chunk=args.chunk, max_objects=args.max_objects)
    except MissingMVMoE as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: cannot load the model {args.checkpoint!r}: {e}", file=sys.stderr)
        return 2
    cfg = predictor.cfg
    print(f"model {cfg.name} ({args.checkpoint}), image size {cfg.image_size}, dtype {args.dtype}, "
          f"precision {predictor.runner.precision}, chunk {args.chunk}, max objects {args.max_objects}", flush=True)
    summary = predictor.predict_split(args.data, args.direction, args.out, buckets=buckets, takes=takes,
                                      official_shape_frames=args.official_shape, progress=not args.no_progress)
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1
