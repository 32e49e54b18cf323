"""The public entry point of the tracker: ``from lmeec_jax import Predictor``.

    predictor = Predictor.load("ckpt/lmeec")                  # or "random:lmeec_hiera_nano"
    for fr in predictor.track("ego_frames/", "exo.mp4", "ego_masks/"):
        fr.masks          # [K, H, W] bool at the target frame's resolution
        fr.object_scores  # [K] object-score logits (nan where the frame was skipped)
        fr.visible        # [K] bool

Two frame sequences of equal length are paired frame by frame (image folders in natural-sort
order of their names, video files, or sequences of images); the source masks give K objects
(a PNG folder, or per frame an index mask / a [K, H, W] array / None). All K objects run in
one batch (padded to a power of two up to ``max_objects``), ``chunk`` frames per jitted call, with the
fixed-size memory of the reference, so memory does not grow with the video. A source frame
whose mask is missing or empty is skipped for that object as the reference skips it: no
prediction (an empty mask, ``processed`` False), the memory untouched, the frame index
advancing. Masks are the low-res logits upsampled (bilinear) straight to the target frame's
size, then ``> 0``.

:meth:`Predictor.predict_split` runs the processed EgoExo4D layout (``eval predict``), and
:meth:`Predictor.track_arrays` already preprocessed arrays (training validation).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lmeec_jax.data.errors import DataError
from lmeec_jax.data.media import MaskFolder, open_frames
from lmeec_jax.inference.runner import ChunkRunner, prefetch_executor, prefetched
from lmeec_jax.inference.transforms import Transforms, logits_to_masks
from lmeec_jax.models.load import load as load_model_spec
from lmeec_jax.models.load import require_lmeec

__all__ = ["Predictor", "TrackFrame"]


@dataclasses.dataclass
class TrackFrame:
    """The result of one frame for the K objects of :meth:`Predictor.track`."""

    index: int
    name: str  # the target frame's name (file stem, or a zero-padded index)
    object_ids: Tuple[int, ...]
    masks: np.ndarray  # [K, H, W] bool at the target frame's resolution
    object_scores: np.ndarray  # [K] float32 object-score logits; nan where not processed
    visible: np.ndarray  # [K] bool: processed and object score > 0
    processed: np.ndarray  # [K] bool: the source mask of this frame was non-empty
    low_res_logits: np.ndarray  # [K, h, w] float32 (zeros where not processed)
    src_image: Optional[object] = None  # the frames as read (PIL), with ``keep_images=True``
    tgt_image: Optional[object] = None


class _Masks:
    """Per-frame index masks from a folder or a sequence (see :meth:`Predictor.track`)."""

    def __init__(self, src_masks, names: Sequence[str], object_ids: Optional[Sequence[int]]):
        self.folder = None
        if isinstance(src_masks, (str, os.PathLike)):
            self.folder = MaskFolder(src_masks, names)
            ids = self.folder.ids
        else:
            self.seq = src_masks
            if len(src_masks) != len(names):
                raise DataError(f"{len(src_masks)} source masks for {len(names)} source frames")
            ids = object_ids
            if ids is None:
                found = set()
                for m in src_masks:
                    if m is not None:
                        a = np.asarray(m)
                        found.update(range(1, a.shape[0] + 1) if a.ndim == 3 else
                                     (int(v) for v in np.unique(a) if v > 0))
                ids = sorted(found)
            if not ids:
                raise DataError("the source masks hold no object")
        self.ids = tuple(int(i) for i in (object_ids if object_ids is not None else ids))

    def get(self, i: int, hw: Tuple[int, int]) -> List[Optional[np.ndarray]]:
        """Bool masks of frame ``i`` per object id (None: no mask); checks the size."""
        if self.folder is not None:
            m, where = self.folder.get(i), self.folder.where(i)
        else:
            m, where = self.seq[i], None
        if m is None:
            return [None] * len(self.ids)
        a = np.asarray(m)
        if a.shape[-2:] != tuple(hw):
            raise DataError(f"mask size {a.shape[-1]}x{a.shape[-2]} differs from its frame's {hw[1]}x{hw[0]}",
                            path=where, frame=str(i))
        if a.ndim == 3:  # [K, H, W]: object k+1 is a[k]
            return [a[k - 1].astype(bool) if 0 < k <= a.shape[0] else None for k in self.ids]
        return [a == k for k in self.ids]


class Predictor:
    """The LM-EEC two-view tracker of one model (see the module doc).

    ``dtype``: ``float32`` (parity) or ``bfloat16`` (like the reference's CUDA autocast);
    ``precision``: matmul precision, ``highest`` for float32 unless given; ``chunk``: frames
    per jitted call; ``max_objects``: objects per batch. A model built without MV_MoE
    (``mv_moe: false`` in training) runs as that training variant (the memory expert alone
    where LM-EEC fuses it with the view expert); :meth:`load` refuses such checkpoints.
    """

    def __init__(self, model, *, dtype: str = "float32", precision: Optional[str] = None, chunk: int = 8,
                 max_objects: int = 8):
        if chunk < 1 or max_objects < 1:
            raise ValueError("chunk and max_objects must be >= 1")
        self.model = model
        self.cfg = model.cfg
        self.chunk = int(chunk)
        self.max_objects = int(max_objects)
        self.runner = ChunkRunner(model, dtype, precision=precision)
        self.transforms = Transforms(self.cfg.image_size)

    @classmethod
    def load(cls, spec: str, *, seed: int = 0, **kw) -> "Predictor":
        """From a model directory (``python -m convert``) or ``random:<config-name>``.
        A plain SAM 2.1 model (no MV_MoE weights) raises :class:`~lmeec_jax.models.load.MissingMVMoE`
        with the command that makes the LM-EEC start point."""
        model, cfg = load_model_spec(spec, seed=seed)
        require_lmeec(cfg, spec)
        return cls(model, **kw)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # ------------------------------------------------------------------ arrays

    def track_arrays(self, src_images, tgt_images, src_masks, processed):
        """Preprocessed inputs of a whole video: images [T, S, S, 3] normalised, masks
        [T, B, S, S] 0/1, processed [T, B] -> (low-res logits [T, B, h, w], object scores
        [T, B]) as device arrays (``chunk`` frames per call, padded at the end)."""
        import jax.numpy as jnp

        T, B = np.shape(processed)
        K = self.chunk
        n = -(-T // K) * K
        pad = lambda x: np.concatenate([x, np.zeros((n - T,) + x.shape[1:], x.dtype)]) if n > T else x
        arrays = [pad(np.asarray(x)) for x in (src_images, tgt_images, src_masks, processed)]
        chunks = ((tuple(x[t0:t0 + K] for x in arrays), None) for t0 in range(0, n, K))
        outs = list(self.runner.stream(B, chunks, T))
        return jnp.concatenate([o[1] for o in outs])[:T], jnp.concatenate([o[2] for o in outs])[:T]

    # ------------------------------------------------------------------ your own videos

    def track(self, src_frames, tgt_frames, src_masks, *, object_ids: Optional[Sequence[int]] = None,
              prefetch: bool = True, keep_images: bool = False) -> Iterator[TrackFrame]:
        """Track the objects of ``src_masks`` from the source frames into the target frames.

        ``src_frames``/``tgt_frames``: an image folder, a video file, or a sequence of uint8
        HxWx3 arrays / PIL images; both of the same length. ``src_masks``: a folder of PNGs
        named like the source frames (binary: object 1; index values 1..K: K objects), or a
        sequence with one entry per source frame: None, an int index mask [H, W], or a bool
        array [K, H, W]. ``object_ids``: which ids to track (default: all found).
        ``keep_images``: also hand back the frames as read (for overlays).
        Yields one :class:`TrackFrame` per target frame, in order.
        """
        src, tgt = open_frames(src_frames), open_frames(tgt_frames)
        if len(src) != len(tgt):
            raise DataError(f"the source has {len(src)} frames and the target {len(tgt)}: they must pair up "
                            f"one to one", path=f"{src.source} / {tgt.source}")
        masks = _Masks(src_masks, src.names, object_ids)
        ids = masks.ids
        n_obj = len(ids)
        B = n_obj if n_obj > self.max_objects else _bucket(n_obj, self.max_objects)
        T, K, S = len(src), self.chunk, self.image_size

        def load(c: int):
            idx = list(range(c * K, min((c + 1) * K, T)))
            si = np.zeros((K, S, S, 3), np.float32)
            ti = np.zeros((K, S, S, 3), np.float32)
            m = np.zeros((K, B, S, S), np.uint8)
            p = np.zeros((K, B), bool)
            tgt_hw, ims = [], []
            for k, i in enumerate(idx):
                s_im, t_im = src.get(i), tgt.get(i)
                ims.append((s_im, t_im) if keep_images else (None, None))
                si[k], ti[k] = self.transforms.image(s_im), self.transforms.image(t_im)
                tgt_hw.append((t_im.height, t_im.width))
                for j, mk in enumerate(masks.get(i, (s_im.height, s_im.width))):
                    if mk is not None and mk.any():  # full-resolution emptiness decides
                        p[k, j] = True
                        m[k, j] = self.transforms.source_mask(mk)
            return (si, ti, m, p), (idx, tgt_hw, ims, p)

        chunks = prefetched(load, max(1, math.ceil(T / K)), prefetch_executor() if prefetch else None)
        for (idx, tgt_hw, ims, p), low, score, _ in self.runner.stream(B, chunks, T):
            low, score = np.asarray(low)[:, :n_obj], np.asarray(score)[:, :n_obj]
            for k, i in enumerate(idx):
                proc = p[k, :n_obj]
                mk = np.asarray(logits_to_masks(low[k], tgt_hw[k])) & proc[:, None, None]
                yield TrackFrame(index=i, name=tgt.names[i], object_ids=ids, masks=mk,
                                 object_scores=np.where(proc, score[k], np.nan).astype(np.float32),
                                 visible=proc & (score[k] > 0), processed=proc.copy(),
                                 low_res_logits=np.where(proc[:, None, None], low[k], 0).astype(np.float32),
                                 src_image=ims[k][0], tgt_image=ims[k][1])

    # ------------------------------------------------------------------ EgoExo4D splits

    def predict_split(self, split_dir, direction: str, out_dir, **kw):
        """``eval predict``: every video of a processed split (see
        :func:`lmeec_jax.inference.split.predict_split`; keyword arguments go there)."""
        from lmeec_jax.inference.split import predict_split

        kw.setdefault("chunk", self.chunk)
        kw.setdefault("max_objects", self.max_objects)
        return predict_split(self.model, split_dir, direction, out_dir, runner=self.runner, **kw)


def _bucket(n: int, max_objects: int) -> int:
    from lmeec_jax.inference.split import bucket_size

    return bucket_size(n, max_objects)
