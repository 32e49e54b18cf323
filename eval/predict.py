"""`python -m eval predict`: run LM-EEC over a processed split and write its predictions.

    python -m eval predict --checkpoint DIR|random:<config> --data SPLIT_DIR \
        --direction ego2exo|exo2ego|both --out OUT_DIR [--chunk K] [--max-objects B] \
        [--batch-buckets 1,2,4,8] [--takes T1,T2] [--official-shape] \
        [--dtype float32|bfloat16] [--precision highest|default] [--no-progress] \
        [--protocol official|lmeec] [--frames official|reference] [--confidence score|area] \
        [--shard I/N] [--overwrite]

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

``--direction both`` runs the two directions at once (every camera frame of a take encoded
once for both; the same files as two runs, two official JSONs and two reports).

``--official-shape`` also writes the per-frame files at the official shape (default: the
reference's 480x480 squares, what LM-EEC's own protocol reads).
``--checkpoint random:lmeec_hiera_nano`` (or ``random:lmeec_hiera_b+``) uses random weights.
The objects of one camera pair run as one batch (per-object frame lists; padded to 1/2/4/...
``--max-objects``, or to ``--batch-buckets``), ``--chunk`` frames per jitted call, and the
image features of a (take, camera, frame) are computed once for every pair and object that
needs them: the model compiles once per batch size used.

Evaluation chains (``--protocol``, the same word as ``eval score --protocol``):

* ``official`` (default): a video's frames are the source view's GT frames of the object
  (∩ the target's ``annotated_frames`` where the annotation lists them); target masks are
  never read (a split with withheld target masks predicts the same frames);
  ``confidence`` = sigmoid(object score);
* ``lmeec``: LM-EEC's chain: the reference's frame list (source JPEGs ∩ the target's GT
  keys) and ``confidence = int(area > 0.1%)`` of the 480x480 mask (``merge_results.py``).

``--frames official|reference`` and ``--confidence score|area`` override either part; the
choice is recorded in ``predict_report_<direction>.json``.

Resuming: each video is committed (its folder renamed into place, then a completion record
``OUT_DIR/.done/<direction>/<hash>.json``); running the same command again after a crash
or Ctrl-C keeps the finished videos and predicts the rest. A folder holding a run with
other settings or another checkpoint is refused (exit 2) unless ``--overwrite``.
``--shard I/N`` predicts the takes i with i mod N == I (natural order); ``python -m eval
merge`` assembles the shards' official JSONs.

Exit status: 0 if every video was written; 1 if a take or video was skipped because of bad
input (missing / corrupt frame, malformed annotation: each named in the output) or the split
has no usable video; 2 bad arguments or output folder; 130 interrupted (SIGINT / SIGTERM).
"""

from __future__ import annotations

import sys

from eval.model_args import add_model_args, load_predictor


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="run LM-EEC on a processed split (per-frame JSONs + official JSON)",
                              description=__doc__.splitlines()[0])
    add_model_args(p, "largest object batch; batches are padded to 1/2/4/.../this (default 8)")
    p.add_argument("--data", required=True, help="processed split directory (<take>/annotation.json, <take>/<cam>/<frame>.jpg)")
    p.add_argument("--direction", required=True, choices=("ego2exo", "exo2ego", "both"),
                   help="both: the two directions in one run, each camera frame encoded once for both "
                        "(the same files as two runs)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-buckets", default=None,
                   help="comma-separated batch sizes to pad to (default 1,2,4,...,--max-objects); "
                        "e.g. the single value 8 compiles one shape for the whole split")
    p.add_argument("--takes", default=None, help="comma-separated take ids (default: every take of --data)")
    p.add_argument("--official-shape", action="store_true",
                   help="write the per-frame JSONs at the official target shape instead of 480x480")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--protocol", default="official", choices=("official", "lmeec"),
                   help="evaluation chain (frame list + confidence rule), as eval score --protocol (default official)")
    p.add_argument("--frames", default=None, choices=("official", "reference"),
                   help="override the chain's frame list (official: source GT frames; reference: LM-EEC's list)")
    p.add_argument("--confidence", default=None, choices=("score", "area"),
                   help="override the chain's confidence (score: sigmoid(object score); area: LM-EEC's area rule)")
    p.add_argument("--shard", default=None, help="I/N: predict only shard I of N (whole takes); see eval merge")
    p.add_argument("--full-batches", action="store_true",
                   help="every object of a camera pair in one batch (up to --max-objects) whatever its frame "
                        "list; by default a video keeps the padded batch size of its frame-list group, because "
                        "XLA's CPU results move in their last bits with the batch size (confidence, rarely a "
                        "mask pixel); --batch-buckets B with one size B batches a whole pair without that")
    p.add_argument("--overwrite", action="store_true",
                   help="predict again into an --out that holds a run with other settings")
    p.set_defaults(func=main)


def _check_paths(args):
    """One-line message for an unusable --data / --out, else None."""
    import os

    from lmeec_jax.io import unwritable_reason

    if not os.path.isdir(args.data):
        return f"--data {args.data}: {'not a directory' if os.path.exists(args.data) else 'no such directory'}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out}: exists and is not a directory"
    if os.path.isdir(args.out) and not os.access(args.out, os.W_OK | os.X_OK):
        return f"--out {args.out}: not writable"
    why = unwritable_reason(args.out)
    return f"--out {args.out}: not writable ({why})" if why else None


def _checkpoint_id(spec: str, seed: int) -> str:
    import os

    from lmeec_jax.io import fingerprint

    if os.path.exists(spec):
        return f"sha256:{fingerprint(spec)}"
    return f"{spec}:seed={seed}"


def main(args) -> int:
    """SIGTERM is handled as Ctrl-C: whatever is running stops, the report (if prediction
    started) says what is done, exit 130."""
    import signal

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args)
    except KeyboardInterrupt:
        which = "{ego2exo,exo2ego}" if args.direction == "both" else args.direction
        print(f"interrupted: what is done is kept (report: {args.out}/predict_report_{which}.json, if "
              "prediction had started); run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _main(args) -> int:

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
    from lmeec_jax.inference.split import CHAINS, NothingToPredict, RunMismatch, parse_shard

    msg = _check_paths(args)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frames, confidence = CHAINS[args.protocol]
    frames, confidence = args.frames or frames, args.confidence or confidence
    predictor, err = load_predictor(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = predictor.cfg
    print(f"model {cfg.name} ({args.checkpoint}), image size {cfg.image_size}, dtype {args.dtype}, "
          f"precision {predictor.runner.precision}, chunk {args.chunk}, max objects {args.max_objects}", flush=True)
    print(f"protocol {args.protocol}: frames {frames}, confidence {confidence}"
          + (f", shard {shard[0]}/{shard[1]}" if shard else ""), flush=True)
    run = {"checkpoint": _checkpoint_id(args.checkpoint, args.seed), "dtype": args.dtype,
           "precision": predictor.runner.precision, "chunk": args.chunk, "max_objects": args.max_objects,
           "batch_buckets": buckets, "protocol": args.protocol}
    if args.full_batches:
        run["full_batches"] = True
    try:
        summary = predictor.predict_split(args.data, args.direction, args.out, buckets=buckets, takes=takes,
                                          official_shape_frames=args.official_shape, progress=not args.no_progress,
                                          frames=frames, confidence=confidence, shard=shard, run=run,
                                          overwrite=args.overwrite, exact_batches=not args.full_batches)
    except (RunMismatch, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingToPredict as e:
        print(f"error: nothing to predict: {e}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1
