"""LM-EEC's dual memory bank (source-view bank + target-view bank + target object pointers),
as the reference runs it at inference, in a **fixed-slot form** for ``lax.scan``
(:class:`MemoryBank`, :class:`PointerBank`, :class:`DualMemoryState`, :func:`advance`,
:func:`commit`, :func:`assemble_memory`): every array has a static shape, slots carry a
validity mask, valid slots are kept left-aligned and ordered oldest -> newest, so that a
slot's index *is* the reference's list position (which picks its temporal encoding
``maskmem_tpos_enc[num_maskmem - 2 - i]``). The literal list form of the reference (the
test oracle) is ``tests/memory_oracle.py``.

The exact reference semantics (with line numbers) are written down in
``docs/lmeec_semantics.md``. In short, per *processed* frame ``t`` (skipped frames -- empty
source mask -- touch nothing):

1. ``advance``: if fewer than ``num_maskmem`` (7) target frames have been processed before
   ``t``, each bank is the plain SAM 2 window: the processed frames in ``[t-6, t-1]``, oldest
   first. Otherwise the banks carried from the previous processed frame get frame ``t-1``
   appended *only if* ``t-1`` was processed, and each bank is then compressed back to its
   previous size by :func:`compress_list` / :func:`compress_bank`.
2. the tracker attends over :func:`assemble_memory` (source slots | target slots | object
   pointer tokens), runs the heads, and
3. ``commit`` stores frame ``t``'s memories as *pending* (they enter a bank at the next
   processed frame, if at all) and pushes its object pointer.

Compression (reference ``memory_bank_compress``, sam2_base.py l.1789-1844): stack the bank as
``[T, N, C]``; for every spatial token ``n``, ``d[t] = ||x[t, n] - x[t+1, n]||_2`` over C;
``k = argmin_t d`` (first minimum on ties); drop entry ``k + 1`` *for that token only*;
position encodings are gathered with the same indices. Nothing is averaged (the reference's
``scatter_add`` results are discarded, all sizes are 1).

Distance precision: ``diff_dtype`` is the dtype of the subtraction ``x[t] - x[t+1]``; the
squared sum and sqrt are always float32 (the reference runs ``torch.norm`` under CUDA
autocast, which computes ``linalg_vector_norm`` in float32). ``diff_dtype=None`` subtracts in
the dtype of the stacked entries (the literal torch behaviour); ``"autocast"`` reproduces the
reference run under bf16 autocast: its stored memories are bf16, so the *first* compression
of a bank subtracts in bf16, but ``memory_bank_compress`` returns float32 (it divides by
float32 ones), so every later stack is promoted to float32 and later subtractions are f32.
Default: float32 throughout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "AUTOCAST",
    "adjacent_distances",
    "MemoryBank",
    "PointerBank",
    "Pending",
    "DualMemoryState",
    "StepInfo",
    "AttentionMemory",
    "empty_bank",
    "left_align",
    "compress_bank",
    "append_slot",
    "init_state",
    "advance",
    "commit",
    "select_tree",
    "bank_tpos_index",
    "pointer_tdiff",
    "has_past_memory",
    "assemble_memory",
    "training_window_tpos_index",
]

AUTOCAST = "autocast"


# --------------------------------------------------------------------------------------
# the rule on a plain [T, N, C] stack
# --------------------------------------------------------------------------------------


def _round_to(x, dtype):
    """Round float32 ``x`` to the values of a narrower float ``dtype``, in float32.

    ``lax.reduce_precision`` rather than ``astype(dtype).astype(f32)``: under jit XLA treats a
    convert round trip as removable excess precision (``xla_allow_excess_precision``), which
    silently turns a "bf16 subtraction" into an f32 one.
    """
    fi = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def adjacent_distances(feats, diff_dtype: Any = jnp.float32):
    """``d[t, n] = ||feats[t, n] - feats[t + 1, n]||_2`` over the last axis, ``[T-1, N]`` float32.

    ``diff_dtype``: dtype of the subtraction (None = the dtype of ``feats``); the norm is f32.
    A narrower dtype (bf16) is emulated as torch computes it on CUDA: operands rounded to that
    dtype, subtracted in float32, the difference rounded to that dtype.
    """
    feats = jnp.asarray(feats)
    dt = jnp.dtype(feats.dtype if diff_dtype is None else diff_dtype)
    a, b = feats[:-1].astype(jnp.float32), feats[1:].astype(jnp.float32)
    if jnp.finfo(dt).bits < 32:
        d = _round_to(_round_to(a, dt) - _round_to(b, dt), dt)
    elif dt == jnp.float32:
        d = a - b
    else:
        raise ValueError(f"unsupported diff_dtype {dt}")
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


def _gather_slots(x, idx):
    """``out[j, n, ...] = x[idx[j, n], n, ...]`` for ``x [T, N, ...]`` and ``idx [T', N]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=0)


def _keep_indices(k, t_out: int):
    """Source slot of each output slot after dropping ``k + 1``: ``j if j <= k else j + 1``."""
    j = jnp.arange(t_out, dtype=jnp.int32)[:, None]
    return j + (j > k[None, :]).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# fixed-slot form for lax.scan
# --------------------------------------------------------------------------------------


class MemoryBank(NamedTuple):
    """A bank of spatial memories in ``S`` fixed slots, valid slots left-aligned, oldest first.

    ``frame`` is per slot *and token*: after compression a slot holds, for each spatial token,
    the entry of a possibly different frame (the drop is per token). While the bank is a plain
    window all tokens of a slot share one frame. Invalid slots: zeros and frame -1.
    """

    feats: jax.Array  # [S, N, C]
    pos: jax.Array  # [S, N, C] spatial position encoding (no temporal encoding)
    valid: jax.Array  # [S] bool
    frame: jax.Array  # [S, N] int32

    @property
    def size(self):
        return jnp.sum(self.valid.astype(jnp.int32))


class PointerBank(NamedTuple):
    """Target-view object pointers of the last processed frames, newest first."""

    feats: jax.Array  # [P, D]
    valid: jax.Array  # [P] bool
    frame: jax.Array  # [P] int32


class Pending(NamedTuple):
    """Memories of the last processed frame, not yet in a bank (frame -1: none)."""

    src_feats: jax.Array  # [N, C]
    src_pos: jax.Array
    tgt_feats: jax.Array
    tgt_pos: jax.Array
    frame: jax.Array  # () int32


class DualMemoryState(NamedTuple):
    src: MemoryBank  # source view (memory of the GT source mask), S = num_maskmem - 1 slots
    tgt: MemoryBank  # target view (memory of the predicted mask)
    ptr: PointerBank  # P = max_obj_ptrs - 1 slots
    pending: Pending
    n_processed: jax.Array  # () int32: len(exo_output_dict["non_cond_frame_outputs"])
    n_compressions: jax.Array  # () int32: compressions done so far (same for both banks)


class StepInfo(NamedTuple):
    compress_mode: jax.Array  # () bool: n_processed >= num_maskmem at this frame
    appended: jax.Array  # () bool: frame t-1 was appended and both banks compressed
    ref_would_crash: jax.Array  # () bool: the reference raises here (1-entry compression)
    drop_src: jax.Array  # [N] int32: dropped list position per token (-1 none)
    drop_tgt: jax.Array  # [N] int32


def select_tree(pred, on_true, on_false):
    """``jnp.where(pred, a, b)`` leaf by leaf (pred a scalar bool)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def empty_bank(num_slots: int, num_tokens: int, dim: int, dtype=jnp.float32) -> MemoryBank:
    return MemoryBank(
        feats=jnp.zeros((num_slots, num_tokens, dim), dtype),
        pos=jnp.zeros((num_slots, num_tokens, dim), dtype),
        valid=jnp.zeros((num_slots,), bool),
        frame=jnp.full((num_slots, num_tokens), -1, jnp.int32),
    )


def _clean(bank: MemoryBank) -> MemoryBank:
    """Zero the invalid slots (frame -1) so that their contents are canonical."""
    v = bank.valid
    return MemoryBank(
        feats=jnp.where(v[:, None, None], bank.feats, 0).astype(bank.feats.dtype),
        pos=jnp.where(v[:, None, None], bank.pos, 0).astype(bank.pos.dtype),
        valid=v,
        frame=jnp.where(v[:, None], bank.frame, -1),
    )


def left_align(bank: MemoryBank) -> MemoryBank:
    """Move the valid slots to the front, keeping their order (stable); zero the rest."""
    order = jnp.argsort(jnp.logical_not(bank.valid).astype(jnp.int32), stable=True)
    return _clean(jax.tree.map(lambda x: jnp.take(x, order, axis=0), bank))


def append_slot(bank: MemoryBank, feats, pos, frame, do_append=True, *, grow: bool = False) -> MemoryBank:
    """Write one entry into the first free slot of a left-aligned bank (if ``do_append``).

    ``grow=True`` first adds one empty slot (S -> S+1), so a full bank can take the entry.
    Without ``grow`` a full bank is left unchanged.
    """
    if grow:
        pad = empty_bank(1, bank.feats.shape[1], bank.feats.shape[2], bank.feats.dtype)
        bank = jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=0), bank, pad)
    S = bank.valid.shape[0]
    at = (jnp.arange(S) == bank.size) & jnp.asarray(do_append, bool)  # [S] one-hot (or none)
    return MemoryBank(
        feats=jnp.where(at[:, None, None], jnp.asarray(feats, bank.feats.dtype)[None], bank.feats),
        pos=jnp.where(at[:, None, None], jnp.asarray(pos, bank.pos.dtype)[None], bank.pos),
        valid=bank.valid | at,
        frame=jnp.where(at[:, None], jnp.asarray(frame, jnp.int32), bank.frame),
    )


def compress_bank(bank: MemoryBank, diff_dtype: Any = jnp.float32):
    """The compression rule on fixed slots: ``S`` slots -> ``S - 1`` slots.

    The valid entries (first left-aligned, order kept) are compressed exactly as
    :func:`compress_list` would compress the list of valid entries: pairs that involve an
    invalid slot get distance +inf, so they are never chosen and their contents (even NaN)
    cannot change the result. With L valid entries the result has L - 1 (L <= 1 gives an
    empty bank; the reference crashes on L == 1). ``diff_dtype``: a dtype, or None (the
    bank's dtype); :func:`advance` handles ``"autocast"``.

    Returns ``(bank [S-1 slots], drop [N] int32)``; ``drop[n]`` is the removed slot index.
    """
    bank = left_align(bank)
    return _compress_aligned(bank, adjacent_distances(bank.feats, diff_dtype))


def _compress_aligned(bank: MemoryBank, d):
    S = bank.valid.shape[0]
    pair_ok = bank.valid[:-1] & bank.valid[1:]  # [S-1]
    d = jnp.where(pair_ok[:, None], d, jnp.inf)
    k = jnp.argmin(d, axis=0).astype(jnp.int32)  # [N]; first minimum
    idx = _keep_indices(k, S - 1)
    out = MemoryBank(
        feats=_gather_slots(bank.feats, idx),
        pos=_gather_slots(bank.pos, idx),
        valid=bank.valid[1:],  # L valid -> L-1 valid, still a prefix
        frame=_gather_slots(bank.frame, idx),
    )
    return _clean(out), k + 1


def init_state(num_tokens: int = 900, mem_dim: int = 64, ptr_dim: int = 256, *, num_maskmem: int = 7,
               max_obj_ptrs: int = 16, dtype=jnp.float32) -> DualMemoryState:
    """An empty state: ``num_maskmem - 1`` bank slots, ``max_obj_ptrs - 1`` pointer slots."""
    S, P = num_maskmem - 1, max_obj_ptrs - 1
    z = jnp.zeros((num_tokens, mem_dim), dtype)
    return DualMemoryState(
        src=empty_bank(S, num_tokens, mem_dim, dtype),
        tgt=empty_bank(S, num_tokens, mem_dim, dtype),
        ptr=PointerBank(jnp.zeros((P, ptr_dim), dtype), jnp.zeros((P,), bool), jnp.full((P,), -1, jnp.int32)),
        pending=Pending(z, z, z, z, jnp.asarray(-1, jnp.int32)),
        n_processed=jnp.asarray(0, jnp.int32),
        n_compressions=jnp.asarray(0, jnp.int32),
    )


def _window_update(bank: MemoryBank, feats, pos, pframe, lo, has_pending) -> MemoryBank:
    """Plain SAM 2 window at frame t: processed frames in [lo, t-1] = the previous window minus
    frames < lo, plus the pending (previous processed) frame if it is >= lo."""
    keep = bank.valid & (bank.frame[:, 0] >= lo)
    bank = left_align(bank._replace(valid=keep))
    return append_slot(bank, feats, pos, jnp.full(bank.frame.shape[1:], pframe, jnp.int32),
                       has_pending & (pframe >= lo))


def _is_autocast(diff_dtype) -> bool:
    return isinstance(diff_dtype, str) and diff_dtype == AUTOCAST


def _distances_for(feats, diff_dtype, first):
    if _is_autocast(diff_dtype):
        return jnp.where(first, adjacent_distances(feats, jnp.bfloat16), adjacent_distances(feats, jnp.float32))
    return adjacent_distances(feats, diff_dtype)


def _append_compress(bank: MemoryBank, feats, pos, pframe, diff_dtype, first):
    grown = append_slot(bank, feats, pos, jnp.full(bank.frame.shape[1:], pframe, jnp.int32), True, grow=True)
    grown = left_align(grown)
    return _compress_aligned(grown, _distances_for(grown.feats, diff_dtype, first))


def advance(state: DualMemoryState, t, processed=True, *, num_maskmem: int = 7,
            diff_dtype: Any = jnp.float32):
    """Bring the banks to what the reference attends to at frame ``t``.

    Call once per frame, before the model step; ``processed=False`` (skipped frame) returns
    the state unchanged. Jittable with traced ``t`` / ``processed``.
    Returns ``(state, StepInfo)``.
    """
    t = jnp.asarray(t, jnp.int32)
    processed = jnp.asarray(processed, bool)
    pend = state.pending
    has_pending = pend.frame >= 0
    compress_mode = state.n_processed >= num_maskmem
    lo = t - (num_maskmem - 1)

    win_src = _window_update(state.src, pend.src_feats, pend.src_pos, pend.frame, lo, has_pending)
    win_tgt = _window_update(state.tgt, pend.tgt_feats, pend.tgt_pos, pend.frame, lo, has_pending)

    do_append = compress_mode & has_pending & (pend.frame == t - 1)
    first = state.n_compressions == 0
    cmp_src, drop_src = _append_compress(state.src, pend.src_feats, pend.src_pos, pend.frame, diff_dtype, first)
    cmp_tgt, drop_tgt = _append_compress(state.tgt, pend.tgt_feats, pend.tgt_pos, pend.frame, diff_dtype, first)

    src = select_tree(compress_mode, select_tree(do_append, cmp_src, state.src), win_src)
    tgt = select_tree(compress_mode, select_tree(do_append, cmp_tgt, state.tgt), win_tgt)
    new = state._replace(src=src, tgt=tgt, n_compressions=state.n_compressions + do_append.astype(jnp.int32))
    out = select_tree(processed, new, state)
    none = jnp.full(drop_src.shape, -1, jnp.int32)
    info = StepInfo(
        compress_mode=compress_mode & processed,
        appended=do_append & processed,
        ref_would_crash=do_append & processed & (state.src.size == 0),
        drop_src=jnp.where(do_append & processed, drop_src, none),
        drop_tgt=jnp.where(do_append & processed, drop_tgt, none),
    )
    return out, info


def commit(state: DualMemoryState, t, src_feats, src_pos, tgt_feats, tgt_pos, obj_ptr,
           processed=True) -> DualMemoryState:
    """After the model step on frame ``t``: its memories become pending, its object pointer is
    pushed (newest first), ``n_processed`` += 1. ``processed=False`` leaves the state as is."""
    t = jnp.asarray(t, jnp.int32)
    dt = state.pending.src_feats.dtype
    pend = Pending(
        jnp.asarray(src_feats, dt), jnp.asarray(src_pos, dt), jnp.asarray(tgt_feats, dt),
        jnp.asarray(tgt_pos, dt), t,
    )
    p = state.ptr
    ptr = PointerBank(
        feats=jnp.concatenate([jnp.asarray(obj_ptr, p.feats.dtype)[None], p.feats[:-1]], axis=0),
        valid=jnp.concatenate([jnp.ones((1,), bool), p.valid[:-1]]),
        frame=jnp.concatenate([t[None], p.frame[:-1]]),
    )
    new = state._replace(pending=pend, ptr=ptr, n_processed=state.n_processed + 1)
    return select_tree(jnp.asarray(processed, bool), new, state)


def bank_tpos_index(num_slots: int, num_maskmem: int = 7):
    """``maskmem_tpos_enc`` index of each slot at inference: ``num_maskmem - 2 - i``."""
    return num_maskmem - 2 - jnp.arange(num_slots, dtype=jnp.int32)


def training_window_tpos_index(frames, t, num_maskmem: int = 7):
    """Training (``_prepare_memory_conditioned_features_wo_prompt``, l.645): a window entry of
    frame ``f`` gets ``num_maskmem - t_pos - 1`` with ``t_pos = num_maskmem - (t - f)``, i.e.
    ``t - f - 1`` (the previous frame gets 0). Not the inference rule."""
    del num_maskmem
    return jnp.asarray(t, jnp.int32) - jnp.asarray(frames, jnp.int32) - 1


def pointer_tdiff(state: DualMemoryState, t, num_frames, *, max_obj_ptrs: int = 16):
    """``(t_diff [P] int32, valid [P] bool, t_diff_max)`` of the pointer slots at frame ``t``.

    A pointer is used if its frame is within ``t - (min(num_frames, max_obj_ptrs) - 1)``.
    Its temporal encoding (model side) is ``get_1d_sine_pe(t_diff / t_diff_max, dim=256)``
    followed by ``obj_ptr_tpos_proj``. ``num_frames`` may be traced.
    """
    t = jnp.asarray(t, jnp.int32)
    t_diff_max = jnp.minimum(jnp.asarray(num_frames, jnp.int32), max_obj_ptrs) - 1
    tdiff = t - state.ptr.frame
    valid = state.ptr.valid & (tdiff >= 1) & (tdiff <= t_diff_max)
    return jnp.where(valid, tdiff, 0), valid, t_diff_max


def has_past_memory(state: DualMemoryState, t=None, num_frames=None, *, max_obj_ptrs: int = 16):
    """The reference's MV_MoE condition (l.995): source bank non-empty and (target bank or
    pointers) non-empty. Both banks always have the same size, so this is ``src non-empty``;
    when it is False the output is the view expert V (pointers alone are ignored)."""
    out = jnp.any(state.src.valid)
    if t is not None and num_frames is not None:
        _, pv, _ = pointer_tdiff(state, t, num_frames, max_obj_ptrs=max_obj_ptrs)
        out = out & (jnp.any(state.tgt.valid) | jnp.any(pv))
    return out


class AttentionMemory(NamedTuple):
    memory: jax.Array  # [K, C]
    memory_pos: jax.Array  # [K, C]
    valid: jax.Array  # [K] bool: key mask (invalid keys must get no attention weight)
    num_obj_ptr_tokens: int  # static: the last tokens, excluded from RoPE
    has_memory: jax.Array  # () bool: use MV_MoE (else V)


def assemble_memory(state: DualMemoryState, t, maskmem_tpos_enc, ptr_pos, num_frames, *,
                    num_maskmem: int = 7, max_obj_ptrs: int = 16) -> AttentionMemory:
    """The fused memory of the memory expert M at frame ``t`` (call after :func:`advance`).

    Key order as in the reference (l.995-1001): source slots (slot-major, N tokens each, oldest
    first) | target slots | object-pointer tokens (newest pointer first; each pointer of dim D
    split into D // C tokens of C, pointer-major, each token carrying its pointer's pos).
    ``maskmem_tpos_enc``: ``[num_maskmem, 1, 1, C]`` (or ``[num_maskmem, C]``); slot i gets
    ``maskmem_tpos_enc[num_maskmem - 2 - i]`` added to its spatial pos. ``ptr_pos``: ``[P, C]``,
    the projected temporal encoding of each pointer slot (see :func:`pointer_tdiff`).
    Invalid keys are zeros with ``valid`` False. RoPE: the ``2 * S * N`` spatial keys use the
    frequency grid repeated per slot, so masked slots do not shift any other key.
    """
    src, tgt = state.src, state.tgt
    S, N, C = src.feats.shape
    tpos = jnp.reshape(maskmem_tpos_enc, (num_maskmem, -1))[bank_tpos_index(S, num_maskmem)]  # [S, C]
    _, pvalid, _ = pointer_tdiff(state, t, num_frames, max_obj_ptrs=max_obj_ptrs)
    P, D = state.ptr.feats.shape
    split = D // C
    ptr_tok = state.ptr.feats.reshape(P * split, C)
    ptr_tok_pos = jnp.repeat(jnp.asarray(ptr_pos).reshape(P, C), split, axis=0)
    ptr_tok_valid = jnp.repeat(pvalid, split)

    def spatial(bank):
        m = bank.feats.reshape(S * N, C)
        p = (bank.pos + tpos[:, None, :].astype(bank.pos.dtype)).reshape(S * N, C)
        return m, p, jnp.repeat(bank.valid, N)

    sm, sp, sv = spatial(src)
    tm, tp, tv = spatial(tgt)
    memory = jnp.concatenate([sm, tm, ptr_tok.astype(sm.dtype)], axis=0)
    pos = jnp.concatenate([sp, tp, ptr_tok_pos.astype(sp.dtype)], axis=0)
    valid = jnp.concatenate([sv, tv, ptr_tok_valid])
    memory = jnp.where(valid[:, None], memory, 0)
    pos = jnp.where(valid[:, None], pos, 0)
    has = jnp.any(src.valid) & (jnp.any(tgt.valid) | jnp.any(pvalid))
    return AttentionMemory(memory, pos, valid, P * split, has)
