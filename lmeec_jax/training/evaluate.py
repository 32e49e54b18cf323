"""Validation inside training: the inference tracker over whole validation videos, scored
with LM-EEC's own protocol (:mod:`lmeec_jax.evaluation.metrics`).

Per video (ego→exo listing of :func:`lmeec_jax.data.egoexo.list_videos`), the frames run
through :meth:`lmeec_jax.inference.predictor.Predictor.track_arrays` (the inference tracker:
compressed dual memory, frames with an empty source mask skipped) in chunks of ``chunk`` frames. Samples
are the processed frames; the target GT is squashed to 480x480 (nearest), "exists" when the
target has the frame key and the mask is non-empty; the prediction is the low-res logits
upsampled to 480x480, ``> 0``; confidence = area > 0.1 % (LM-EEC's ``merge_results``).
IoU / contour accuracy / location error are pooled over samples whose GT exists, balanced
accuracy over all samples (:class:`lmeec_jax.evaluation.metrics.Pool`).

The *baseline* pastes the source GT mask (squashed to 480x480 the same way) as the
prediction for the same samples.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from flax import nnx
from PIL import Image

from lmeec_jax.data.egoexo import ANNOTATION_FILE, DataError, VideoRecord, ViewMasks, load_annotation, load_video
from lmeec_jax.data.images import denormalize, resize_mask_nearest
from lmeec_jax.evaluation.metrics import Pool, lmeec_confidence
from lmeec_jax.evaluation.protocol import EVAL_SIZE
from lmeec_jax.evaluation.overlay import GT_COLOUR, PRED_COLOUR, overlay
from lmeec_jax.inference.predictor import Predictor

__all__ = ["Validator"]


class Validator:
    """Loads the validation videos once; ``evaluate(params, rngs, rest)`` scores a model."""

    def __init__(self, graphdef_eval, split_dir, records: Sequence[VideoRecord], image_size: int, *,
                 chunk: int = 8, log=print):
        self.graphdef = graphdef_eval
        self.split_dir = os.fspath(split_dir)
        self.image_size = int(image_size)
        self.chunk = int(chunk)
        self.videos = []
        for rec in records:
            try:
                v = load_video(self.split_dir, rec, self.image_size, target_size=(EVAL_SIZE, EVAL_SIZE))
                v["src_masks_eval"] = self._source_masks_eval(rec)
            except DataError as e:
                log(f"validation: skipping {rec.key}: {e}")
                continue
            if v["src_valid"].any():
                self.videos.append(v)

    def _source_masks_eval(self, rec: VideoRecord) -> np.ndarray:
        """Source GT masks squashed to 480x480 (nearest), as the target GT (baseline input)."""
        ann = load_annotation(os.path.join(self.split_dir, rec.take), rec.take)
        src = ViewMasks(ann, rec.take, rec.obj, rec.src_cam, path=os.path.join(self.split_dir, rec.take, ANNOTATION_FILE),
                        same_size=False)
        out = np.zeros((len(rec.frames), EVAL_SIZE, EVAL_SIZE), bool)
        for t, f in enumerate(rec.frames):
            m = src.get(f)
            if m is not None:
                out[t] = resize_mask_nearest(m, (EVAL_SIZE, EVAL_SIZE))
        return out

    def predict(self, params, rngs, rest, video) -> np.ndarray:
        """[T, 480, 480] bool predictions (rows of skipped frames are all False)."""
        predictor = Predictor(nnx.merge(self.graphdef, params, rngs, rest), chunk=self.chunk, max_objects=1)
        low, _ = predictor.track_arrays(video["src_images"], video["tgt_images"],
                                        video["src_masks"].astype(np.float32)[:, None], video["src_valid"][:, None])
        masks = predictor.transforms.masks(low[:, 0], (EVAL_SIZE, EVAL_SIZE))
        return masks & video["src_valid"][:, None, None]

    def evaluate(self, params, rngs, rest, *, baseline: bool = False, max_videos: Optional[int] = None,
                 overlay_dir=None, overlays: int = 0) -> dict:
        """Scores (fractions, LM-EEC protocol). ``baseline``: also the paste-source baseline."""
        pool, base = Pool(), Pool()
        videos = self.videos[:max_videos] if max_videos else self.videos
        if overlay_dir is not None and overlays:
            os.makedirs(overlay_dir, exist_ok=True)
        for vi, v in enumerate(videos):
            pred = self.predict(params, rngs, rest, v)
            for t in np.flatnonzero(v["src_valid"]):
                gt = v["tgt_masks"][t]
                exists = bool(v["tgt_present"][t] and gt.any())
                pool.add(exists, bool(lmeec_confidence(pred[t])), gt, pred[t])
                if baseline:
                    b = v["src_masks_eval"][t]
                    base.add(exists, bool(lmeec_confidence(b)), gt, b)
            if overlay_dir is not None and vi < overlays:
                self._write_overlay(v, pred, os.path.join(overlay_dir, f"{vi:02d}_{v['record'].take[:8]}_"
                                                                       f"{v['record'].obj}.png".replace("/", "-")))
        out = {"model": pool.summary(), "n_videos": len(videos)}
        if baseline:
            out["baseline"] = base.summary()
        return out

    def _write_overlay(self, v, pred, path):
        """One row per sampled frame: source view (GT, green) | target view (GT contour green,
        prediction magenta), both squashed to 240x240."""
        valid = np.flatnonzero(v["src_valid"])
        rows = []
        for t in valid[np.linspace(0, len(valid) - 1, min(4, len(valid))).astype(int)]:
            src = np.asarray(Image.fromarray(denormalize(v["src_images"][t])).resize((240, 240)))
            tgt = np.asarray(Image.fromarray(denormalize(v["tgt_images"][t])).resize((240, 240)))
            sm = resize_mask_nearest(v["src_masks_eval"][t], (240, 240))
            gt = resize_mask_nearest(v["tgt_masks"][t], (240, 240))
            pm = resize_mask_nearest(pred[t], (240, 240))
            left = overlay(src, sm, GT_COLOUR)
            right = overlay(tgt, pm, PRED_COLOUR, gt, GT_COLOUR)
            rows.append(np.concatenate([left, np.full((240, 4, 3), 255, np.uint8), right], axis=1))
        if rows:
            Image.fromarray(np.concatenate(rows, axis=0)).save(path)
