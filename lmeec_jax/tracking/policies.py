"""The two memories the LM-EEC frame step runs over, as fixed-slot policies for ``lax.scan``.

A policy owns a memory *state* (a pytree of static shape, batched over B objects) and two
pure functions used by :func:`lmeec_jax.tracking.frame_step.frame_step`:

* ``read(state, t, processed) -> (state, MemoryRead)``: what frame ``t`` attends to;
* ``write(state, t, NewMemory, processed) -> state``: frame ``t``'s memories stored.

:class:`CompressedDualMemory` is the inference memory of the reference (the compressed
dual bank with list-position temporal encodings, skipped frames touch nothing;
:mod:`lmeec_jax.tracking.memory`); :class:`TrainingWindow` is the training memory (the
plain window of the last ``num_maskmem - 1`` frames with frame-distance encodings, every
frame processed, gradients flowing through the memories). See ``docs/lmeec_semantics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmeec_jax.tracking import memory as mem

__all__ = ["MemoryRead", "NewMemory", "CompressedDualMemory", "TrainingWindow"]


class MemoryRead(NamedTuple):
    """The memory of one frame for B objects (spatial slots: source slots, then target slots)."""

    feats: jax.Array  # [B, 2S, N, mem]
    pos: jax.Array  # [B, 2S, N, mem] spatial + temporal encoding
    valid: jax.Array  # [B, 2S] bool
    ptrs: jax.Array  # [B, P, C] target-view object pointers
    ptr_tdiff: jax.Array  # [B, P] int32 frame distance (0 where invalid)
    ptr_valid: jax.Array  # [B, P] bool
    t_diff_max: jax.Array  # () or [B, 1] pointer temporal-encoding normaliser (per object at inference)
    has_memory: jax.Array  # [B] bool: fuse with MV_MoE (else the view expert alone)


class NewMemory(NamedTuple):
    """What a frame step produces for the memory, B objects."""

    src: jax.Array  # [B, N, mem] source memory (GT source mask)
    src_pos: jax.Array  # [B, N, mem]
    tgt: jax.Array  # [B, N, mem] target memory (predicted mask)
    tgt_pos: jax.Array  # [B, N, mem]
    obj_ptr: jax.Array  # [B, C]


@dataclass(frozen=True)
class CompressedDualMemory:
    """Inference: LM-EEC's compressed dual memory bank (``memory.advance`` / ``commit``).

    ``num_frames``: the video length (pointer window), may be traced, () or [B] (one per object:
    objects of one batch may have frame lists of different lengths); ``diff_dtype``: the
    dtype of the compression distances (``memory.AUTOCAST`` mirrors a bf16-autocast run).
    """

    cfg: Any  # ModelConfig
    num_frames: Any
    diff_dtype: Any = jnp.float32

    def init(self, batch: int, dtype=jnp.float32) -> mem.DualMemoryState:
        c = self.cfg
        one = mem.init_state(c.feat_size ** 2, c.mem_dim, c.d_model, num_maskmem=c.num_maskmem,
                             max_obj_ptrs=c.max_obj_ptrs_in_encoder, dtype=dtype)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), one)

    def read(self, state, t, processed, tpos_table):
        """``t``: the frame index, () or [B] (each object's index in its own frame list);
        ``num_frames`` likewise () or [B]."""
        c = self.cfg
        nm, mp = c.num_maskmem, c.max_obj_ptrs_in_encoder
        B = processed.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (B,))
        nf = jnp.broadcast_to(jnp.asarray(self.num_frames, jnp.int32), (B,))
        state, _ = jax.vmap(lambda s, tt, p: mem.advance(s, tt, p, num_maskmem=nm, diff_dtype=self.diff_dtype))(
            state, t, processed)
        S = state.src.valid.shape[1]
        tpos = tpos_table[mem.bank_tpos_index(S, nm)]  # [S, mem]: list position i -> nm - 2 - i
        tdiff, pvalid, tmax = jax.vmap(lambda s, tt, n: mem.pointer_tdiff(s, tt, n, max_obj_ptrs=mp))(state, t, nf)
        both = lambda a, b: jnp.concatenate([a, b], axis=1)
        read = MemoryRead(
            feats=both(state.src.feats, state.tgt.feats),
            pos=both(state.src.pos + tpos[None, :, None, :].astype(state.src.pos.dtype),
                     state.tgt.pos + tpos[None, :, None, :].astype(state.tgt.pos.dtype)),
            valid=both(state.src.valid, state.tgt.valid),
            ptrs=state.ptr.feats, ptr_tdiff=tdiff, ptr_valid=pvalid, t_diff_max=tmax[:, None],
            has_memory=jnp.any(state.src.valid, 1) & (jnp.any(state.tgt.valid, 1) | jnp.any(pvalid, 1)),
        )
        return state, read

    def write(self, state, t, new: NewMemory, processed):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), processed.shape)
        return jax.vmap(lambda s, tt, sm, sp, tm, tp, op, p: mem.commit(s, tt, sm, sp, tm, tp, op, p))(
            state, t, new.src, new.src_pos, new.tgt, new.tgt_pos, new.obj_ptr, processed)


@dataclass(frozen=True)
class TrainingWindow:
    """Training (``SAM2Train``): the plain window of frames ``t-W .. t-1`` (W = num_maskmem - 1),
    slot ``j`` = frame ``t - W + j`` with ``maskmem_tpos_enc[t - f - 1]``; pointers of frames
    ``t-1 .. t-P`` (newest first, P = min(T, max_obj_ptrs) - 1) normalised by P; the memory
    expert is used from frame 1 on. Every frame is processed (``processed`` is ignored)."""

    cfg: Any
    num_frames: int  # static clip length T

    @property
    def window(self) -> int:
        return self.cfg.num_maskmem - 1

    @property
    def pointers(self) -> int:
        return min(self.num_frames, self.cfg.max_obj_ptrs_in_encoder) - 1

    def init(self, batch: int, n_tokens: int, dtype=jnp.float32) -> dict:
        W, P, c = self.window, self.pointers, self.cfg
        z = jnp.zeros((batch, W, n_tokens, c.mem_dim), dtype)
        return dict(src=z, src_pos=z, tgt=z, tgt_pos=z, ptr=jnp.zeros((batch, P, c.d_model), dtype))

    def read(self, state, t, processed, tpos_table):
        del processed
        W, P = self.window, self.pointers
        B = state["src"].shape[0]
        slot, pslot = jnp.arange(W, dtype=jnp.int32), jnp.arange(P, dtype=jnp.int32)
        tpos = tpos_table[mem.training_window_tpos_index(slot - W, 0)]  # frame t-W+j -> W-1-j
        win_valid = (t - W + slot) >= 0
        ptr_valid = jnp.broadcast_to(((t - 1 - pslot) >= 0)[None], (B, P))
        both = lambda a, b: jnp.concatenate([a, b], axis=1)
        add_t = lambda p: p + tpos[None, :, None, :].astype(p.dtype)
        read = MemoryRead(
            feats=both(state["src"], state["tgt"]),
            pos=both(add_t(state["src_pos"]), add_t(state["tgt_pos"])),
            valid=jnp.broadcast_to(both(win_valid[None], win_valid[None]), (B, 2 * W)),
            ptrs=state["ptr"], ptr_tdiff=jnp.where(ptr_valid, pslot[None] + 1, 0), ptr_valid=ptr_valid,
            t_diff_max=jnp.asarray(P, jnp.int32),
            has_memory=jnp.broadcast_to(t >= 1, (B,)),  # the source window is non-empty from frame 1 on
        )
        return state, read

    def write(self, state, t, new: NewMemory, processed):
        del t, processed
        shift = lambda buf, x: jnp.concatenate([buf[:, 1:], x[:, None].astype(buf.dtype)], 1)  # oldest first
        return dict(src=shift(state["src"], new.src), src_pos=shift(state["src_pos"], new.src_pos),
                    tgt=shift(state["tgt"], new.tgt), tgt_pos=shift(state["tgt_pos"], new.tgt_pos),
                    ptr=jnp.concatenate([new.obj_ptr[:, None].astype(state["ptr"].dtype), state["ptr"][:, :-1]], 1))
