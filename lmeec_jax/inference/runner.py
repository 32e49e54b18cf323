"""The jitted chunk of the tracker for one model: K frames of both views through the image
encoder and the frame-step scan, B objects at once, the memory carried between calls.

Two forms: :meth:`ChunkRunner.run` (images in, the encoder inside the chunk: one video at a
time) and :meth:`ChunkRunner.encode` + :meth:`ChunkRunner.track` (features of a (camera,
frame) computed once, two frames per encoder call, and fed to every chunk that needs them;
per-object frame indices). Both give the same bits.

The jitted model step is shared by every runner of the same model graph and dtype (a test
or a second split in the same process does not compile again) and compiles once per
(K, B); postprocessing to output shapes is a separate small jit, so a new target shape
does not recompile the model.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
from typing import Any, Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmeec_jax.evaluation.protocol import EVAL_SIZE
from lmeec_jax.inference.transforms import upsample_logits
from lmeec_jax.tracking import video as lmeec
from lmeec_jax.tracking.memory import AUTOCAST

OUT_SIZE = EVAL_SIZE  # side of the per-frame masks (the reference's image_size for LM-EEC)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = ("highest", "default")

__all__ = ["OUT_SIZE", "DTYPES", "PRECISIONS", "ChunkOut", "ChunkRunner", "prefetch_executor", "prefetched",
           "resolve_precision", "ENCODE_FRAMES"]

ENCODE_FRAMES = 2  # frames per encoder call of ChunkRunner.encode (the pair of encode_views)

_PREFETCH: Optional[cf.ThreadPoolExecutor] = None


class ChunkOut(NamedTuple):
    low_res_logits: Any  # [K, B, 4h, 4w] float32
    masks: Any  # [K, B, OUT_SIZE, OUT_SIZE] bool
    official_masks: Any  # [K, B, H', W'] bool (the official target shape)
    confidence: Any  # [K, B] float32, sigmoid(object score)
    processed: Any  # [K, B] bool


_JIT_CACHE: Dict[tuple, Callable] = {}


def resolve_precision(dtype: str, precision: Optional[str] = None) -> str:
    """The matmul precision of a run: ``highest`` for float32 (the f32 of the parity tests, also
    on GPUs whose default f32 dots are reduced precision), XLA's ``default`` for bfloat16."""
    if precision is None:
        return "highest" if dtype == "float32" else "default"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _make_chunk_fn(graphdef, compute_dtype, diff_dtype, precision):
    """The heavy jitted step: image encoder + tracker over K frames (compiled per (K, B))."""

    @jax.default_matmul_precision(precision)
    def fn(params, state, src_images, tgt_images, src_masks, processed, t0, num_frames):
        model = nnx.merge(graphdef, params)
        src = src_images.astype(compute_dtype)
        tgt = tgt_images.astype(compute_dtype)
        masks = src_masks.astype(compute_dtype)
        state, out = lmeec.scan_chunk(model, state, src, tgt, masks, processed, t0, num_frames, diff_dtype=diff_dtype)
        return state, (out.low_res_logits.astype(jnp.float32), out.object_score_logits.astype(jnp.float32),
                       out.processed)

    return jax.jit(fn, donate_argnums=(1,))


def _make_encode_fn(graphdef, compute_dtype, precision):
    """Image encoder alone: [2n, S, S, 3] -> 2n per-frame feature tuples (compiled once per n)."""

    @jax.default_matmul_precision(precision)
    def fn(params, images):
        model = nnx.merge(graphdef, params)
        return lmeec.encode_frames(model, images.astype(compute_dtype))

    return jax.jit(fn)


