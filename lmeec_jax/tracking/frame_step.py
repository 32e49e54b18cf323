"""The LM-EEC two-view tracker: one frame step and the ``lax.scan`` over a video chunk.

Per frame t (see ``docs/lmeec_semantics.md`` for the reference's exact control flow), for a
batch of B objects that share the source and target frames:

1. the dual memory bank is brought to frame t (``memory.advance``: SAM 2 window, then
   append-and-compress);
2. source memory of frame t from the source features and the binary source mask
   (``sigmoid(m)*20-10``, object treated as present);
3. view expert V: memory attention of the target features over that memory only;
4. memory expert M: memory attention over [source bank | target bank | pointer tokens]
   with list-position temporal encodings, masked slots getting no weight;
5. ``MV_MoE(M, V)`` if the source bank is non-empty, else V;
6. SAM heads on the target with no dense prompt and single-mask output;
7. target memory from the predicted high-res logits; the frame's memories and object
   pointer are committed (``memory.commit``).
Frames whose source mask is empty are skipped: the state is left untouched and the output
is marked invalid, but the frame index still advances.

Everything is a pure function of (model, state, inputs) with static shapes, vmapped over
objects for the memory bookkeeping, so ``scan_chunk`` compiles once per chunk shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmeec_jax.tracking import memory as mem
from lmeec_jax.models.common import resize_bilinear
from lmeec_jax.models.sam2 import SAM2Model, get_1d_sine_pe


class FrameInput(NamedTuple):
    """Inputs of one frame. Feature maps have a leading 1 (shared by all B objects)."""

    tgt_fpn: tuple  # 3 levels: [1, 4h, 4w, C/8], [1, 2h, 2w, C/4], [1, h, w, C]
    tgt_pos: jax.Array  # [1, h, w, C] position encoding of the lowest level
    src_feat: jax.Array  # [1, h, w, C] source view, lowest level
    src_mask: jax.Array  # [B, S, S] float 0/1, the source GT mask at image size
    processed: jax.Array  # [B] bool: source mask non-empty
    t: jax.Array  # () int32 frame index in the video


class FrameOutput(NamedTuple):
    low_res_logits: jax.Array  # [B, 4h, 4w] (h = image_size / 16)
    object_score_logits: jax.Array  # [B]
    processed: jax.Array  # [B] bool (False: skipped frame, no prediction)


def init_state(model: SAM2Model, batch: int, dtype=jnp.float32) -> mem.DualMemoryState:
    cfg = model.cfg
    one = mem.init_state(cfg.feat_size**2, cfg.mem_dim, cfg.d_model, num_maskmem=cfg.num_maskmem,
                         max_obj_ptrs=cfg.max_obj_ptrs_in_encoder, dtype=dtype)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), one)


def binary_source_mask(mask, image_size: int):
    """SPEC point 2: the source GT mask (any size, 0/1) resized to image_size² with
    antialiased bilinear and thresholded ``>= 0.5``. mask [..., H, W] -> float32 [..., S, S]."""
    m = jnp.asarray(mask, jnp.float32)[..., None]
    if m.shape[-3:-1] != (image_size, image_size):
        m = resize_bilinear(m, (image_size, image_size), antialias=True)
    return (m[..., 0] >= 0.5).astype(jnp.float32)


def _pointer_pos(model: SAM2Model, state, t, num_frames):
    cfg = model.cfg
    tdiff, _, tmax = jax.vmap(
        lambda s: mem.pointer_tdiff(s, t, num_frames, max_obj_ptrs=cfg.max_obj_ptrs_in_encoder)
    )(state)
    tmax = jnp.maximum(tmax, 1).astype(jnp.float32)
    pe = get_1d_sine_pe(tdiff.astype(jnp.float32) / tmax[:, None], dim=cfg.d_model)
    return model.obj_ptr_tpos_proj(pe)  # [B, P, mem]


def frame_step(model: SAM2Model, state, inp: FrameInput, num_frames, *, diff_dtype=jnp.float32,
               deterministic: bool = True):
    """One LM-EEC frame for B objects. Returns (state, FrameOutput)."""
    cfg = model.cfg
    B = inp.src_mask.shape[0]
    nm = cfg.num_maskmem
    t = jnp.asarray(inp.t, jnp.int32)
    bcast = lambda x: jnp.broadcast_to(x, (B,) + x.shape[1:])

    state, _ = jax.vmap(lambda s, p: mem.advance(s, t, p, num_maskmem=nm, diff_dtype=diff_dtype))(
        state, inp.processed)

    tgt_feat, tgt_pos = bcast(inp.tgt_fpn[2]), bcast(inp.tgt_pos)
    src_feat = bcast(inp.src_feat)
    h, w = tgt_feat.shape[1:3]
    N = h * w
    # 2. source memory of this frame (object score forced to "present": no no-object embedding)
    src_mem, src_mem_pos = model.encode_new_memory(src_feat, inp.src_mask[..., None], None)
    src_mem = src_mem.reshape(B, N, -1)
    src_mem_pos = src_mem_pos.reshape(B, N, -1)
    # 3. view expert
    V = model.attend_memory(tgt_feat, tgt_pos, src_mem[:, None], src_mem_pos[:, None],
                            jnp.ones((B, 1), bool), deterministic=deterministic)
    # 4. memory expert
    ptr_pos = _pointer_pos(model, state, t, num_frames)
    tpos = model.maskmem_tpos_enc[...]

    def assemble(s, pp):
        am = mem.assemble_memory(s, t, tpos, pp, num_frames, num_maskmem=nm,
                                 max_obj_ptrs=cfg.max_obj_ptrs_in_encoder)
        return am.memory, am.memory_pos, am.valid, am.has_memory

    memory, memory_pos, valid, has_memory = jax.vmap(assemble)(state, ptr_pos)
    n_ptr_tokens = (cfg.max_obj_ptrs_in_encoder - 1) * (cfg.d_model // cfg.mem_dim)
    M = model.memory_attention(
        curr=tgt_feat.reshape(B, N, -1), curr_pos=tgt_pos.reshape(B, N, -1), memory=memory,
        memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr_tokens, memory_mask=valid, deterministic=deterministic,
    ).reshape(tgt_feat.shape)
    # 5. MV_MoE where there is past memory, else V
    fused = jnp.where(has_memory[:, None, None, None], model.MV_MoE(M, V), V)
    # 6. SAM heads: no dense prompt, no clicks, one mask
    high_res = [bcast(inp.tgt_fpn[0]), bcast(inp.tgt_fpn[1])]
    out = model.forward_sam_heads(fused, high_res_features=high_res, multimask_output=False,
                                  add_dense_prompt=False, training=not deterministic)
    # 7. target memory and commit
    tgt_mem, tgt_mem_pos = model.encode_new_memory(tgt_feat, out["high_res_masks"], out["object_score_logits"])
    state = jax.vmap(lambda s, sm, sp, tm, tp, op, p: mem.commit(s, t, sm, sp, tm, tp, op, p))(
        state, src_mem, src_mem_pos, tgt_mem.reshape(B, N, -1), tgt_mem_pos.reshape(B, N, -1),
        out["obj_ptr"], inp.processed)
    return state, FrameOutput(out["low_res_masks"][..., 0], out["object_score_logits"][:, 0], inp.processed)


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
    """Encode K frames of both views and run the tracker over them.

    src_images/tgt_images [K, S, S, 3]; src_masks [K, B, S, S] (binary, image size);
    processed [K, B] bool; t0: index of the first frame. Padding frames at the end of a video
    are given ``processed=False`` and change nothing.
    Returns (state, FrameOutput with a leading K axis).
    """
    tgt_fpn, tgt_pos, src_feat = encode_views(model, src_images, tgt_images)
    K = src_images.shape[0]
    ts = jnp.asarray(t0, jnp.int32) + jnp.arange(K, dtype=jnp.int32)

    def body(st, xs):
        fpn, pos, sf, m, p, t = xs
        inp = FrameInput(tuple(x[None] for x in fpn), pos[None], sf[None], m, p, t)
        return frame_step(model, st, inp, num_frames, diff_dtype=diff_dtype)

    return jax.lax.scan(body, state, (tgt_fpn, tgt_pos, src_feat, src_masks, processed, ts))


def upsample_logits(low_res_logits, size):
    """SPEC point 8: low-res logits [..., h, w] -> bilinear (align_corners=False) to ``size``."""
    x = low_res_logits[..., None]
    return resize_bilinear(x, size, antialias=False)[..., 0]
