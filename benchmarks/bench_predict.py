"""Throughput and memory of `python -m eval predict` (the full pipeline: JPEG decoding with
prefetch, chunked jitted model, RLE encoding, per-frame JSON and official file writing).

    python benchmarks/bench_predict.py [--quick] [--model lmeec_hiera_b+] [--lengths 16,128,512]
        [--chunk 8] [--dtype float32] [--split-takes 0] [--work DIR]

A synthetic take (``lmeec_jax.data.synthetic``, aria + 1 exo camera) is rendered once
with a few frames; videos of every requested length are made from it by looping its
frames (symlinked JPEGs, annotation keys copied), keeping one object whose source mask is
present on every rendered frame, so every frame is processed. Each length runs as its own
single-video split through :func:`lmeec_jax.inference.split.predict_split`, after a warm-up run
that compiles the model (one compile: chunk K, batch 1), and reports

* wall seconds, seconds per frame and frames per second (compile excluded);
* peak RSS during the run (sampled every 20 ms; ``ru_maxrss`` is also shown, but it is
  the process peak so far) and peak bytes of live JAX arrays (``jax.live_arrays()``,
  sampled at every chunk dispatch).

Memory is bounded by design (fixed-size memory slots, image features computed per
chunk), so seconds per frame and peak memory should be flat in the video length.
``--split-takes N`` additionally runs a fresh N-take synthetic split with several objects
per take (batching) and reports its frames per second.
``--quick``: the nano model at 128 px, lengths 16 and 64 (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _live_bytes() -> int:
    return int(sum(a.nbytes for a in jax.live_arrays()))


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): unlike wall time it does
    not grow when other work shares the cores, so it shows whether the work per frame grows."""
    t = os.times()
    return t.user + t.system