def _make_track_fn(graphdef, compute_dtype, diff_dtype, precision):
    """The tracker over K frames of precomputed features (per-frame tuples, stacked here);
    per-object frame indices ``ts [K, B]`` and lengths ``num_frames [B]``."""

    @jax.default_matmul_precision(precision)
    def fn(params, state, tgt_frames, src_frames, src_masks, processed, ts, num_frames):
        model = nnx.merge(graphdef, params)
        stack = lambda xs: jnp.stack(xs)
        tgt_fpn = tuple(stack([f[i] for f in tgt_frames]) for i in range(3))
        tgt_pos = stack([f[3] for f in tgt_frames])
        src_feat = stack(list(src_frames))
        masks = src_masks.astype(compute_dtype)
        state, out = lmeec.track_chunk(model, state, tgt_fpn, tgt_pos, src_feat, masks, processed, ts, num_frames,
                                       diff_dtype=diff_dtype)
        return state, (out.low_res_logits.astype(jnp.float32), out.object_score_logits.astype(jnp.float32),
                       out.processed)

    return jax.jit(fn, donate_argnums=(1,))


@functools.partial(jax.jit, static_argnames=("out_size", "official_hw"))
def _postprocess(low, scores, processed, *, out_size: int, official_hw: Tuple[int, int]) -> ChunkOut:
    """SPEC point 8 on device: low-res logits -> bilinear -> ``> 0`` at OUT_SIZE² and at the
    official target shape; confidence = sigmoid(object score). Light: its own small jit so a
    new target shape does not recompile the model."""
    m = upsample_logits(low, (out_size, out_size)) > 0
    if tuple(official_hw) == (out_size, out_size):
        mo = m
    else:
        mo = upsample_logits(low, tuple(official_hw)) > 0
    return ChunkOut(low, m, mo, jax.nn.sigmoid(scores), processed)


