"""TensorBoard summaries (``<workdir>/tensorboard/``): a tiny training with two validations,
its event file read back (TFRecord framing, the ``Event`` protobuf that tensorboardX ships),
and every scalar compared with ``metrics.jsonl``; the overlay images are the Validator's PNGs.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# metrics.jsonl training keys -> tags (the documented names, lmeec_jax/training/summaries.py)
TRAIN_TAGS = {"loss": "loss/total", "loss_mask": "loss/mask", "loss_dice": "loss/dice", "loss_iou": "loss/iou",
              "loss_class": "loss/class", "train_iou": "train/iou", "grad_norm": "optim/grad_norm",
              "lr": "lr/base", "lr_vision": "lr/vision", "clips_per_s": "perf/clips_per_s",
              "skipped": "data/skipped", "clips_read": "data/clips_read"}


def read_events(path) -> list:
    """The ``Event`` records of a TFRecord event file (length, crc, data, crc framing)."""
    from lmeec_jax.training.summaries import import_tensorboardx

    import_tensorboardx()
    from tensorboardX.proto import event_pb2

    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos:pos + n])
        pos += n + 4
        out.append(ev)
    return out


def summaries(logdir):
    """``{tag: {step: value}}`` of the scalars and ``{tag: {step: png bytes}}`` of the images."""
    scalars, images = defaultdict(dict), defaultdict(dict)
    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for f in files:
        for ev in read_events(f):
            for v in ev.summary.value:
                if v.HasField("image"):
                    images[v.tag][ev.step] = v.image.encoded_image_string
                elif v.HasField("simple_value"):
                    scalars[v.tag][ev.step] = v.simple_value
    return scalars, images


def test_library_imports_tensorboardx_without_torch():
    code = ("import sys; from lmeec_jax.training.summaries import import_tensorboardx; import_tensorboardx(); "
            "import tensorboardX; assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_tensorboard_scalars_and_overlays_equal_metrics(tmp_path):
    from PIL import Image

    from lmeec_jax.data.synthetic import make_synthetic_split
    from lmeec_jax.training import config as C
    from lmeec_jax.training.trainer import Trainer

    make_synthetic_split(tmp_path / "data" / "train", 2, seed=3, n_frames=10, workers=1, raw_masks=False)
    make_synthetic_split(tmp_path / "data" / "val", 1, seed=5, n_frames=6, workers=1, raw_masks=False)
    d = {
        "name": "tb_test",
        "model": {"name": "lmeec_hiera_nano", "seed": 0,
                  "overrides": {"image_size": 64, "memory_attention_layers": 1, "fuser_layers": 1}},
        "data": {"train_dir": str(tmp_path / "data" / "train"), "val_dir": str(tmp_path / "data" / "val"),
                 "num_frames": 2, "workers": 0, "threads": 1, "prefetch": 2, "preresize": 128},
        "train": {"batch_size": 1, "steps": 3, "log_every": 1, "ckpt_every": 0, "async_checkpointing": False},
        "eval": {"every": 2, "final": True, "baseline": True, "overlays": 1, "chunk": 4},
        "runtime": {"progress": False, "tensorboard": True, "tensorboard_images": 2},
    }
    cfg = C.from_dict(C.Config, d)
    tr = Trainer(cfg, tmp_path / "w", log=lambda *a: None)
    try:
        tr.train()
    finally:
        tr.close()

    wd = tmp_path / "w"
    # the final parameters as a model directory that eval predict / Predictor.load read
    from flax import nnx

    from lmeec_jax.models.load import load

    exported, ecfg = load(wd / "model")
    assert ecfg.to_json() == tr.model_cfg.to_json()
    got = nnx.state(exported, nnx.Param)
    want = jax.device_get(tr.state["params"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    eval_recs = [r for r in recs if "eval" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3] and [r["step"] for r in eval_recs] == [2, 3]

    scalars, images = summaries(wd / "tensorboard")
    expected = defaultdict(dict)
    for r in train_recs:
        assert set(TRAIN_TAGS) <= set(r)  # every loss term, both lr groups, grad norm, clips/s
        for k, tag in TRAIN_TAGS.items():
            expected[tag][r["step"]] = r[k]
    for r in eval_recs:
        for group, prefix in (("model", "val"), ("baseline", "val_baseline")):
            for k, v in r["eval"].get(group, {}).items():
                if v is not None and np.isfinite(v):
                    expected[f"{prefix}/{k}"][r["step"]] = v
        for k in ("time_s", "n_videos"):
            expected[f"val/{k}"][r["step"]] = r["eval"][k]
    assert {"val/iou", "val/contour_accuracy", "val/location_error", "val/balanced_accuracy",
            "val_baseline/iou"} <= set(expected)
    assert set(scalars) == set(expected), sorted(set(scalars) ^ set(expected))
    for tag, by_step in expected.items():
        assert set(scalars[tag]) == set(by_step), tag
        for step, v in by_step.items():
            assert scalars[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-7), (tag, step)

    # overlays: the intermediate validation's in overlays/step_000002, the final one's in overlays/
    assert set(images) and all(t.startswith("val/overlay/") for t in images)
    steps = sorted({s for by_step in images.values() for s in by_step})
    assert steps == [2, 3]
    for tag, by_step in images.items():
        for step, png in by_step.items():
            folder = wd / "overlays" / f"step_{step:06d}" if step == 2 else wd / "overlays"
            # tensorboardX writes a tag's spaces as underscores (object names have spaces)
            pngs = {q.stem.replace(" ", "_"): q for q in folder.glob("*.png")}
            src = pngs.get(tag.split("/")[-1])
            assert src is not None and src.is_file(), (tag, sorted(pngs))
            got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            np.testing.assert_array_equal(got, np.asarray(Image.open(src).convert("RGB")))
