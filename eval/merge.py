"""`python -m eval merge`: assemble the official JSON of a split predicted in shards.

    python -m eval merge --data SPLIT --direction ego2exo|exo2ego \
        --pred SHARD_DIR [SHARD_DIR ...] --out predictions_<direction>.json

Each ``SHARD_DIR`` is the ``--out`` of one ``eval predict --shard I/N`` run (or of an
unsharded run). The shards must have been predicted with the same settings (their run
records agree: checkpoint, protocol chain, dtype, precision...). Every video of ``--data``
for the direction (listed with the shards' frame rule) must have a completion record in
one of the shards; the missing ones are named and nothing is written (exit 1). The merged
file lists the takes in the split's order, so it equals the file of an unsharded run.

Exit status: 0 merged; 1 a video or a shard's submission is missing; 2 bad arguments or
shards predicted with different settings.
"""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge the official JSONs of `eval predict --shard` runs",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="processed split directory the shards predicted")
    p.add_argument("--direction", required=True, choices=("ego2exo", "exo2ego"))
    p.add_argument("--pred", required=True, nargs="+", help="the shards' output directories")
    p.add_argument("--out", required=True, help="merged official JSON to write")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.data.errors import DataError
    from lmeec_jax.inference.split import MergeError, merge_shards

    try:
        n_takes, n_videos = merge_shards(args.data, args.direction, args.pred, args.out)
    except MergeError as e:
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.pred)} shard(s): {n_takes} takes, {n_videos} videos -> {os.path.abspath(args.out)}")
    return 0
