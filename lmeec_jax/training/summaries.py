"""TensorBoard summaries of a training run (``<workdir>/tensorboard/``), written with
`tensorboardX <https://github.com/lanpa/tensorboardX>`_ (protobuf + numpy only; no TensorFlow).

The scalars are those of ``metrics.jsonl`` (which stays the run's record), under these tags
(:func:`train_scalars` / :func:`eval_scalars` give the mapping):

* ``loss/total`` (the optimised ``core_loss``), ``loss/mask``, ``loss/dice``, ``loss/iou``,
  ``loss/class`` (every loss term, as in ``metrics.jsonl``'s ``loss_*``);
* ``train/iou`` (IoU of the first mask of each frame against its target, over the batch);
* ``optim/grad_norm`` (global L2 norm of the gradients, before clipping);
* ``lr/base`` and ``lr/vision`` (the learning rate of each parameter group: ``image_encoder.*``
  follows ``lr/vision``; layer decay scales it further per trunk layer);
* ``perf/clips_per_s`` (throughput over the global batch), ``data/skipped`` and ``data/clips_read``;
* at each validation: ``val/<metric>`` for the model's scores (``iou``, ``contour_accuracy``,
  ``location_error``, ``balanced_accuracy``, ``existence_accuracy``, the sample counts) and
  ``val/time_s``; ``val_baseline/<metric>`` for the paste-the-source-mask baseline when it is
  scored; ``val/overlay/<name>`` images: the Validator's overlay PNGs (source | target view,
  ground truth green, prediction magenta).

Only the main process writes (the trainer constructs this on process 0 alone).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

__all__ = ["TensorBoardWriter", "train_scalars", "eval_scalars", "import_tensorboardx"]

# metrics.jsonl keys of a training record -> TensorBoard tags
TRAIN_TAGS = {
    "loss": "loss/total",
    "loss_mask": "loss/mask",
    "loss_dice": "loss/dice",
    "loss_iou": "loss/iou",
    "loss_class": "loss/class",
    "train_iou": "train/iou",
    "grad_norm": "optim/grad_norm",
    "lr": "lr/base",
    "lr_vision": "lr/vision",
    "clips_per_s": "perf/clips_per_s",
    "skipped": "data/skipped",
    "clips_read": "data/clips_read",
}
NOT_SCALARS = ("step", "time_s", "data", "videos", "starts", "eval", "error")


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def train_scalars(record: dict) -> dict[str, float]:
    """``{tag: value}`` of one ``metrics.jsonl`` training record (keys without a fixed tag,
    e.g. new loss terms, go to ``train/<key>``)."""
    out = {}
    for k, v in record.items():
        if k in NOT_SCALARS:
            continue
        x = _number(v)
        if x is not None:
            tag = TRAIN_TAGS.get(k) or (f"loss/{k[5:]}" if k.startswith("loss_") else f"train/{k}")
            out[tag] = x
    return out


def eval_scalars(res: dict) -> dict[str, float]:
    """``{tag: value}`` of a validation result (``metrics.jsonl``'s ``eval`` record)."""
    out = {}
    for group, prefix in (("model", "val"), ("baseline", "val_baseline")):
        for k, v in (res.get(group) or {}).items():
            x = _number(v)
            if x is not None:
                out[f"{prefix}/{k}"] = x
    for k in ("time_s", "n_videos"):
        x = _number(res.get(k))
        if x is not None:
            out[f"val/{k}"] = x
    return out


def import_tensorboardx():
    """``tensorboardX``, imported without letting it import torch (it does when torch is
    installed, to accept torch tensors; this library never loads torch)."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX tolerates
    try:
        import tensorboardX
    except ImportError as e:
        raise ImportError("TensorBoard summaries need tensorboardX (pip install tensorboardX), "
                          "or set runtime.tensorboard=false") from e
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tensorboardX


class TensorBoardWriter:
    """Scalars and overlay images of a run, in ``logdir`` (one event file per process start;
    TensorBoard merges the files of a resumed run by step)."""

    def __init__(self, logdir, *, flush_secs: int = 30):
        tbx = import_tensorboardx()
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = tbx.SummaryWriter(logdir=os.fspath(self.logdir), flush_secs=flush_secs)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), global_step=int(step))

    def train(self, record: dict) -> None:
        self.scalars(record["step"], train_scalars(record))

    def eval(self, step: int, res: dict, images: Iterable = ()) -> None:
        self.scalars(step, eval_scalars(res))
        self.images(step, images)

    def images(self, step: int, paths: Iterable) -> None:
        """PNG files (the Validator's overlays) as ``val/overlay/<file stem>``."""
        from PIL import Image

        for p in paths:
            p = Path(p)
            with Image.open(p) as im:
                img = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"val/overlay/{p.stem}", img, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
