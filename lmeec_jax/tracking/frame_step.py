"""The LM-EEC two-view frame step, written once for inference and training.

Per frame t (see ``docs/lmeec_semantics.md`` for the reference's exact control flow), for a
batch of B objects:

1. the memory policy gives what frame t attends to (``policy.read``: at inference the
   compressed dual bank brought to frame t; in training the plain window);
2. source memory of frame t from the source features and the binary source mask
   (``sigmoid(m)*20-10``, object treated as present);
3. view expert V: memory attention of the target features over that memory only;
4. memory expert M: memory attention over [source slots | target slots | pointer tokens],
   masked slots getting no weight;
5. ``MV_MoE(M, V)`` where the policy says there is past memory, else V (a model built
   without MV_MoE uses M there: the training variant ``mv_moe: false``);
6. SAM heads on the target with no dense prompt and single-mask output;
7. target memory from the predicted high-res logits; the frame's memories and object
   pointer are stored (``policy.write``).

Everything is a pure function of (model, policy, state, inputs) with static shapes, so a
``lax.scan`` over frames compiles once per chunk shape. The memory policies are in
:mod:`lmeec_jax.tracking.policies`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmeec_jax.models.sam2 import SAM2Model
from lmeec_jax.tracking.policies import MemoryRead, NewMemory

__all__ = ["FrameInput", "FrameOutput", "frame_step", "source_memory_and_view", "memory_expert",
           "heads_and_target_memory"]


class FrameInput(NamedTuple):
    """Inputs of one frame. Feature maps have a leading 1 (shared by the B objects) or B."""

    tgt_fpn: tuple  # 3 levels: [., 4h, 4w, C/8], [., 2h, 2w, C/4], [., h, w, C]
    tgt_pos: jax.Array  # [., h, w, C] position encoding of the lowest level
    src_feat: jax.Array  # [., h, w, C] source view, lowest level
    src_mask: jax.Array  # [B, S, S] float 0/1, the source GT mask at image size
    processed: jax.Array  # [B] bool: run this frame for this object (False: state untouched)
    t: jax.Array  # () int32 frame index in the video


class FrameOutput(NamedTuple):
    high_res_logits: jax.Array  # [B, S, S] float32
    low_res_logits: jax.Array  # [B, 4h, 4w] float32 (h = image_size / 16)
    ious: jax.Array  # [B] float32
    object_score_logits: jax.Array  # [B] float32
    processed: jax.Array  # [B] bool (False: skipped frame, no prediction)


def _flat(x):
    return x.reshape(x.shape[0], -1, x.shape[-1])


def source_memory_and_view(model: SAM2Model, src_feat, src_mask, tgt_feat, tgt_pos, *, deterministic=True):
    """Steps 2-3: (source memory [B, N, mem], its pos, the view expert V [B, h, w, C])."""
    B = src_mask.shape[0]
    src_mem, src_pos = model.encode_new_memory(src_feat, src_mask.astype(src_feat.dtype)[..., None], None)
    src_mem, src_pos = _flat(src_mem), _flat(src_pos)
    V = model.attend_memory(tgt_feat, tgt_pos, src_mem[:, None], src_pos[:, None], jnp.ones((B, 1), bool),
                            deterministic=deterministic)
    return src_mem, src_pos, V.astype(tgt_feat.dtype)


def memory_expert(model: SAM2Model, tgt_feat, tgt_pos, read: MemoryRead, *, deterministic=True):
    """Step 4: M over [source slots | target slots | pointer tokens]; invalid keys are zeros
    with no attention weight (they shift no RoPE or temporal encoding)."""
    B, h, w, C = tgt_feat.shape
    N = read.feats.shape[2]
    tokens, tok_pos = model.obj_ptr_tokens(read.ptrs, read.ptr_tdiff, read.t_diff_max)
    k = tokens.shape[1] // max(read.ptrs.shape[1], 1)
    dt = read.feats.dtype
    memory = jnp.concatenate([_flat(read.feats), tokens.astype(dt)], axis=1)
    memory_pos = jnp.concatenate([_flat(read.pos), tok_pos.astype(read.pos.dtype)], axis=1)
    valid = jnp.concatenate([jnp.repeat(read.valid, N, axis=1), jnp.repeat(read.ptr_valid, k, axis=1)], axis=1)
    memory = jnp.where(valid[..., None], memory, 0)
    memory_pos = jnp.where(valid[..., None], memory_pos, 0)
    M = model.memory_attention(curr=_flat(tgt_feat), curr_pos=_flat(tgt_pos), memory=memory, memory_pos=memory_pos,
                               num_obj_ptr_tokens=tokens.shape[1], memory_mask=valid, deterministic=deterministic)
    return M.reshape(tgt_feat.shape).astype(tgt_feat.dtype)


def heads_and_target_memory(model: SAM2Model, fused, fpn0, fpn1, tgt_feat, *, deterministic=True):
    """Steps 6-7: SAM heads (no dense prompt, one mask) and the target memory of their output.
    Returns (heads dict, target memory [B, N, mem], its pos)."""
    out = model.forward_sam_heads(fused.astype(tgt_feat.dtype), high_res_features=[fpn0, fpn1],
                                  multimask_output=False, add_dense_prompt=False, training=not deterministic)
    tgt_mem, tgt_pos = model.encode_new_memory(tgt_feat, out["high_res_masks"], out["object_score_logits"])
    return out, _flat(tgt_mem), _flat(tgt_pos)


def frame_step(model: SAM2Model, policy, state, inp: FrameInput, *, deterministic: bool = True):
    """One LM-EEC frame for B objects over the memory of ``policy``. Returns (state, FrameOutput)."""
    B = inp.src_mask.shape[0]
    t = jnp.asarray(inp.t, jnp.int32)
    bcast = lambda x: jnp.broadcast_to(x, (B,) + x.shape[1:])
    fpn0, fpn1, tgt_feat = (bcast(x) for x in inp.tgt_fpn)
    tgt_pos, src_feat = bcast(inp.tgt_pos), bcast(inp.src_feat)

    state, read = policy.read(state, t, inp.processed, model.tpos_enc(jnp.arange(model.cfg.num_maskmem)))
    src_mem, src_pos, V = source_memory_and_view(model, src_feat, inp.src_mask, tgt_feat, tgt_pos,
                                                 deterministic=deterministic)
    M = memory_expert(model, tgt_feat, tgt_pos, read, deterministic=deterministic)
    fused = model.MV_MoE(M, V) if model.cfg.mv_moe else M
    fused = jnp.where(read.has_memory[:, None, None, None], fused, V)
    out, tgt_mem, tgt_mem_pos = heads_and_target_memory(model, fused, fpn0, fpn1, tgt_feat,
                                                        deterministic=deterministic)
    dt = read.feats.dtype
    state = policy.write(state, t, NewMemory(src_mem.astype(dt), src_pos.astype(dt), tgt_mem.astype(dt),
                                             tgt_mem_pos.astype(dt), out["obj_ptr"].astype(read.ptrs.dtype)),
                         inp.processed)
    f32 = lambda x: x.astype(jnp.float32)
    return state, FrameOutput(f32(out["high_res_masks"][..., 0]), f32(out["low_res_masks"][..., 0]),
                              f32(out["ious"][:, 0]), f32(out["object_score_logits"][:, 0]), inp.processed)
