"""The training input pipeline (grain): clip sampling, augmentation, batching, sharding.

What the reference does (``training/dataset``: ``EgoExoRawDataset``, ``EgoExoVOSDataset``,
``EgoExoRandomUniformSampler``, ``RepeatFactorWrapper``, the finetune yaml):

* videos = :func:`lmeec_jax.data.egoexo.list_train_videos` (one per object and exo camera,
  ego→exo, at least ``num_frames`` common annotated frames);
* an epoch visits every video ``multiplier`` (2) times in a random order; batches drop the
  remainder (``drop_last``);
* a clip = ``num_frames`` (8) consecutive frames of the video from a uniformly random start,
  redrawn (up to 1000 times) until the *source* mask of the first frame is non-empty; a
  video that never gets one is replaced by a random other video;
* frames and masks of both views go through :func:`lmeec_jax.data.transforms.augment_clip`
  (one draw for the whole clip, both views, except the per-frame colour jitter).

Here every random choice of element ``j`` of the global sample stream (step ``j // B``,
slot ``j % B``) comes from ``np.random.default_rng([seed, j])`` and the epoch order from
``default_rng([seed, epoch])``, so the data are a pure function of (seed, step) whatever the
number of hosts or worker processes: host ``h`` of ``H`` reads slots ``[h B/H, (h+1) B/H)``
of every global batch. The grain iterator's state (a position) is checkpointable.

Masks stay at the annotation's (full) resolution, as in the reference, which transforms the
full-resolution masks and the JPEGs separately: flip, affine (nearest, about the mask's own
centre; the frame-0 "mask vanished" check is made at that resolution) and one antialiased
bilinear resize to the square training size with rounding (see
:mod:`lmeec_jax.data.transforms`). A frame without a mask gets zeros. Deviations:
``preresize`` (off by default) decodes the JPEGs at a reduced DCT scale first (the masks are
not affected); a mask whose size differs from the first mask of its view in the clip (not in
the EgoExo4D data) is brought to that size (nearest), since a view's masks are one array.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Optional, Sequence

import grain
import numpy as np
from PIL import Image

from lmeec_jax.data.egoexo import ANNOTATION_FILE, DataError, VideoRecord, ViewMasks, load_annotation
from lmeec_jax.data.rle import counts_to_runs
from lmeec_jax.data.transforms import AugmentConfig, augment_clip

__all__ = [
    "ClipSpec",
    "ClipSampler",
    "steps_per_epoch",
    "make_train_dataset",
    "make_iterator",
    "MAX_RETRIES",
]

log = logging.getLogger(__name__)

MAX_RETRIES = 1000  # start-frame redraws per video (vos_sampler.MAX_RETRIES)
MAX_VIDEO_RETRIES = 100  # replacement videos after a failure


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 8
    augment: AugmentConfig = AugmentConfig()
    # decode JPEG frames at a reduced scale (PIL draft: 1/2, 1/4, 1/8) whose long side is still
    # >= this, before augmenting (speed; None: full size as stored)
    preresize: Optional[int] = None


def steps_per_epoch(num_videos: int, multiplier: int, global_batch: int) -> int:
    return (num_videos * multiplier) // global_batch


def _mask_nonempty(rle) -> bool:
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if isinstance(counts, (bytes, str)):
        runs = counts_to_runs(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        return any(runs[1::2])
    if isinstance(counts, list):
        return any(counts[1::2])
    return False


class ClipSampler:
    """``element index -> clip``: a picklable grain ``map`` transform.

    Element ``i`` of this host's stream is global sample ``j`` (see the module docstring).
    Returns a dict: ``src_images``/``tgt_images`` float32 [T, S, S, 3], ``src_masks``/
    ``tgt_masks`` uint8 [T, S, S], ``index`` (j), ``video``, ``start`` (ints), ``skipped`` (the
    number of clips of other videos dropped for bad data before this one) and ``skip_error``
    (the last such error, "" if none). Every read of a clip (annotation, frames, masks) raises
    :class:`DataError` on bad data, which skips the video.
    """

    def __init__(self, split_dir: str, records: Sequence[VideoRecord], spec: ClipSpec, *, seed: int,
                 multiplier: int, global_batch: int, host_batch: int, process_index: int = 0,
                 annotation_cache: int = 8):
        self.split_dir = os.fspath(split_dir)
        self.records = list(records)
        self.spec = spec
        self.seed = int(seed)
        self.multiplier = int(multiplier)
        self.global_batch = int(global_batch)
        self.host_batch = int(host_batch)
        self.process_index = int(process_index)
        self.n_items = len(self.records) * self.multiplier
        self.spe = steps_per_epoch(len(self.records), self.multiplier, self.global_batch)
        if self.spe < 1:
            raise ValueError(f"{len(self.records)} videos x multiplier {self.multiplier} is less than one global "
                             f"batch of {self.global_batch} clips")
        self._cache_size = annotation_cache
        self._ann: "OrderedDict[str, dict]" = OrderedDict()
        self._perm: dict = {}
        self._warned: set = set()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_ann"], d["_perm"], d["_warned"] = OrderedDict(), {}, set()
        return d

    # ---- indices
    def global_index(self, i: int) -> int:
        step, b = divmod(int(i), self.host_batch)
        return step * self.global_batch + self.process_index * self.host_batch + b

    def video_of(self, j: int) -> int:
        """The video of global sample ``j`` (epoch-wise permutation of videos x multiplier)."""
        per_epoch = self.spe * self.global_batch
        epoch, pos = divmod(int(j), per_epoch)
        perm = self._perm.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, 0xE90C]).permutation(self.n_items)
            self._perm = {epoch: perm}
        return int(perm[pos] % len(self.records))

    # ---- reading
    def _annotation(self, take: str) -> dict:
        ann = self._ann.get(take)
        if ann is None:
            ann = load_annotation(os.path.join(self.split_dir, take), take)
            self._ann[take] = ann
            while len(self._ann) > self._cache_size:
                self._ann.popitem(last=False)
        else:
            self._ann.move_to_end(take)
        return ann

    def _sample_start(self, rec: VideoRecord, rng: np.random.Generator) -> Optional[int]:
        """Uniform start with a non-empty first source mask (rejection sampling as the reference)."""
        T = self.spec.num_frames
        src = self._annotation(rec.take)["masks"][rec.obj][rec.src_cam]
        n_starts = len(rec.frames) - T + 1
        if n_starts < 1:
            return None
        ok: dict = {}
        for _ in range(MAX_RETRIES):
            s = int(rng.integers(n_starts))
            if s not in ok:
                ok[s] = _mask_nonempty(src.get(rec.frames[s]))
            if ok[s]:
                return s
            if len(ok) == n_starts and not any(ok.values()):
                return None
        return None

    @staticmethod
    def _open(path: str, **ctx):
        """``Image.open`` of a frame; a missing or unreadable file is a :class:`DataError`."""
        if not os.path.isfile(path):
            raise DataError("frame file missing", path=path, **ctx)
        try:
            return Image.open(path)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"corrupt or unreadable image ({type(e).__name__}: {e})", path=path, **ctx) from e

    def _frame(self, path: str, size, **ctx):
        try:
            with self._open(path, **ctx) as im:
                if size is not None:
                    im.draft("RGB", size)  # JPEG: decode at a reduced DCT scale >= size
                im = im.convert("RGB")
                if size is not None and max(im.size) > 2 * max(size):  # not a JPEG: no draft mode
                    im = im.resize(size, Image.BILINEAR)
                return np.asarray(im)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"corrupt or unreadable image ({type(e).__name__}: {e})", path=path, **ctx) from e

    def _view(self, rec: VideoRecord, cam: str, frames, ann):
        take_dir = os.path.join(self.split_dir, rec.take)
        view = ViewMasks(ann, rec.take, rec.obj, cam, path=os.path.join(take_dir, ANNOTATION_FILE), same_size=False)
        size = None
        if self.spec.preresize:
            with self._open(os.path.join(take_dir, cam, frames[0] + ".jpg"), take=rec.take, camera=cam,
                            frame=frames[0]) as im0:
                w, h = im0.size
            s = self.spec.preresize / max(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s))) if s < 1 else None
        imgs, masks = [], []
        for f in frames:
            ctx = dict(take=rec.take, camera=cam, frame=f)
            imgs.append(self._frame(os.path.join(take_dir, cam, f + ".jpg"), size, **ctx))
            masks.append(view.get(f))  # full resolution; DataError on a bad mask
        # the view's mask size: its first mask's (all-zero stand-ins resize to zeros at any size)
        hw = next((m.shape for m in masks if m is not None), imgs[0].shape[:2])
        for i, m in enumerate(masks):
            if m is None:
                masks[i] = np.zeros(hw, np.uint8)
            elif m.shape != hw:
                masks[i] = np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.NEAREST))
        return np.stack(imgs), np.stack(masks).astype(np.uint8)

    def load(self, video: int, start: int, rng: np.random.Generator) -> dict:
        rec = self.records[video]
        frames = rec.frames[start:start + self.spec.num_frames]
        ann = self._annotation(rec.take)
        src_f, src_m = self._view(rec, rec.src_cam, frames, ann)
        tgt_f, tgt_m = self._view(rec, rec.tgt_cam, frames, ann)
        out = augment_clip({"ego_frames": src_f, "ego_masks": src_m, "exo_frames": tgt_f, "exo_masks": tgt_m},
                           rng, self.spec.augment)
        return {"src_images": out["ego_frames"], "tgt_images": out["exo_frames"],
                "src_masks": out["ego_masks"], "tgt_masks": out["exo_masks"]}

    def __call__(self, i):
        j = self.global_index(int(i))
        rng = np.random.default_rng([self.seed, j])
        video = self.video_of(j)
        last_err = None
        for skipped in range(MAX_VIDEO_RETRIES):
            try:
                start = self._sample_start(self.records[video], rng)
                if start is not None:
                    clip = self.load(video, start, rng)
                    # skipped: clips of bad videos read (and dropped) before this one
                    clip.update(index=np.int64(j), video=np.int64(video), start=np.int64(start),
                                skipped=np.int64(skipped), skip_error=np.str_(last_err or ""))
                    return clip
                last_err = f"video {self.records[video].key}: no start frame with a visible source object"
            except DataError as e:  # every frame / mask / annotation read of a clip ends here
                last_err = str(e)
            if video not in self._warned:  # once per video and worker: the sampler meets it every epoch
                self._warned.add(video)
                log.warning("sample %d: %s; drawing another video (not repeated for this video)", j, last_err)
            video = int(rng.integers(len(self.records)))
        raise RuntimeError(f"sample {j}: no loadable clip after {MAX_VIDEO_RETRIES} videos (last: {last_err})")


def make_train_dataset(split_dir, records: Sequence[VideoRecord], spec: ClipSpec, *, num_steps: int,
                       global_batch: int, seed: int, multiplier: int = 2, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
    """``num_steps`` host-local batches (dicts of stacked arrays, leading dim B_host)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    host_batch = global_batch // process_count
    sampler = ClipSampler(split_dir, records, spec, seed=seed, multiplier=multiplier, global_batch=global_batch,
                          host_batch=host_batch, process_index=process_index)
    ds = grain.MapDataset.range(num_steps * host_batch).map(sampler)
    return ds.batch(host_batch, drop_remainder=True)


def make_iterator(ds: grain.MapDataset, *, workers: int = 0, worker_buffer: int = 2, threads: int = 2,
                  prefetch: int = 4):
    """A checkpointable grain iterator over ``ds`` (``get_state``/``set_state``), read with
    ``threads`` threads and, if ``workers`` > 0, in that many worker processes."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=max(prefetch, 1)))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=worker_buffer))
    return iter(it_ds)
