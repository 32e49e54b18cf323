"""Time the jitted JAX image encoder (Hiera + FPN) against the torch sam2==1.1.0 reference.

    python benchmarks/bench_image_encoder.py [--quick] [--sizes 480,1024] [--batches 1,4]

Both run float32 on the CPU in the same process with the same random weights; the torch
and JAX calls alternate (so load from other processes hits both alike). Torch gets ``torch.set_num_threads(--threads)`` (default:
the number of cores, which is the size of XLA's CPU thread pool) and runs under
``torch.inference_mode``. Warm-up calls (incl. jit compilation) are excluded; the table
shows the median ms per call and the ratio torch/jax (> 1: JAX is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def _timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _interleaved_median_ms(fns: dict, repeats: int, warmup: int) -> dict:
    """Median ms per call of each fn; the fns alternate call by call so that load from
    other processes on a shared CPU hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed_ms(fn))
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base_plus", choices=["tiny", "small", "base_plus", "large"])
    ap.add_argument("--sizes", default="480,1024")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 warm-up call and 2 timed calls per setting")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args(argv)
    repeats, warmup = (2, 1) if args.quick else (args.repeats, 1)

    import torch
    from tests.reference import numpy_state_dict, reference_model, to_nchw
    from tests.test_image_encoder import build_image_encoder
    from lmeec_jax.models.weights import load_state_dict

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"threads={torch.get_num_threads()}, cores={os.cpu_count()}, model={args.model}, "
          f"repeats={repeats}, warmup={warmup}")

    fwd = nnx.jit(lambda m, x: m(x))
    rows = []
    for image_size in [int(s) for s in args.sizes.split(",")]:
        ref = reference_model(args.model, image_size).image_encoder
        model = nnx.eval_shape(lambda: build_image_encoder(args.model))
        load_state_dict(model, numpy_state_dict(ref))
        for batch in [int(b) for b in args.batches.split(",")]:
            x = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
            xj = jnp.asarray(x)
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(model, xj))  # compilation
            compile_s = time.perf_counter() - t0
            fns = {"jax": lambda: jax.block_until_ready(fwd(model, xj))}
            if not args.skip_torch:
                xt = to_nchw(x)

                def run_torch():
                    with torch.inference_mode():
                        ref(xt)

                fns["torch"] = run_torch
            ms = _interleaved_median_ms(fns, repeats, warmup)
            jax_ms, torch_ms = ms["jax"], ms.get("torch", float("nan"))
            rows.append((image_size, batch, torch_ms, jax_ms, compile_s))
            print(f"  {image_size} b{batch}: torch {torch_ms:.0f} ms, jax {jax_ms:.0f} ms "
                  f"(first call {compile_s:.1f} s)", flush=True)

    print(f"\n{args.model} image encoder, float32 CPU, median ms per call")
    print(f"{'size':>6} {'batch':>5} {'torch ms':>10} {'jax ms':>10} {'torch/jax':>10}")
    for image_size, batch, t_ms, j_ms, _ in rows:
        print(f"{image_size:>6} {batch:>5} {t_ms:>10.1f} {j_ms:>10.1f} {t_ms / j_ms:>10.2f}")


if __name__ == "__main__":
    main()
