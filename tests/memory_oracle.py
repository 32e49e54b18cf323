"""The reference's inference memory logic written literally (Python lists of processed
frames, a bank rebuilt from the window or appended-and-compressed): the test oracle for the
fixed-slot memory of :mod:`lmeec_jax.tracking.memory`. See that module's doc for the rule."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmeec_jax.tracking.memory import _gather_slots, _is_autocast, _keep_indices, adjacent_distances


@functools.partial(jax.jit, static_argnames=("diff_dtype",))
def _compress_stack(feats, pos, diff_dtype):
    T = feats.shape[0]
    d = adjacent_distances(feats, diff_dtype)  # [T-1, N]
    k = jnp.argmin(d, axis=0).astype(jnp.int32)  # first minimum on ties
    idx = _keep_indices(k, T - 1)
    out_f = _gather_slots(feats, idx)
    out_p = _gather_slots(pos, idx)
    out_f = out_f.astype(jnp.promote_types(out_f.dtype, jnp.float32))
    out_p = out_p.astype(jnp.promote_types(out_p.dtype, jnp.float32))
    return out_f, out_p, k + 1


def compress_list(feats, pos, diff_dtype: Any = jnp.float32):
    """One compression step on a plain stack (the eager reference).

    feats, pos: ``[T, N, C]`` (T >= 2; the reference raises for T == 1, see
    :class:`ReferenceCrash`). Returns ``(feats [T-1, N, C], pos [T-1, N, C], drop [N])`` where
    ``drop[n] = k[n] + 1`` is the entry removed for token ``n``. Outputs are promoted to at
    least float32, as the reference's division by float32 ones does.
    """
    feats, pos = jnp.asarray(feats), jnp.asarray(pos)
    T = feats.shape[0]
    if T < 2:
        raise ValueError(f"compress_list needs at least 2 entries, got {T} (the reference crashes here)")
    if diff_dtype is not None:
        diff_dtype = jnp.dtype(diff_dtype)
    return _compress_stack(feats, pos, diff_dtype)


# --------------------------------------------------------------------------------------


class ReferenceCrash(RuntimeError):
    """Raised where the reference itself crashes: compressing a 1-entry bank (an empty bank at
    the switch to compression gets frame t-1 appended; ``torch.min`` over a 0-sized dim)."""


class EagerMemory(NamedTuple):
    """What the reference attends to at one frame (lists oldest -> newest)."""

    src: list  # source-view bank, each [N, C]
    src_pos: list
    tgt: list  # target-view bank, each [N, C]
    tgt_pos: list
    tpos_index: list  # maskmem_tpos_enc index per list position: num_maskmem - i - 2
    ptr: list  # object pointers [D], newest first
    ptr_tdiff: list  # t - frame of each pointer (1, 2, ...)
    t_diff_max: int  # min(num_frames, max_obj_ptrs) - 1 (pointer tpos normaliser)
    has_memory: bool  # MV_MoE used (else output = view expert V)
    compress_mode: bool
    bank_frames: list  # per list position: [N] array of origin frame per token


class EagerDualMemory:
    """The reference's inference memory logic, literally (LM-EEC ``sam2_base.py``
    ``_prepare_memory_conditioned_features_compress_wo_prompt`` l.775-1016 and
    ``sam2_correspondence_predictor.py`` ``propagate_in_video`` l.781-812).

    Usage per frame ``t`` in order: if the frame is skipped (empty source mask) call nothing;
    else ``mem = gather(t)``, run the model, then ``store(t, ...)``.

    ``diff_dtype``: see the module doc. With ``"autocast"`` the stored memories are kept as
    bfloat16 (as the reference stores them under autocast) and each compression subtracts in
    the dtype of the stack, exactly as torch does.
    """

    def __init__(self, num_frames: int, *, num_maskmem: int = 7, max_obj_ptrs: int = 16,
                 diff_dtype: Any = jnp.float32):
        self.num_frames = num_frames
        self.num_maskmem = num_maskmem
        self.max_obj_ptrs = max_obj_ptrs
        self.diff_dtype = diff_dtype
        # ego_output_dict / exo_output_dict ["non_cond_frame_outputs"] (never pruned)
        self.src_out: dict[int, tuple] = {}
        self.tgt_out: dict[int, tuple] = {}
        # carried lists (ego_memories, exo_memories, *_pos); None before the first frame
        self.src = self.src_pos = self.tgt = self.tgt_pos = None
        self.src_frames = self.tgt_frames = None  # provenance, [N] per entry (not in the reference)

    def _stored(self, x):
        return jnp.asarray(x, jnp.bfloat16) if _is_autocast(self.diff_dtype) else jnp.asarray(x)

    def store(self, t: int, src_feats, src_pos, tgt_feats, tgt_pos, obj_ptr):
        """Frame ``t``'s outputs (``[N, C]`` memories, ``[D]`` pointer) enter the output dicts."""
        n = np.asarray(src_feats).shape[0]
        fr = np.full((n,), t, np.int32)
        self.src_out[t] = (self._stored(src_feats), jnp.asarray(src_pos), fr)
        self.tgt_out[t] = (self._stored(tgt_feats), jnp.asarray(tgt_pos), fr, jnp.asarray(obj_ptr))

    def _compress(self, feats_list, pos_list, frames_list):
        feats = jnp.stack(feats_list)  # promotes like torch.stack (bf16 + f32 -> f32)
        pos = jnp.stack(pos_list)
        if feats.shape[0] < 2:
            raise ReferenceCrash("memory_bank_compress on a 1-entry bank (torch.min over an empty dim)")
        diff = None if _is_autocast(self.diff_dtype) else self.diff_dtype
        f, p, drop = compress_list(feats, pos, diff)
        k = np.asarray(drop) - 1
        fr = np.stack(frames_list)
        j = np.arange(fr.shape[0] - 1)[:, None]
        fr = np.take_along_axis(fr, j + (j > k[None, :]), axis=0)
        return list(f), list(p), list(fr)

    def gather(self, t: int) -> EagerMemory:
        S = self.num_maskmem
        compress_mode = len(self.tgt_out) >= S  # l.806 (inverted)
        if not compress_mode:
            # l.808-873: rebuild from the window t-6 .. t-1 (oldest first), skipping missing
            self.src, self.src_pos, self.tgt, self.tgt_pos = [], [], [], []
            self.src_frames, self.tgt_frames = [], []
            for t_pos in range(1, S):
                prev = t - (S - t_pos)
                if prev not in self.tgt_out:
                    continue
                sf, sp, sfr = self.src_out[prev]
                tf, tp, tfr, _ = self.tgt_out[prev]
                self.src.append(sf), self.src_pos.append(sp), self.src_frames.append(sfr)
                self.tgt.append(tf), self.tgt_pos.append(tp), self.tgt_frames.append(tfr)
        else:
            # l.883-905: append t-1 only if it was processed, then compress both banks
            if (t - 1) in self.tgt_out and (t - 1) in self.src_out:
                sf, sp, sfr = self.src_out[t - 1]
                tf, tp, tfr, _ = self.tgt_out[t - 1]
                self.src, self.src_pos, self.src_frames = self._compress(
                    self.src + [sf], self.src_pos + [sp], self.src_frames + [sfr])
                self.tgt, self.tgt_pos, self.tgt_frames = self._compress(
                    self.tgt + [tf], self.tgt_pos + [tp], self.tgt_frames + [tfr])
        tpos_index = [S - i - 2 for i in range(len(self.tgt))]  # l.907-913
        # l.915-972: object pointers of the target view, newest first
        p_max = min(self.num_frames, self.max_obj_ptrs)
        ptr, ptr_tdiff = [], []
        for t_diff in range(1, p_max):
            f = t - t_diff
            if f < 0 or f >= self.num_frames:
                break
            if f in self.tgt_out:
                ptr.append(self.tgt_out[f][3])
                ptr_tdiff.append(t_diff)
        has_memory = len(self.src) > 0 and (len(self.tgt) + len(ptr)) > 0  # l.995
        return EagerMemory(
            src=list(self.src), src_pos=list(self.src_pos), tgt=list(self.tgt), tgt_pos=list(self.tgt_pos),
            tpos_index=tpos_index, ptr=ptr, ptr_tdiff=ptr_tdiff, t_diff_max=p_max - 1,
            has_memory=has_memory, compress_mode=compress_mode, bank_frames=list(self.tgt_frames),
        )


