"""`python -m eval make-synthetic`: write a synthetic ego-exo split in the processed layout."""

from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    from lmeec_jax.data.synthetic import PATTERNS, SynthConfig

    d = SynthConfig()  # the generator's defaults
    p = subparsers.add_parser(
        "make-synthetic",
        help="render synthetic ego-exo takes (processed EgoExo4D layout)",
        description="Render synthetic takes (aria01 704x704 + cam01.. 960x540, COCO RLE masks) into --out. "
        "Idempotent: takes already written are skipped.",
    )
    p.add_argument("--out", required=True, help="split directory to write (<out>/<take>/...)")
    p.add_argument("--takes", type=int, required=True, help="number of takes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=d.n_frames, help="frames per take (named 0, 30, 60, ...)")
    p.add_argument("--exo-cams", type=int, default=d.n_exo, help="exocentric cameras per take")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cpus))")
    p.add_argument("--render-div", type=int, default=d.render_div, choices=(1, 2, 4),
                   help="render at 1/N of the JPEG size, then upsample (nearest)")
    p.add_argument("--frame-size-masks", action="store_true",
                   help="masks at the JPEG size instead of the raw camera size (2x ego, 4x exo)")
    p.add_argument("--split-name", default="train", help="key used in <out>/split.json")
    p.add_argument("--object-scale", type=float, default=d.object_scale, help="multiply every object's size")
    p.add_argument("--exo-distance", type=float, nargs=2, default=d.exo_distance, metavar=("MIN", "MAX"),
                   help="exocentric camera distance to the table, metres")
    p.add_argument("--p-lookalike", type=float, default=d.p_lookalike,
                   help="probability of a look-alike distractor per object")
    p.add_argument("--p-small", type=float, default=d.p_small, help="probability of a small object")
    p.add_argument("--patterns", default=",".join(d.patterns),
                   help=f"object textures to draw from (comma-separated: {','.join(PATTERNS)})")
    p.add_argument("--distinct-colours", action="store_true", help="no two objects share a main colour")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.data.synthetic import make_synthetic_split

    t0 = time.time()
    try:
        takes = make_synthetic_split(
            args.out,
            args.takes,
            seed=args.seed,
            n_frames=args.frames,
            n_exo=args.exo_cams,
            workers=args.workers,
            render_div=args.render_div,
            raw_masks=not args.frame_size_masks,
            progress=True,
            split_name=args.split_name,
            object_scale=args.object_scale,
            exo_distance=tuple(args.exo_distance),
            p_lookalike=args.p_lookalike,
            p_small=args.p_small,
            patterns=tuple(x.strip() for x in args.patterns.split(",") if x.strip()),
            distinct_colours=args.distinct_colours,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    print(f"{len(takes)} takes in {args.out} ({dt:.1f} s, {len(takes) / max(dt, 1e-9):.2f} takes/s)")
    return 0
