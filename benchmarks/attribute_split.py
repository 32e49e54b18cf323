"""Where the time of a split prediction goes: image encoder vs tracker, (a) vs (b).

    python benchmarks/attribute_split.py [--takes 3] [--frames 8] [--exo-cams 2] [--seed 7]
        [--config sam2.1_hiera_t] [--image-size 256] [--directions ego2exo,exo2ego] [--work DIR]

The synthetic split of ``bench_split.py`` (same defaults) is predicted in mode (a) (one video
at a time, features per video) and (b) (shared features, pair batches, ``exact_batches=False``)
after a warm-up run of each, with every ``ChunkRunner.encode`` / ``track`` / ``postprocess``
/ ``run`` call blocked until ready and timed ((a) encodes inside its chunk function, so its
encoder and tracker are one fused figure). Printed per direction and mode: images encoded and ms per
image, object-frames tracked (batch slots x frames, padding included) and ms per object-frame,
and the rest (host work on the critical path). Blocking removes the overlap of host and device
work, so the walls are a little above ``bench_split.py``'s; the split into encoder and tracker
is what this script is for: the ratio (a)/(b) is bounded by
``(E_a + T_a) / (E_b + T_b)``, and where the tracker (per-object work, the same in both
modes) dominates, sharing features cannot take it further.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--takes", type=int, default=3)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--exo-cams", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--directions", default="ego2exo,exo2ego")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from lmeec_jax.data.synthetic import make_synthetic_split
    from lmeec_jax.inference import split as P
    from lmeec_jax.inference.runner import ChunkRunner
    from lmeec_jax.models.config import get_config
    from lmeec_jax.models.sam2 import build_model

    work = args.work or tempfile.mkdtemp(prefix="attribute_split_")
    split = os.path.join(work, "split")
    if not os.path.isdir(split):
        make_synthetic_split(split, args.takes, seed=args.seed, n_frames=args.frames, n_exo=args.exo_cams, workers=1)
    cfg = get_config(args.config, image_size=args.image_size, mv_moe=True, dynamic_multimask_via_stability=False)
    model = build_model(cfg, seed=0)
    runner = ChunkRunner(model, "float32")
    secs, calls = collections.defaultdict(float), collections.Counter()

    def timed(name, fn, count):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            secs[name] += time.perf_counter() - t0
            calls[name] += count(*a)
            return out
        return call

    runner.encode = timed("encode", runner.encode, lambda images: len(images))
    runner.track = timed("track", runner.track, lambda state, tgt, *r: len(tgt) * np.shape(r[1])[1])
    runner.postprocess = timed("postprocess", runner.postprocess, lambda *a: 0)
    # (a) encodes inside its chunk function (one jitted call: encoder and tracker fused)
    runner.run = timed("run", runner.run, lambda state, src, tgt, masks, proc, *r: int(np.prod(np.shape(proc))))

    def predict(direction, mode, out):
        shutil.rmtree(out, ignore_errors=True)
        share = mode == "b"
        return P.predict_split(model, split, direction, out, chunk=args.chunk,
                               max_objects=args.max_objects if share else 1, progress=False, runner=runner,
                               share_features=share, exact_batches=False, log=lambda s: None)

    print(f"{args.config} at {args.image_size}, {args.takes} takes x {args.frames} frames, aria + {args.exo_cams} "
          f"exo; float32, {os.cpu_count()} CPUs; every call blocked and timed\n")
    print("| direction | mode | wall s | images | encoder s | ms/image | object-frames | tracker s "
          "| ms/object-frame | rest s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in [x.strip() for x in args.directions.split(",") if x.strip()]:
        for mode in ("a", "b"):
            predict(d, mode, os.path.join(work, "warm"))  # compilation
            secs.clear()
            calls.clear()
            t0 = time.perf_counter()
            s = predict(d, mode, os.path.join(work, f"out_{mode}_{d}"))
            wall = time.perf_counter() - t0
            assert s.ok, s.lines()
            if mode == "a":  # fused: 2 images and 1 object-frame per step
                n, f = 2 * calls["run"], calls["run"]
                print(f"| {d} | (a) | {wall:.1f} | {n} | encoder + tracker fused: {secs['run']:.1f} s, "
                      f"{1e3 * secs['run'] / max(f, 1):.0f} ms per object-frame | {f} | | | "
                      f"{wall - secs['run']:.1f} |", flush=True)
                continue
            e, t = secs["encode"], secs["track"]
            print(f"| {d} | (b) | {wall:.1f} | {calls['encode']} | {e:.1f} | {1e3 * e / max(calls['encode'], 1):.0f} "
                  f"| {calls['track']} | {t:.1f} | {1e3 * t / max(calls['track'], 1):.0f} | {wall - e - t:.1f} |",
                  flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
