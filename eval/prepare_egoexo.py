"""`python -m eval prepare-egoexo`: raw EgoExo4D takes -> processed layout (official process_data.py)."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-egoexo",
        help="turn raw EgoExo4D takes + relations json into the processed layout",
        description="Every 30th frame of frame_aligned_videos/<cam>.mp4 (aria /2, exo /4, OpenCV INTER_LINEAR "
        "arithmetic), masks from relations_<split>.json as COCO RLE. Resumable: takes with an annotation.json "
        "are skipped. Needs PyAV for mp4 (pip install av); a directory of frame images per camera also works.",
    )
    p.add_argument("--takepath", required=True, help="EgoExo4D take root (<takepath>/<take_name>/frame_aligned_videos/)")
    p.add_argument("--annotations", required=True, help="relations_<split>.json")
    p.add_argument("--split-file", required=True, help="split.json ({'train': [...], 'val': [...], 'test': [...]})")
    p.add_argument("--split", required=True, help="train / val / test")
    p.add_argument("--out", required=True, help="output split directory")
    p.add_argument("--takes", nargs="*", default=None, help="only these take uids")
    p.add_argument("--min-height", type=int, default=1408,
                   help="frames lower than this are not written (official: 1408)")
    p.add_argument("--report", default=None, help="write the report json here (default <out>/prepare_report_<split>.json)")
    p.set_defaults(func=main)


def main(args) -> int:
    from lmeec_jax.data.prepare import prepare_split
    from lmeec_jax.io import write_json_atomic

    rep = prepare_split(args.takepath, args.annotations, args.split_file, args.split, args.out,
                        takes=args.takes, min_height=args.min_height, progress=True)
    print(rep.summary())
    path = args.report or os.path.join(args.out, f"prepare_report_{args.split}.json")
    write_json_atomic(path, {"done": rep.done, "skipped": rep.skipped, "failed": rep.failed, "warnings": rep.warnings},
                      indent=1)
    print(f"report: {path}")
    return 0
