"""Training as more than one JAX process equals one process with as many devices.

Two ``python -m train`` processes on 127.0.0.1 (one CPU device each, gloo collectives,
``--coordinator/--num-processes/--process-id``) train the nano model a few steps; one process
with two devices (``--xla_force_host_platform_device_count=2``) trains the same run. Every
step's loss in ``metrics.jsonl``, the clip ids of every step and the final (exported)
parameters agree to 1e-6; only process 0 writes ``metrics.jsonl`` / ``config.yaml`` / the model
/ TensorBoard, and every process writes its data-iterator state into the checkpoint; the final
validation (process 0, the other process waiting at a barrier) equals the one-process one. Then a
one-process run resumes the two-process run's step-2 checkpoint (state restored from the orbax
multi-process save; the data iterator, saved per process, set to step 2) and ends on the same
losses and parameters as the straight one-process run.

Slow: three training-step compilations (minutes on a loaded 2-core CPU). Run with
``pytest tests/test_multiprocess.py -m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(train_dir, val_dir, cache) -> dict:
    return {
        "name": "mp_test",
        "model": {"name": "lmeec_hiera_nano", "seed": 0, "drop_path_rate": 0.1,
                  "overrides": {"image_size": 64, "memory_attention_layers": 1, "fuser_layers": 1}},
        "data": {"train_dir": str(train_dir), "val_dir": str(val_dir), "num_frames": 2, "workers": 0, "threads": 1, "prefetch": 2,
                 "preresize": 128, "synthetic": {"enabled": False}},
        "optim": {"base_lr": 1e-3, "vision_lr": 1e-3, "layer_decay": None, "clip_max_norm": 1.0},
        "train": {"batch_size": 1, "steps": STEPS, "log_every": 1, "ckpt_every": 2, "keep": 5, "log_data": True},
        # the final validation runs on process 0 while the others wait (then all leave together)
        "eval": {"final": True, "initial": False, "baseline": False, "overlays": 0, "max_videos": 2, "chunk": 4},
        # a loaded CI machine can starve the heartbeat thread past jax's 100 s default
        "runtime": {"progress": False, "compilation_cache": str(cache), "heartbeat_timeout_s": 7200},
    }


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO), JAX_DEFAULT_MATMUL_PRECISION="highest")
    return env


def _launch(cfg_path, workdir, devices: int, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train", "--config", str(cfg_path), "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(procs, timeout=3600):
    t_end = time.time() + timeout
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(t_end - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _records(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict:
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _data(workdir) -> dict:
    return {r["step"]: r["data"] for r in _records(workdir) if "data" in r}


def _params(workdir) -> dict:
    from lmeec_jax.models import checkpoint as model_ckpt

    return model_ckpt.load_state(Path(workdir) / "model")


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_process_two_devices(tmp_path):
    from lmeec_jax.data.synthetic import make_synthetic_split

    t0 = time.time()
    train_dir = tmp_path / "data" / "train"
    make_synthetic_split(train_dir, 2, seed=3, n_frames=10, workers=1, raw_masks=False)
    val_dir = tmp_path / "data" / "val"
    make_synthetic_split(val_dir, 1, seed=4, n_frames=4, workers=1, raw_masks=False)
    cfg_path = tmp_path / "mp.yaml"
    cache = os.environ.get("LMEEC_TEST_JAX_CACHE") or tmp_path / "jax_cache"  # reuse compiles across runs
    cfg_path.write_text(yaml.safe_dump(_config(train_dir, val_dir, cache)))

    # the two-process run and the one-process two-device run, side by side
    port = _free_port()
    mp = tmp_path / "two_processes"
    sp = tmp_path / "one_process"
    procs = [_launch(cfg_path, mp, 1, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(i)) for i in range(2)]
    procs.append(_launch(cfg_path, sp, 2))
    outs = _wait(procs)
    assert "2 processes" in outs[0] and "done:" in outs[0] and "done:" not in outs[1]

    la, lb = _losses(mp), _losses(sp)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    loss_diff = {s: abs(la[s] - lb[s]) for s in la}
    assert _data(mp) == _data(sp)  # the same global batch, in the same order, at every step
    pa, pb = _params(mp), _params(sp)
    param_diff = _max_param_diff(pa, pb)
    print(f"\nmax |loss diff| per step: {loss_diff}; max |param diff|: {param_diff:.3g}")
    assert max(loss_diff.values()) <= 1e-6
    assert param_diff <= 1e-6
    # the final validation (process 0 alone, the other waiting) equals the one-process one
    ea, eb = (json.loads((w / "eval_final.json").read_text())["model"] for w in (mp, sp))
    print(f"final validation: 2 processes {ea}, 1 process {eb}")
    assert ea.keys() == eb.keys() and ea["n_samples"] > 0 and ea["location_error"] > 0
    assert all(abs(ea[k] - eb[k]) <= 1e-6 for k in ea), (ea, eb)

    # process 0 alone writes the run's files; every process its iterator state
    assert not (mp / "error.process1.log").exists() or "Traceback" not in (mp / "error.process1.log").read_text()
    assert len(list((mp / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for step in (2, 4):
        names = sorted(p.name for p in (mp / "checkpoints" / str(step) / "data").glob("process_*"))
        assert names == ["process_0-of-2.json", "process_1-of-2.json"], names

    # the two-process step-2 checkpoint resumes in one process (two devices): steps 3-4 as straight
    rs = tmp_path / "resumed"
    shutil.copytree(mp, rs, ignore=shutil.ignore_patterns("model", "tensorboard"))
    shutil.rmtree(rs / "checkpoints" / "4")
    (rs / "metrics.jsonl").write_text("")
    out = _wait([_launch(cfg_path, rs, 2, "--resume")])[0]
    assert "resumed from step 2" in out and "another process count" in out, out[-2000:]
    lr = _losses(rs)
    assert sorted(lr) == [3, 4], lr
    resume_diff = {s: abs(lr[s] - lb[s]) for s in lr}
    resume_param_diff = _max_param_diff(_params(rs), pb)
    assert _data(rs) == {s: d for s, d in _data(sp).items() if s > 2}
    print(f"resumed in one process: max |loss diff| {resume_diff}; max |param diff| {resume_param_diff:.3g}; "
          f"wall {time.time() - t0:.0f} s")
    assert max(resume_diff.values()) <= 1e-6
    assert resume_param_diff <= 1e-6