def _quarters(stamps, chunk: int):
    """Wall seconds per frame between chunk dispatches in the first and the last quarter of
    a run (dispatch blocks once the device queue is full, so in the steady state the gap
    between dispatches is the chunk's compute time). The first 3 gaps are left out: while
    the queue fills, dispatches return early."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][3:]
    if len(gaps) < 4:
        return None, None
    q = len(gaps) // 4
    return sum(gaps[:q]) / (q * chunk), sum(gaps[-q:]) / (q * chunk)


def _mib(b) -> str:
    return f"{b / 2**20:8.1f}"


def make_looped_split(base_split: str, take: str, obj: str, out_split: str, length: int) -> str:
    """A split holding one take whose videos have ``length`` frames: frame i (named 30*i)
    is the rendered frame i mod n of ``take`` (JPEG symlinks; annotations copied), with only
    object ``obj`` in the annotation."""
    src_dir = os.path.join(base_split, take)
    ann = json.load(open(os.path.join(src_dir, "annotation.json")))
    cams = sorted(d for d in os.listdir(src_dir) if os.path.isdir(os.path.join(src_dir, d)))
    names = sorted((f[:-4] for f in os.listdir(os.path.join(src_dir, cams[0])) if f.endswith(".jpg")), key=int)
    n = len(names)
    new_take = f"loop{length}"
    dst = os.path.join(out_split, new_take)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    masks = {}
    for cam in cams:
        os.makedirs(os.path.join(dst, cam))
        for i in range(length):
            os.symlink(os.path.abspath(os.path.join(src_dir, cam, names[i % n] + ".jpg")),
                       os.path.join(dst, cam, f"{30 * i}.jpg"))
        keys = ann["masks"][obj].get(cam) or {}
        masks[cam] = {str(30 * i): keys[names[i % n]] for i in range(length) if names[i % n] in keys}
    with open(os.path.join(dst, "annotation.json"), "w") as f:
        json.dump({"masks": {obj: masks}, "subsample_idx": [30 * i for i in range(length)]}, f)
    return new_take


def _pick_object(split: str, take: str) -> str:
    """An object annotated on every rendered frame of both cameras (most frames if none)."""
    ann = json.load(open(os.path.join(split, take, "annotation.json")))
    best, score = None, -1
    for obj, cams in ann["masks"].items():
        if "aria01" not in cams or "cam01" not in cams:
            continue
        s = min(len(cams["aria01"]), len(cams["cam01"]))
        if s > score:
            best, score = obj, s
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="nano model, lengths 16,64")
    ap.add_argument("--model", default=None, help="config name (default lmeec_hiera_b+; --quick: lmeec_hiera_nano)")
    ap.add_argument("--lengths", default=None, help="video lengths (default 16,128,512; --quick: 16,64)")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=1, help="runs per length; the fastest is reported")
    ap.add_argument("--render-frames", type=int, default=8, help="frames rendered (then looped)")
    ap.add_argument("--split-takes", type=int, default=0, help="also time an N-take multi-object split")
    ap.add_argument("--max-objects", type=int, default=8)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args(argv)
    model_name = args.model or ("lmeec_hiera_nano" if args.quick else "lmeec_hiera_b+")
    lengths = [int(x) for x in (args.lengths or ("16,64" if args.quick else "16,128,512")).split(",")]

    from lmeec_jax.inference import split as P
    from lmeec_jax.data.synthetic import make_synthetic_split

    work = args.work or tempfile.mkdtemp(prefix="bench_predict_")
    os.makedirs(work, exist_ok=True)
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), cores={os.cpu_count()}, "
          f"model={model_name}, chunk={args.chunk}, dtype={args.dtype}, work={work}", flush=True)

    t0 = time.perf_counter()
    base = os.path.join(work, "base")
    take = make_synthetic_split(base, 1, seed=7, n_frames=args.render_frames, n_exo=1, workers=1)[0]
    obj = _pick_object(base, take)
    print(f"rendered {args.render_frames} frames in {time.perf_counter() - t0:.1f} s; object {obj!r}", flush=True)

    t0 = time.perf_counter()
    from lmeec_jax.models.load import load as load_model_spec

    model, cfg = load_model_spec(f"random:{model_name}")
    print(f"model built in {time.perf_counter() - t0:.1f} s (image size {cfg.image_size})", flush=True)

    class SampledRunner(P.ChunkRunner):
        """Samples live JAX bytes at every tracker-chunk dispatch (no host sync added); RSS is
        sampled by a background thread every 20 ms while a run is going."""

        peak_rss = 0
        peak_live = 0
        stamps: list = []

        def _sample(self):
            self.peak_live = max(self.peak_live, _live_bytes())
            self.stamps.append(time.perf_counter())

        def run(self, *a, **kw):  # the per-video path (features inside the chunk)
            out = super().run(*a, **kw)
            self._sample()
            return out

        def track(self, *a, **kw):  # predict_split's path (features shared, ChunkRunner.encode)
            out = super().track(*a, **kw)
            self._sample()
            return out

    def sample_rss(stop: threading.Event):
        while not stop.wait(0.02):
            runner.peak_rss = max(runner.peak_rss, _rss_bytes())

    runner = SampledRunner(model, args.dtype)
    loops = os.path.join(work, "loops")
    outs = os.path.join(work, "out")

    def run(length: int):
        t = make_looped_split(base, take, obj, loops, length)
        out = os.path.join(outs, t)
        shutil.rmtree(out, ignore_errors=True)
        runner.peak_rss = runner.peak_live = 0
        runner.stamps = []
        cpu0 = _cpu_seconds()
        stop = threading.Event()
        th = threading.Thread(target=sample_rss, args=(stop,), daemon=True)
        th.start()
        try:
            s = P.predict_split(model, loops, "ego2exo", out, chunk=args.chunk, max_objects=1, takes=[t],
                                progress=False, runner=runner)
        finally:
            stop.set()
            th.join()
        if not s.ok or s.frames != length:
            raise SystemExit(f"benchmark run failed: {s.lines()}")
        s.cpu_seconds = _cpu_seconds() - cpu0
        s.stamps = list(runner.stamps)
        return s

    t0 = time.perf_counter()
    warm = run(args.chunk)  # compiles (chunk K, batch 1) + the small upsampling jit
    print(f"warm-up ({args.chunk} frames, compile included): {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for L in lengths:
        best, peak_rss, peak_live = None, 0, 0
        for _ in range(max(1, args.repeats)):
            s = run(L)
            peak_rss, peak_live = max(peak_rss, runner.peak_rss), max(peak_live, runner.peak_live)
            if best is None or s.seconds < best.seconds:
                best = s
        s = best
        runner.peak_rss, runner.peak_live = peak_rss, peak_live
        first_q, last_q = _quarters(s.stamps, args.chunk)
        row = dict(frames=L, predicted=s.frames_predicted, seconds=s.seconds, s_per_frame=s.seconds / L,
                   cpu_s_per_frame=s.cpu_seconds / L, first_quarter_s_per_frame=first_q,
                   last_quarter_s_per_frame=last_q, fps=L / s.seconds, peak_rss=runner.peak_rss, maxrss=_maxrss_bytes(), peak_live=runner.peak_live)
        rows.append(row)
        print(f"  {L} frames: {s.seconds:.1f} s, {row['s_per_frame'] * 1e3:.0f} ms/frame, "
              f"CPU {row['cpu_s_per_frame'] * 1e3:.0f} ms/frame, "
              + (f"first/last quarter {first_q * 1e3:.0f}/{last_q * 1e3:.0f} ms/frame, " if first_q else "") +
              f"peak RSS {row['peak_rss'] / 2**20:.0f} MiB, live JAX {row['peak_live'] / 2**20:.0f} MiB", flush=True)

    split_row = None
    if args.split_takes > 0:
        sp = os.path.join(work, "split")
        make_synthetic_split(sp, args.split_takes, seed=11, n_frames=args.render_frames, n_exo=1, workers=1)
        out = os.path.join(outs, "split")
        shutil.rmtree(out, ignore_errors=True)
        before = set(runner.compiled)
        s = P.predict_split(model, sp, "ego2exo", out, chunk=args.chunk, max_objects=args.max_objects,
                            progress=True, runner=runner)
        split_row = dict(takes=args.split_takes, videos=s.videos_written, frames=s.frames, predicted=s.frames_predicted,
                         seconds=s.seconds, fps=s.fps, new_compiles=sorted(set(runner.compiled) - before))

    print()
    print(f"eval predict, {model_name} at {cfg.image_size} px, {args.dtype}, chunk {args.chunk}, batch 1, "
          f"{jax.default_backend()} ({os.cpu_count()} cores); compile excluded")
    print(f"{'frames':>7} {'seconds':>9} {'ms/frame':>9} {'CPU ms/fr':>9} {'frames/s':>9} {'peak RSS MiB':>13} "
          f"{'maxrss MiB':>11} {'live JAX MiB':>13}")
    for r in rows:
        print(f"{r['frames']:7d} {r['seconds']:9.1f} {r['s_per_frame'] * 1e3:9.0f} {r['cpu_s_per_frame'] * 1e3:9.0f} "
              f"{r['fps']:9.3f} "
              f"{_mib(r['peak_rss']):>13} {_mib(r['maxrss']):>11} {_mib(r['peak_live']):>13}")
    spf = [r["s_per_frame"] for r in rows]
    spread = max(spf) / min(spf) - 1 if spf else float("nan")
    print(f"per-frame time spread (max/min - 1): {spread * 100:.1f}% "
          f"({'flat within 10%' if spread <= 0.10 else 'NOT flat within 10%'})")
    cpf = [r["cpu_s_per_frame"] for r in rows]
    cspread = max(cpf) / min(cpf) - 1 if cpf else float("nan")
    print(f"per-frame CPU time spread (max/min - 1): {cspread * 100:.1f}% "
          f"({'flat within 10%' if cspread <= 0.10 else 'NOT flat within 10%'})")
    if split_row:
        print(f"split of {split_row['takes']} takes: {split_row['videos']} videos, {split_row['frames']} object-frames "
              f"in {split_row['seconds']:.1f} s = {split_row['fps']:.3f} object-frames/s "
              f"(new compiles {split_row['new_compiles']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(model=model_name, chunk=args.chunk, dtype=args.dtype, backend=jax.default_backend(),
                           cores=os.cpu_count(), warmup_seconds=warm.seconds, rows=rows, split=split_row,
                           spread=spread), f, indent=2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
