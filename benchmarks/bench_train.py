"""Training throughput: clips/s per device of the jitted LM-EEC train step.

    python benchmarks/bench_train.py [--models b+,nano] [--batch 1] [--frames 8] [--steps 3]

For each model: the real train step of ``lmeec_jax.training.trainer.make_train_step``
(training forward over ``--frames``-frame two-view clips, the four losses, backward, the
LM-EEC AdamW/cosine/layer-decay optimiser) on random clips of ``--batch`` clips on one
device, float32 (``--dtype bfloat16`` for the recipe's mixed precision; slow on most
CPUs). ``b+`` is the finetune recipe's model (``lmeec_hiera_b+`` at 480, drop path 0.1);
``nano`` the built-in run's (``configs/synthetic_tiny.yaml``). The compile (first call) is
reported apart with XLA's temporary-buffer size of the compiled step (the activation
memory; parameters, optimiser state and the batch come on top); then the median seconds
per step after one untimed run. ``--remat`` turns on ``remat_blocks`` and ``remat_frames``.
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

MODELS = {
    "b+": dict(name="lmeec_hiera_b+", overrides={}, drop_path=0.1),
    "nano": dict(name="lmeec_hiera_nano", overrides={"memory_attention_layers": 2, "fuser_layers": 1}, drop_path=0.0),
}


def bench(key: str, batch: int, frames: int, steps: int, dtype: str, remat: bool) -> dict:
    from lmeec_jax.models.config import get_config
    from lmeec_jax.training.losses import LossConfig
    from lmeec_jax.training import forward as LT
    from lmeec_jax.models.sam2 import build_model
    from lmeec_jax.training.optim import OptimConfig, make_optimizer
    from lmeec_jax.training.trainer import make_train_step

    spec = MODELS[key]
    cfg = get_config(spec["name"], trunk={"drop_path_rate": spec["drop_path"]}, **spec["overrides"])
    model = build_model(cfg, seed=0)
    model.train()
    g, params, rngs, rest = LT.split_model(model)
    tx = make_optimizer(params, OptimConfig(), total_steps=1000)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rest": rest}
    fcfg = LT.TrainForwardConfig(dtype=dtype, remat_blocks=remat, remat_frames=remat)
    step = jax.jit(make_train_step(g, tx, fcfg, LossConfig(), seed=0), donate_argnums=(0,))
    S = cfg.image_size
    rng = np.random.default_rng(0)
    b = {
        "src_images": jnp.asarray(rng.standard_normal((batch, frames, S, S, 3)), jnp.float32),
        "tgt_images": jnp.asarray(rng.standard_normal((batch, frames, S, S, 3)), jnp.float32),
        "src_masks": jnp.asarray(rng.random((batch, frames, S, S)) > 0.9, jnp.uint8),
        "tgt_masks": jnp.asarray(rng.random((batch, frames, S, S)) > 0.9, jnp.uint8),
    }
    t0 = time.perf_counter()
    step = step.lower(state, b, rngs).compile()
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    n_params = sum(x.size for x in jax.tree.leaves(params))
    row = dict(model=key, image_size=S, params_m=n_params / 1e6, batch=batch, frames=frames, dtype=dtype,
               remat=remat, compile_s=compile_s, temp_gb=None if temp is None else temp / 1e9,
               temp_gb_per_clip=None if temp is None else temp / 1e9 / batch)
    if steps <= 0:
        return row
    state, m = step(state, b, rngs)  # first run (allocations), not timed
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, b, rngs)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    row.update(step_s=sec, clips_per_s=batch / sec, loss=float(m["loss"]))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="b+,nano")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (0: compile only)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true", help="rematerialise Hiera blocks and frames")
    args = ap.parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}")
    rows = []
    for key in args.models.split(","):
        r = bench(key.strip(), args.batch, args.frames, args.steps, args.dtype, args.remat)
        rows.append(r)
        head = (f"{r['model']:>5} {r['image_size']}px {r['params_m']:.1f}M params, batch {r['batch']} x {r['frames']} "
                f"frames, {r['dtype']}{', remat' if r['remat'] else ''}: compile {r['compile_s']:.0f} s, "
                + ("" if r["temp_gb"] is None else f"XLA temp {r['temp_gb']:.2f} GB ({r['temp_gb_per_clip']:.2f} GB/clip)"))
        if "step_s" in r:
            head += f", {r['step_s']:.2f} s/step, {r['clips_per_s']:.3f} clips/s per device"
        print(head, flush=True)
    return rows


if __name__ == "__main__":
    main()
