"""Validation inside training: the inference tracker over whole validation videos, scored
with LM-EEC's own protocol (:mod:`lmeec_jax.evaluation.metrics`).

Per video (ego→exo listing of :func:`lmeec_jax.data.egoexo.list_videos`), the frames run
through :func:`lmeec_jax.tracking.frame_step.scan_chunk` (inference semantics: compressed dual
memory, frames with an empty source mask skipped) in chunks of ``chunk`` frames. Samples
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lmeec_jax.data.egoexo import DataError, VideoRecord, decode_mask, load_annotation, load_video
from lmeec_jax.data.images import denormalize, resize_mask_nearest
from lmeec_jax.evaluation.metrics import EVAL_SIZE, Pool, lmeec_confidence
from lmeec_jax.tracking import frame_step as lmeec

__all__ = ["Validator"]

GT_COLOUR = np.array([40, 220, 60], np.float32)
PRED_COLOUR = np.array([235, 40, 220], np.float32)


def _contour(m: np.ndarray) -> np.ndarray:
    m = m.astype(bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    out = edge.copy()  # thicken to 2 px
    out[1:] |= edge[:-1]
    out[:, 1:] |= edge[:, :-1]
    return out


def _overlay(img: np.ndarray, fill: Optional[np.ndarray], fill_colour, contour: Optional[np.ndarray],
             contour_colour) -> np.ndarray:
    x = img.astype(np.float32)
    if fill is not None:
        f = fill.astype(bool)
        x[f] = 0.55 * x[f] + 0.45 * fill_colour
    if contour is not None:
        x[_contour(contour)] = contour_colour
    return np.clip(x, 0, 255).astype(np.uint8)


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
        self._run = jax.jit(self._chunk_fn)
        self._upsample = jax.jit(lambda x: lmeec.upsample_logits(x, (EVAL_SIZE, EVAL_SIZE)) > 0)

    def _source_masks_eval(self, rec: VideoRecord) -> np.ndarray:
        """Source GT masks squashed to 480x480 (nearest), as the target GT (baseline input)."""
        ann = load_annotation(os.path.join(self.split_dir, rec.take), rec.take)
        src = ann["masks"][rec.obj].get(rec.src_cam) or {}
        out = np.zeros((len(rec.frames), EVAL_SIZE, EVAL_SIZE), bool)
        for t, f in enumerate(rec.frames):
            if f in src:
                out[t] = resize_mask_nearest(decode_mask(src[f]), (EVAL_SIZE, EVAL_SIZE))
        return out

    def _chunk_fn(self, params, rngs, rest, state, src, tgt, masks, processed, t0, num_frames):
        model = nnx.merge(self.graphdef, params, rngs, rest)
        return lmeec.scan_chunk(model, state, src, tgt, masks, processed, t0, num_frames)

    def predict(self, params, rngs, rest, video) -> np.ndarray:
        """[T, 480, 480] bool predictions (rows of skipped frames are all False)."""
        T, K, S = len(video["frames"]), self.chunk, self.image_size
        n = -(-T // K) * K
        pad = lambda x: np.concatenate([x, np.zeros((n - T,) + x.shape[1:], x.dtype)]) if n > T else x
        src, tgt = pad(video["src_images"]), pad(video["tgt_images"])
        masks = pad(video["src_masks"].astype(np.float32))[:, None]
        proc = pad(video["src_valid"])[:, None]
        model_state = lmeec.init_state(nnx.merge(self.graphdef, params, rngs, rest), 1)
        logits = []
        for t0 in range(0, n, K):
            sl = slice(t0, t0 + K)
            model_state, out = self._run(params, rngs, rest, model_state, src[sl], tgt[sl], masks[sl], proc[sl],
                                         jnp.int32(t0), jnp.int32(T))
            logits.append(out.low_res_logits[:, 0])
        low = jnp.concatenate(logits)[:T]
        return np.asarray(self._upsample(low)) & video["src_valid"][:, None, None]

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
            left = _overlay(src, sm, GT_COLOUR, None, None)
            right = _overlay(tgt, pm, PRED_COLOUR, gt, GT_COLOUR)
            rows.append(np.concatenate([left, np.full((240, 4, 3), 255, np.uint8), right], axis=1))
        if rows:
            Image.fromarray(np.concatenate(rows, axis=0)).save(path)
