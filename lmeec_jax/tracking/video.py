"""Inference over a video chunk: both views encoded frame by frame, then a ``lax.scan`` of
:func:`~lmeec_jax.tracking.frame_step.frame_step` over the compressed dual memory.

Frames whose source mask is empty (``processed=False``) are skipped: the memory is left
untouched and the output is marked invalid, but the frame index still advances. Padding
frames at the end of a video are given ``processed=False`` and change nothing.

Two entry points:

* :func:`scan_chunk`: images in, the encoder inside (one video, one frame list, the frame
  index ``t0 + k`` shared by the B objects);
* :func:`encode_frames` + :func:`track_chunk`: image features computed once per (camera,
  frame) and fed to any number of chunks (the split runner shares them between objects,
  camera pairs and directions). ``track_chunk`` takes a frame index *per object*
  (``ts [K, B]``) and a video length per object (``num_frames [B]``), so objects whose
  frame lists differ run in one batch: a step outside an object's list is given
  ``processed=False`` (its memory untouched) and its index is simply not used. Both give
  bit-identical results (the encoder runs on two frames per call in both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmeec_jax.models.sam2 import SAM2Model
from lmeec_jax.tracking.frame_step import FrameInput, frame_step
from lmeec_jax.tracking.policies import CompressedDualMemory

__all__ = ["init_state", "encode_views", "encode_frames", "scan_chunk", "track_chunk"]


def init_state(model_or_cfg, batch: int, dtype=jnp.float32):
    """An empty inference memory for ``batch`` objects (a model or its ModelConfig)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    return CompressedDualMemory(cfg, 0).init(batch, dtype)


def encode_views(model: SAM2Model, src_images, tgt_images):
    """Image features of both views for K frames: images [K, S, S, 3] each.

    Returns (tgt_fpn levels [K, ...], tgt_pos [K, h, w, C], src_feat [K, h, w, C]); the
    encoder runs frame by frame (``lax.map``) so memory does not grow with K.
    """

    def one(pair):
        s, g = pair
        fpn, pos = model.forward_image(jnp.stack([g, s]))  # both views in one encoder call
        return tuple(x[0] for x in fpn), pos[2][0], fpn[2][1]

    return jax.lax.map(one, (src_images, tgt_images))


def encode_frames(model: SAM2Model, images):
    """Features of ``2n`` independent frames, images [2n, S, S, 3] (any cameras), two per
    encoder call as in :func:`encode_views` (the same bits: an image's features do not
    depend on its partner or its place in the pair).

    Returns a tuple of ``2n`` per-frame ``(fpn0, fpn1, fpn2, pos)`` (``pos`` of the lowest level).
    """
    n2 = images.shape[0]
    if n2 % 2:
        raise ValueError(f"encode_frames takes an even number of frames, got {n2}")
    pairs = images.reshape((n2 // 2, 2) + images.shape[1:])

    def one(x):
        fpn, pos = model.forward_image(x)
        return tuple(fpn), pos[2]

    fpn, pos = jax.lax.map(one, pairs)
    flat = lambda x: x.reshape((n2,) + x.shape[2:])
    fpn, pos = tuple(flat(x) for x in fpn), flat(pos)
    return tuple((fpn[0][i], fpn[1][i], fpn[2][i], pos[i]) for i in range(n2))


def track_chunk(model: SAM2Model, state, tgt_fpn, tgt_pos, src_feat, src_masks, processed, ts, num_frames, *,
                diff_dtype=jnp.float32):
    """Track B objects over K frames of precomputed features.

    tgt_fpn: 3 levels [K, ...]; tgt_pos [K, h, w, C]; src_feat [K, h, w, C]; src_masks
    [K, B, S, S]; processed [K, B] bool; ts: frame index per step, [K] or [K, B] (each
    object's index in its own frame list); num_frames: video length, () or [B].
    Returns (state, FrameOutput with a leading K axis).
    """
    policy = CompressedDualMemory(model.cfg, num_frames, diff_dtype)

    def body(st, xs):
        fpn, pos, sf, m, p, t = xs
        inp = FrameInput(tuple(x[None] for x in fpn), pos[None], sf[None], m, p, t)
        return frame_step(model, policy, st, inp)

    return jax.lax.scan(body, state, (tuple(tgt_fpn), tgt_pos, src_feat, src_masks, processed,
                                      jnp.asarray(ts, jnp.int32)))


def scan_chunk(model: SAM2Model, state, src_images, tgt_images, src_masks, processed, t0, num_frames, *,
               diff_dtype=jnp.float32):
    """Encode K frames of both views and track B objects over them.

    src_images/tgt_images [K, S, S, 3]; src_masks [K, B, S, S] (binary, image size);
    processed [K, B] bool; t0: index of the first frame; num_frames: the video length.
    Returns (state, FrameOutput with a leading K axis).
    """
    tgt_fpn, tgt_pos, src_feat = encode_views(model, src_images, tgt_images)
    K = src_images.shape[0]
    ts = jnp.asarray(t0, jnp.int32) + jnp.arange(K, dtype=jnp.int32)
    return track_chunk(model, state, tgt_fpn, tgt_pos, src_feat, src_masks, processed, ts, num_frames,
                       diff_dtype=diff_dtype)
