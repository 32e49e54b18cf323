"""Inference over a video chunk: both views encoded frame by frame, then a ``lax.scan`` of
:func:`~lmeec_jax.tracking.frame_step.frame_step` over the compressed dual memory.

Frames whose source mask is empty (``processed=False``) are skipped: the memory is left
untouched and the output is marked invalid, but the frame index still advances. Padding
frames at the end of a video are given ``processed=False`` and change nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmeec_jax.models.sam2 import SAM2Model
from lmeec_jax.tracking.frame_step import FrameInput, frame_step
from lmeec_jax.tracking.policies import CompressedDualMemory

__all__ = ["init_state", "encode_views", "scan_chunk"]


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


def scan_chunk(model: SAM2Model, state, src_images, tgt_images, src_masks, processed, t0, num_frames, *,
               diff_dtype=jnp.float32):
    """Encode K frames of both views and track B objects over them.

    src_images/tgt_images [K, S, S, 3]; src_masks [K, B, S, S] (binary, image size);
    processed [K, B] bool; t0: index of the first frame; num_frames: the video length.
    Returns (state, FrameOutput with a leading K axis).
    """
    policy = CompressedDualMemory(model.cfg, num_frames, diff_dtype)
    tgt_fpn, tgt_pos, src_feat = encode_views(model, src_images, tgt_images)
    K = src_images.shape[0]
    ts = jnp.asarray(t0, jnp.int32) + jnp.arange(K, dtype=jnp.int32)

    def body(st, xs):
        fpn, pos, sf, m, p, t = xs
        inp = FrameInput(tuple(x[None] for x in fpn), pos[None], sf[None], m, p, t)
        return frame_step(model, policy, st, inp)

    return jax.lax.scan(body, state, (tgt_fpn, tgt_pos, src_feat, src_masks, processed, ts))