class ChunkRunner:
    """The jitted per-chunk step for one model.

    ``run(state, src [K,S,S,3], tgt [K,S,S,3], masks [K,B,S,S] 0/1, processed [K,B], t0,
    num_frames)`` -> ``(state, low-res logits [K,B,h,w], object scores [K,B], processed)``;
    ``step(..., official_hw)`` -> ``(state, ChunkOut)`` adds the output masks. Device arrays:
    nothing is fetched. Compiled shapes (K, B) are recorded in ``compiled``.
    """

    def __init__(self, model, dtype: str = "float32", out_size: int = OUT_SIZE, precision: Optional[str] = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.cfg = model.cfg
        self.dtype_name = dtype
        self.precision = resolve_precision(dtype, precision)
        self.dtype = DTYPES[dtype]
        self.out_size = out_size
        model.eval()  # inference: dropout / drop path off (the jit cache below is per config)
        graphdef, params = nnx.split(model)
        if self.dtype != jnp.float32:
            params = jax.tree.map(
                lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        self.params = params
        # bf16 mirrors the reference's autocast, including its bf16 first compression
        diff_dtype = AUTOCAST if self.dtype == jnp.bfloat16 else jnp.float32
        key = (self.cfg, dtype, self.precision)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = (_make_chunk_fn(graphdef, self.dtype, diff_dtype, self.precision),
                               _make_encode_fn(graphdef, self.dtype, self.precision),
                               _make_track_fn(graphdef, self.dtype, diff_dtype, self.precision))
        self._fn, self._encode_fn, self._track_fn = _JIT_CACHE[key]
        self.compiled: set = set()
        self.encoder_calls = 0  # encoder calls (two frames each in encode(); one per frame pair in run())
        self.frames_encoded = 0  # images through the encoder, padding included

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def init_state(self, batch: int):
        return lmeec.init_state(self.cfg, batch, dtype=self.dtype)

    def run(self, state, src_images, tgt_images, src_masks, processed, t0: int, num_frames: int):
        K, B = np.shape(processed)
        self.compiled.add((int(K), int(B)))
        self.encoder_calls += int(K)
        self.frames_encoded += 2 * int(K)
        state, (low, scores, proc) = self._fn(self.params, state, src_images, tgt_images, src_masks, processed,
                                              np.int32(t0), np.int32(num_frames))
        return state, low, scores, proc

    def encode(self, images):
        """Features of ``ENCODE_FRAMES`` images [2, S, S, 3] (float32, normalised, any cameras):
        a tuple of per-frame ``(fpn0, fpn1, fpn2, pos)`` device arrays (nothing fetched)."""
        n = int(np.shape(images)[0])
        if n != ENCODE_FRAMES:
            raise ValueError(f"encode takes {ENCODE_FRAMES} images, got {n}")
        self.encoder_calls += 1
        self.frames_encoded += n
        return self._encode_fn(self.params, images)

    def track(self, state, tgt_frames, src_frames, src_masks, processed, ts, num_frames):
        """K steps over precomputed features: ``tgt_frames`` K per-frame ``(fpn0, fpn1, fpn2,
        pos)`` of the target view, ``src_frames`` K lowest-level source features (from
        :meth:`encode`), masks [K, B, S, S], processed [K, B], ``ts`` [K, B] int32 (each
        object's frame index), ``num_frames`` [B] int32 (each object's video length) ->
        ``(state, low-res logits, object scores, processed)`` (device arrays)."""
        K, B = np.shape(processed)
        self.compiled.add((int(K), int(B)))
        state, (low, scores, proc) = self._track_fn(self.params, state, tuple(tgt_frames), tuple(src_frames),
                                                    src_masks, processed, np.asarray(ts, np.int32),
                                                    np.asarray(num_frames, np.int32))
        return state, low, scores, proc

    def stream(self, batch: int, chunks: Iterable[tuple], num_frames: int) -> Iterator[tuple]:
        """The one loop over a video's chunks, from a fresh memory of ``batch`` objects.

        ``chunks`` yields ``((src, tgt, masks, processed), extra)`` per chunk of K frames
        (every chunk padded to K; ``processed`` False on padding). Yields ``(extra, low-res
        logits, object scores, processed)`` of chunk c (device arrays) once chunk c+1 has been
        dispatched, so the host work on a chunk's outputs overlaps the device work on the next.
        """
        state = self.init_state(batch)
        pending = None
        for c, ((src, tgt, masks, proc), extra) in enumerate(chunks):
            state, low, scores, p = self.run(state, src, tgt, masks, proc, c * len(proc), num_frames)
            if pending is not None:
                yield pending
            pending = (extra, low, scores, p)
        if pending is not None:
            yield pending

    def step(self, state, src_images, tgt_images, src_masks, processed, t0: int, num_frames: int,
             official_hw: Tuple[int, int]):
        state, low, scores, proc = self.run(state, src_images, tgt_images, src_masks, processed, t0, num_frames)
        return state, self.postprocess(low, scores, proc, official_hw)

    def postprocess(self, low, scores, processed, official_hw: Tuple[int, int]) -> ChunkOut:
        """Masks at OUT_SIZE² and at ``official_hw``, confidence = sigmoid(score) (device)."""
        return _postprocess(low, scores, processed, out_size=self.out_size,
                            official_hw=tuple(int(v) for v in official_hw))



def prefetch_executor() -> cf.ThreadPoolExecutor:
    """The one background loader thread of this process (reused: a new thread per split
    would get a new malloc arena each time and grow the RSS run after run)."""
    global _PREFETCH
    if _PREFETCH is None:
        _PREFETCH = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmeec-prefetch")
    return _PREFETCH


def prefetched(load: Callable[[int], Any], n: int, executor: Optional[cf.Executor] = None) -> Iterator[Any]:
    """``load(0) .. load(n - 1)``; with an ``executor`` (e.g. :func:`prefetch_executor`) each
    next one is loaded in the background while the caller works on the current one."""
    fut = executor.submit(load, 0) if executor is not None and n > 0 else None
    for c in range(n):
        item = fut.result() if executor is not None else load(c)
        if executor is not None and c + 1 < n:
            fut = executor.submit(load, c + 1)
        yield item
