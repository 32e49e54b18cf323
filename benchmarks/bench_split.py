"""Split-level speed: (a) the reference's way vs (b) ours, and the PyTorch reference, same run.

    python benchmarks/bench_split.py [--takes 3] [--frames 6] [--exo-cams 2] \
        [--config sam2.1_hiera_t] [--image-size 256] [--chunk 8] [--max-objects 8] \
        [--directions ego2exo,exo2ego] [--torch auto|off] [--ref /tmp/ref/juneyeeHu+LM-EEC] \
        [--work DIR] [--keep]

A synthetic split (``python -m eval make-synthetic``: ``--takes`` takes, each with 4-7
objects, aria + ``--exo-cams`` exo cameras) is predicted, per direction, by

* (a) ``predict_split(share_features=False, max_objects=1)``: one video at a time, every
  video encoding its own frames (both views of every frame, inside its chunks), as the
  reference does (``tools/correspondence_inference.py`` loops over videos);
* (b) ``predict_split(exact_batches=False)``: every object of a camera pair in one batch
  (per-object frame lists) and each (take, camera, frame) encoded once for every pair and
  object (``eval predict --full-batches``; the default keeps a video whose frame list no
  other object shares alone, for bit-exact official confidences);
* (b, both) ``direction="both"``: the two directions in one pass (features shared by both);
* (torch) where torch and the LM-EEC checkout are present: LM-EEC's own predictor
  (``build_sam2_video_predictor_ego`` + ``init_state`` + ``propagate_in_video``, driven
  as ``tests/lmeec_ref/driver.py`` drives it, on CPU in float32) over the same videos,
  one at a time, in a subprocess (its ``sam2`` package clashes with PyPI's).

The JAX model is ``--config`` at ``--image-size`` with MV_MoE and random weights (the
PyTorch one the same architecture, randomised by the driver); both float32. Each JAX mode
is run once first (compilation), then timed. Printed per direction and mode: encoder
calls (images through the encoder), video-frames (the (video, frame) steps of the
videos, skipped frames included) per second, wall seconds, peak RSS during the run (MB),
and the ratio to (b). (a) and (b) compute the same thing (with the default ``--protocol
lmeec`` the confidence is the mask area rule, insensitive to last bits); but (b) packs objects
of different frame-list groups into one batch, and XLA's CPU results are not bit-invariant in
the batch size, so a few files may differ in a pixel: the count of identical files is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DRIVER = os.path.join(ROOT, "tests", "lmeec_ref", "driver.py")
DEFAULT_REF = "/tmp/ref/juneyeeHu+LM-EEC"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _rss_mb())

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _tree_files(*out_dirs: str) -> dict:
    """{relative path: sha256} of every output file of the folders (taken together) except
    reports and completion records."""
    files = {}
    for out_dir in out_dirs:
        for dp, dns, fns in os.walk(out_dir):
            dns[:] = [d for d in dns if d != ".done"]
            for fn in fns:
                if not fn.startswith("predict_report"):
                    with open(os.path.join(dp, fn), "rb") as f:
                        files[os.path.relpath(os.path.join(dp, fn), out_dir)] = hashlib.sha256(f.read()).hexdigest()
    return files


def _tree_sha(*out_dirs: str) -> tuple:
    """(count, sha256) of the files of :func:`_tree_files`, by relative path."""
    files = _tree_files(*out_dirs)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + bytes.fromhex(files[rel]))
    return len(files), h.hexdigest()


def _videos(split, direction, frames):
    from lmeec_jax.data import egoexo

    return egoexo.list_videos(split, direction, frames=frames)


# ----------------------------------------------------------------------------- torch side


def torch_worker(args) -> int:
    """Run in a subprocess: LM-EEC's predictor over the videos of ``args.videos`` (JSON)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmeec_ref_driver", DRIVER)
    drv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drv)
    build_fn = drv._import_reference(args.ref)
    import numpy as np
    import torch

    ns = argparse.Namespace(config=args.ref_config, ckpt=None, image_size=args.image_size)
    predictor = drv.build(ns, build_fn)
    drv.randomize_(predictor, 0)
    predictor.eval()
    calls = [0]
    orig = predictor.forward_image

    def counted(*a, **k):  # LM-EEC's forward_image(ego_batch, exo_batch): images of every batch
        calls[0] += sum(int(x.shape[0]) for x in list(a) + list(k.values()) if hasattr(x, "shape"))
        return orig(*a, **k)

    predictor.forward_image = counted
    jobs = json.load(open(args.videos))
    out = {}
    for d, vids in jobs.items():
        def one(v):
            with torch.inference_mode():
                st = predictor.init_state(ego_video_path=os.path.join(args.split, v["take"], v["src"]),
                                          exo_video_path=os.path.join(args.split, v["take"], v["tgt"]),
                                          video_frames=v["frames"], async_loading_frames=False)
                masks = dict(np.load(v["masks"]))
                ego = {f: masks[f] for f in v["frames"] if f in masks and masks[f].any()}
                n = 0
                for _ in predictor.propagate_in_video(st, ego, v["frames"]):
                    n += 1
            return n

        one(vids[0])  # warm-up (allocator, threads)
        calls[0] = 0
        t0 = time.perf_counter()
        frames = 0
        for v in vids:
            one(v)
            frames += len(v["frames"])
        dt = time.perf_counter() - t0
        out[d] = dict(seconds=dt, frames=frames, encoder_calls=calls[0],
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    json.dump(out, open(args.result, "w"))
    return 0


def run_torch(args, split, work, directions, frames):
    from lmeec_jax.data import egoexo
    import numpy as np

    jobs = {}
    for d in directions:
        vids = []
        for i, r in enumerate(_videos(split, d, frames)):
            ann = egoexo.load_annotation(os.path.join(split, r.take), r.take)
            view = egoexo.ViewMasks(ann, r.take, r.obj, r.src_cam)
            path = os.path.join(work, f"masks_{d}_{i}.npz")
            np.savez(path, **{f: view.get(f) for f in r.frames if f in view})
            vids.append(dict(take=r.take, src=r.src_cam, tgt=r.tgt_cam, frames=list(r.frames), masks=path))
        jobs[d] = vids
    vpath, rpath = os.path.join(work, "torch_videos.json"), os.path.join(work, "torch_result.json")
    json.dump(jobs, open(vpath, "w"))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("LMEEC_REF_THREADS", str(os.cpu_count() or 2))
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--ref", args.ref, "--ref-config",
           args.ref_config, "--image-size", str(args.image_size), "--split", split, "--videos", vpath,
           "--result", rpath]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(DRIVER))
    if r.returncode != 0:
        print(f"torch reference failed ({r.returncode}): {r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.load(open(rpath))


def keep_objects(split: str, n: int) -> None:
    """Prune every take's annotation to its ``n`` objects with the most aria mask frames."""
    from lmeec_jax.data import egoexo
    from lmeec_jax.io import write_json_atomic

    for take in sorted(os.listdir(split)):
        path = os.path.join(split, take, egoexo.ANNOTATION_FILE)
        if not os.path.isfile(path):
            continue
        ann = egoexo.load_annotation(os.path.join(split, take), take)
        seen = lambda obj: sum(len(fr) for cam, fr in ann["masks"][obj].items() if cam.startswith("aria"))
        objs = sorted(ann["masks"], key=lambda o: -seen(o))[:n]
        ann["masks"] = {o: ann["masks"][o] for o in ann["masks"] if o in objs}
        write_json_atomic(path, ann)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--takes", type=int, default=3)
    p.add_argument("--frames", type=int, default=8, help="frames per take (8: one whole chunk, no padding)")
    p.add_argument("--exo-cams", type=int, default=2)
    p.add_argument("--objects", type=int, default=0,
                   help="keep only this many objects per take (those the aria view sees on most frames; "
                        "0: all, 4-7). --takes 1 --objects 1 --exo-cams 1 --directions ego2exo: one video")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", default="sam2.1_hiera_t", help="JAX model config (random weights, MV_MoE on); "
                   "the single-video row of the issue: lmeec_hiera_b+ with --ref-config "
                   "configs/sam2.1/sam2.1_hiera_b+.yaml --image-size 480")
    p.add_argument("--ref-config", default="configs/sam2.1/sam2.1_hiera_t.yaml", help="the reference's config")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--protocol", default="lmeec", choices=("official", "lmeec"),
                   help="lmeec (default): LM-EEC's frame lists and area confidence, what its script predicts")
    p.add_argument("--directions", default="ego2exo,exo2ego")
    p.add_argument("--torch", default="auto", choices=("auto", "off"))
    p.add_argument("--ref", default=os.environ.get("LMEEC_REF", DEFAULT_REF))
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split", default=None, help=argparse.SUPPRESS)
    p.add_argument("--videos", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args)

    sys.path.insert(0, ROOT)
    from lmeec_jax.data.synthetic import make_synthetic_split
    from lmeec_jax.inference import split as P
    from lmeec_jax.inference.runner import ChunkRunner
    from lmeec_jax.models.config import get_config
    from lmeec_jax.models.sam2 import build_model

    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    frames, confidence = P.CHAINS[args.protocol]
    work = args.work or tempfile.mkdtemp(prefix="bench_split_")
    os.makedirs(work, exist_ok=True)
    split = os.path.join(work, "split")
    make_synthetic_split(split, args.takes, seed=args.seed, n_frames=args.frames, n_exo=args.exo_cams, workers=1)
    if args.objects:
        keep_objects(split, args.objects)
    cfg = get_config(args.config, image_size=args.image_size, mv_moe=True, dynamic_multimask_via_stability=False)
    model = build_model(cfg, seed=0)
    runner = ChunkRunner(model, "float32")
    n_vid = {d: len(_videos(split, d, frames)) for d in directions}
    print(f"split: {args.takes} takes x {args.frames} frames, aria + {args.exo_cams} exo cameras; "
          f"videos {n_vid}; model {args.config} at {args.image_size} (random weights, MV_MoE), float32, "
          f"chunk {args.chunk}, {os.cpu_count()} CPUs", flush=True)

    def predict(direction, out, share, stats=None):
        shutil.rmtree(out, ignore_errors=True)
        return P.predict_split(model, split, direction, out, chunk=args.chunk,
                               max_objects=args.max_objects if share else 1, progress=False, runner=runner,
                               frames=frames, confidence=confidence, share_features=share, stats=stats,
                               exact_batches=False, log=lambda s: None)

    modes = [("a", False), ("b", True)]
    # compile: every shape of both modes (first take only for (a): always chunk x 1)
    t0 = time.perf_counter()
    for d in directions:
        predict(d, os.path.join(work, "warm_b"), True)
    first = sorted(os.listdir(split))[0]
    for d in directions:
        shutil.rmtree(os.path.join(work, "warm_a"), ignore_errors=True)
        P.predict_split(model, split, d, os.path.join(work, "warm_a"), chunk=args.chunk, max_objects=1,
                        progress=False, runner=runner, frames=frames, confidence=confidence,
                        share_features=False, takes=[first], log=lambda s: None)
    print(f"compile + warm-up: {time.perf_counter() - t0:.1f} s ({len(runner.compiled)} tracker shapes)", flush=True)

    rows = []
    shas, trees = {}, {}
    for d in directions:
        for name, share in modes:
            stats = P.TakeStats()
            out = os.path.join(work, f"out_{name}_{d}")
            compiled = set(runner.compiled)
            with PeakRSS() as mem:
                t = time.perf_counter()
                s = predict(d, out, share, stats)
                dt = time.perf_counter() - t
            assert s.ok, s.lines()
            shas[(name, d)] = _tree_sha(out)
            trees[(name, d)] = _tree_files(out)
            rows.append(dict(direction=d, mode=name, encoder_calls=stats.frames_encoded, video_frames=s.frames,
                             seconds=dt, fps=s.frames / dt, peak_mb=mem.peak,
                             new_compiles=len(runner.compiled - compiled)))
    if len(directions) == 2:
        stats = P.TakeStats()
        out = os.path.join(work, "out_b_both")
        with PeakRSS() as mem:
            t = time.perf_counter()
            s = predict("both", out, True, stats)
            dt = time.perf_counter() - t
        assert s.ok, s.lines()
        fr = sum(x.frames for x in s.summaries.values())
        rows.append(dict(direction="both", mode="b", encoder_calls=stats.frames_encoded, video_frames=fr,
                         seconds=dt, fps=fr / dt, peak_mb=mem.peak, new_compiles=0))
        both_sha = _tree_sha(out)
    same_ab = {}
    for d in directions:
        a, b = trees[("a", d)], trees[("b", d)]
        same_ab[d] = (sum(a[k] == b.get(k) for k in a), len(a), len(b))
    torch_res = None
    if args.torch == "auto":
        try:
            import torch  # noqa: F401
            have = os.path.isdir(os.path.join(args.ref, "sam2"))
        except ImportError:
            have = False
        if have:
            print("timing the PyTorch reference (LM-EEC checkout, CPU, float32) ...", flush=True)
            torch_res = run_torch(args, split, work, directions, frames)
        else:
            print(f"PyTorch reference skipped (torch or the LM-EEC checkout {args.ref} missing)")
    if torch_res:
        for d in directions:
            r = torch_res[d]
            rows.append(dict(direction=d, mode="torch", encoder_calls=r["encoder_calls"], video_frames=r["frames"],
                             seconds=r["seconds"], fps=r["frames"] / r["seconds"], peak_mb=r["peak_mb"],
                             new_compiles=0))

    bsec = {r["direction"]: r["seconds"] for r in rows if r["mode"] == "b"}
    label = {"a": "(a) per video, features per video", "b": "(b) ours: shared features, pair batches",
             "torch": "PyTorch LM-EEC, per video"}
    print()
    print(f"| direction | mode | encoder calls (images) | video-frames | video-frames/s | wall s | peak RSS MB | "
          f"time / (b) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / bsec[r["direction"]]
        print(f"| {r['direction']} | {label[r['mode']]} | {r['encoder_calls']} | {r['video_frames']} | "
              f"{r['fps']:.2f} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {ratio:.2f} |")
    if len(directions) == 2:
        sep = sum(bsec[d] for d in directions)
        print(f"\nboth directions in one pass: {bsec['both']:.1f} s vs {sep:.1f} s as two (b) runs "
              f"({sep / bsec['both']:.2f}x)")
    print("(a) vs (b), identical output files (per-frame masks + predictions JSON; (b) packs objects of other "
          "frame-list groups together, which moves last bits): " +
          ", ".join(f"{d}: {n} of {na} ((b) wrote {nb})" for d, (n, na, nb) in same_ab.items()))
    same = True
    if len(directions) == 2:
        sep_sha = _tree_sha(*(os.path.join(work, f"out_b_{d}") for d in directions))
        print(f"(b, both): {both_sha[0]} files sha256 {both_sha[1][:16]}; the two (b) runs together: "
              f"{sep_sha[0]} files sha256 {sep_sha[1][:16]}: {'same' if both_sha == sep_sha else 'DIFFERENT'}")
        same = same and both_sha == sep_sha
    if args.json:
        json.dump(dict(rows=rows, same=same), open(args.json, "w"), indent=1)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
