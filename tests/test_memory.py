"""LM-EEC dual memory bank: the compression rule and the per-frame bank update
(SPEC point 10; docs/lmeec_semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmeec_jax.tracking import memory as mem
from tests import memory_oracle as oracle

N, C, D = 12, 8, 32  # small tokens / mem_dim / pointer dim (pointer -> 4 tokens of 8)

# jitted entry points (op-by-op dispatch would dominate the run time of these small tests)
_compress_bank = jax.jit(mem.compress_bank, static_argnames=("diff_dtype",))
_advance = jax.jit(mem.advance, static_argnames=("num_maskmem", "diff_dtype"))
_commit = jax.jit(mem.commit)
_pointer_tdiff = jax.jit(mem.pointer_tdiff, static_argnames=("max_obj_ptrs",))
_has_past_memory = jax.jit(mem.has_past_memory, static_argnames=("max_obj_ptrs",))


def _bank(feats, valid=None, frames=None):
    feats = jnp.asarray(feats, jnp.float32)
    S, n, _ = feats.shape
    valid = np.ones(S, bool) if valid is None else np.asarray(valid)
    frames = np.arange(S) if frames is None else np.asarray(frames)
    return mem.MemoryBank(
        feats=feats, pos=feats * 10.0 + 1.0, valid=jnp.asarray(valid),
        frame=jnp.asarray(np.repeat(frames[:, None], n, axis=1), jnp.int32),
    )


# ----------------------------------------------------------------------------- rule


def test_duplicated_frame_is_dropped_for_every_token():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, N, C)).astype(np.float32)
    x[3] = x[2]  # entry 3 duplicates entry 2 -> d[2] = 0 -> drop 3 everywhere
    f, p, drop = oracle.compress_list(x, x + 1.0)
    np.testing.assert_array_equal(np.asarray(drop), 3)
    np.testing.assert_array_equal(np.asarray(f), x[[0, 1, 2, 4]])
    np.testing.assert_array_equal(np.asarray(p), x[[0, 1, 2, 4]] + 1.0)
    out, drop_b = _compress_bank(_bank(x))
    np.testing.assert_array_equal(np.asarray(drop_b), 3)
    np.testing.assert_array_equal(np.asarray(out.frame), np.repeat(np.array([0, 1, 2, 4])[:, None], N, 1))
    np.testing.assert_array_equal(np.asarray(out.feats), x[[0, 1, 2, 4]])


def test_ties_go_to_the_first_minimum():
    # one token, C=1: values 0, 1, 3, 4 -> d = [1, 2, 1] -> tie between pairs 0 and 2 -> k=0, drop 1
    x = np.array([0.0, 1.0, 3.0, 4.0], np.float32).reshape(4, 1, 1)
    f, _, drop = oracle.compress_list(x, x)
    assert int(drop[0]) == 1
    np.testing.assert_array_equal(np.asarray(f).ravel(), [0.0, 3.0, 4.0])
    # all distances equal -> first pair
    y = np.arange(6, dtype=np.float32).reshape(6, 1, 1) * 2.0
    assert int(oracle.compress_list(y, y)[2][0]) == 1
    out, d = _compress_bank(_bank(y))
    assert int(d[0]) == 1


def test_per_token_drops_differ():
    # 4 entries, 3 tokens, C=2; the closest adjacent pair differs per token
    x = np.zeros((4, 3, 2), np.float32)
    x[:, 0, 0] = [0.0, 0.1, 5.0, 9.0]  # token 0: pair 0 closest -> drop 1
    x[:, 1, 0] = [0.0, 5.0, 5.2, 9.0]  # token 1: pair 1 -> drop 2
    x[:, 2, 1] = [0.0, 4.0, 8.0, 8.05]  # token 2: pair 2 -> drop 3
    f, _, drop = oracle.compress_list(x, x)
    np.testing.assert_array_equal(np.asarray(drop), [1, 2, 3])
    f = np.asarray(f)
    np.testing.assert_array_equal(f[:, 0], x[[0, 2, 3], 0])
    np.testing.assert_array_equal(f[:, 1], x[[0, 1, 3], 1])
    np.testing.assert_array_equal(f[:, 2], x[[0, 1, 2], 2])
    out, drop_b = _compress_bank(_bank(x, frames=[10, 11, 12, 13]))
    np.testing.assert_array_equal(np.asarray(out.frame), [[10, 10, 10], [12, 11, 11], [13, 13, 12]])


def test_invalid_slots_never_chosen_and_do_not_change_the_result():
    rng = np.random.default_rng(1)
    for trial in range(12):
        S = 7
        L = int(rng.integers(2, S + 1))
        valid = np.zeros(S, bool)
        valid[rng.choice(S, L, replace=False)] = True  # not left-aligned on purpose
        x = rng.standard_normal((S, N, C)).astype(np.float32)
        garbage = x.copy()
        # invalid slots: NaN, or copies of valid neighbours (distance 0, would win if used)
        for s in np.flatnonzero(~valid):
            garbage[s] = np.nan if trial % 2 else x[np.flatnonzero(valid)[0]]
        want_f, want_p, want_drop = oracle.compress_list(x[valid], x[valid] * 10.0 + 1.0)
        out, drop = _compress_bank(_bank(garbage, valid, frames=np.arange(S)))
        assert int(out.size) == L - 1
        np.testing.assert_array_equal(np.asarray(out.valid), np.arange(S - 1) < L - 1)
        np.testing.assert_array_equal(np.asarray(out.feats)[: L - 1], np.asarray(want_f))
        np.testing.assert_array_equal(np.asarray(out.pos)[: L - 1], np.asarray(want_p))
        np.testing.assert_array_equal(np.asarray(drop), np.asarray(want_drop))
        assert np.all(np.asarray(out.feats)[L - 1:] == 0) and np.all(np.asarray(out.frame)[L - 1:] == -1)
        # the kept frames are the valid frames minus the dropped one, in order
        vf = np.flatnonzero(valid)
        for n in range(N):
            kept = np.delete(vf, int(want_drop[n]))
            np.testing.assert_array_equal(np.asarray(out.frame)[: L - 1, n], kept)


def test_one_entry_and_empty_banks():
    with pytest.raises(ValueError):
        oracle.compress_list(np.zeros((1, N, C), np.float32), np.zeros((1, N, C), np.float32))
    x = np.ones((4, N, C), np.float32)
    out, _ = _compress_bank(_bank(x, valid=[False, True, False, False]))
    assert int(out.size) == 0
    out, _ = _compress_bank(_bank(x, valid=[False] * 4))
    assert int(out.size) == 0


def test_distance_dtype_option():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, N, C)).astype(np.float32)
    d32 = np.asarray(mem.adjacent_distances(x, jnp.float32))
    want = np.linalg.norm(x[:-1].astype(np.float64) - x[1:], axis=-1)
    np.testing.assert_allclose(d32, want, rtol=1e-6)
    dbf = mem.adjacent_distances(x, jnp.bfloat16)
    assert dbf.dtype == jnp.float32  # the norm is always f32
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    diff = np.asarray((jnp.asarray(xb[:-1], jnp.bfloat16) - jnp.asarray(xb[1:], jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dbf), np.linalg.norm(diff, axis=-1), rtol=1e-6)
    # bf16 subtraction rounds the difference: 1 + 2^-7 and 1 differ in f32 but x - y is exact here;
    # with a larger offset the bf16 difference collapses to 0
    a = np.array([[[256.0]], [[257.0]]], np.float32)  # 257 is not a bf16 number (rounds to 256)
    assert float(mem.adjacent_distances(a, jnp.float32)[0, 0]) == 1.0
    assert float(mem.adjacent_distances(a, jnp.bfloat16)[0, 0]) == 0.0


# ----------------------------------------------------------------------------- bank update over time


def _frame_data(rng, T, dup_prob=0.2):
    """Random per-frame memories; some frames repeat a previous frame's memories closely so
    the drops are not all alike."""
    src = rng.standard_normal((T, N, C)).astype(np.float32)
    tgt = rng.standard_normal((T, N, C)).astype(np.float32)
    for t in range(1, T):
        if rng.random() < dup_prob:
            src[t] = src[t - 1] + 0.01 * rng.standard_normal((N, C))
            tgt[t] = tgt[t - 1] + 0.01 * rng.standard_normal((N, C))
    pos = np.broadcast_to(rng.standard_normal((N, C)).astype(np.float32), (T, N, C)).copy()
    pos += 0.001 * np.arange(T, dtype=np.float32)[:, None, None]  # make pos entries traceable
    ptr = rng.standard_normal((T, D)).astype(np.float32)
    return src, pos, tgt, pos + 0.5, ptr


def _check_same(state, info, ref: oracle.EagerMemory, t, num_frames):
    L = len(ref.src)
    state = jax.device_get(state)
    assert int(state.src.size) == L and int(state.tgt.size) == L, (t, int(state.src.size), L)
    assert bool(info.compress_mode) == ref.compress_mode
    for bank, feats, pos in ((state.src, ref.src, ref.src_pos), (state.tgt, ref.tgt, ref.tgt_pos)):
        assert np.all(np.asarray(bank.valid)[:L]) and not np.any(np.asarray(bank.valid)[L:])
        if L:
            np.testing.assert_array_equal(np.asarray(bank.feats)[:L], np.stack([np.asarray(f, np.float32) for f in feats]))
            np.testing.assert_array_equal(np.asarray(bank.pos)[:L], np.stack([np.asarray(p, np.float32) for p in pos]))
    if L:
        np.testing.assert_array_equal(np.asarray(state.tgt.frame)[:L], np.stack(ref.bank_frames))
    np.testing.assert_array_equal(np.asarray(mem.bank_tpos_index(state.src.valid.shape[0]))[:L], ref.tpos_index)
    tdiff, pvalid, tmax = _pointer_tdiff(state, t, num_frames)
    assert int(tmax) == ref.t_diff_max
    pv = np.asarray(pvalid)
    np.testing.assert_array_equal(np.asarray(tdiff)[pv], ref.ptr_tdiff)
    if ref.ptr:
        np.testing.assert_array_equal(np.asarray(state.ptr.feats)[pv], np.stack([np.asarray(p) for p in ref.ptr]))
    assert bool(_has_past_memory(state, t, num_frames)) == ref.has_memory


def _scan_states(diff_dtype, T):
    """advance/commit over all frames inside one jitted lax.scan; returns per-frame states
    after ``advance`` and after ``commit`` (stacked), and the StepInfo."""

    def step(state, xs):
        t, p, s, sp, g, gp, o = xs
        adv, info = mem.advance(state, t, p, diff_dtype=diff_dtype)
        com = mem.commit(adv, t, s, sp, g, gp, o, p)
        return com, (adv, com, info)

    @jax.jit
    def run(xs):
        return jax.lax.scan(step, mem.init_state(N, C, D), xs)[1]

    return run


_RUNNERS = {}


def _run_both(rng, T, skip_prob, diff_dtype):
    src, spos, tgt, tpos, ptr = _frame_data(rng, T)
    if diff_dtype == mem.AUTOCAST:  # the reference's stored memories are bf16 numbers
        src = np.asarray(jnp.asarray(src, jnp.bfloat16).astype(jnp.float32))
        tgt = np.asarray(jnp.asarray(tgt, jnp.bfloat16).astype(jnp.float32))
    processed = rng.random(T) >= skip_prob
    key = (str(diff_dtype), T)
    if key not in _RUNNERS:
        _RUNNERS[key] = _scan_states(diff_dtype, T)
    xs = (jnp.arange(T, dtype=jnp.int32), jnp.asarray(processed), src, spos, tgt, tpos, ptr)
    advs, coms, infos = jax.device_get(_RUNNERS[key](xs))
    pick = lambda tree, t: jax.tree.map(lambda x: x[t], tree)  # noqa: E731
    eager = oracle.EagerDualMemory(T, diff_dtype=diff_dtype)
    sizes, crashed = [], False
    _run_both.appended = getattr(_run_both, "appended", 0)
    prev = jax.device_get(mem.init_state(N, C, D))
    for t in range(T):
        adv, com, info = pick(advs, t), pick(coms, t), pick(infos, t)
        if not processed[t]:  # skipped frame: the state is untouched by advance and commit
            for x, y, z in zip(jax.tree.leaves(prev), jax.tree.leaves(adv), jax.tree.leaves(com)):
                np.testing.assert_array_equal(x, y)
                np.testing.assert_array_equal(x, z)
            assert not info.appended
            prev = com
            continue
        try:
            ref = eager.gather(t)
        except oracle.ReferenceCrash:
            assert info.ref_would_crash
            crashed = True
            break
        assert not info.ref_would_crash
        _check_same(adv, info, ref, t, T)
        sizes.append(len(ref.src))
        _run_both.appended += int(info.appended)
        eager.store(t, src[t], spos[t], tgt[t], tpos[t], ptr[t])
        prev = com
    return sizes, crashed, processed


@pytest.mark.parametrize("diff_dtype", [jnp.float32, mem.AUTOCAST])
def test_fixed_slots_equal_eager_reference_random_skips(diff_dtype):
    rng = np.random.default_rng(3 if diff_dtype == mem.AUTOCAST else 4)
    _run_both.appended = 0
    n_steps = n_crash = 0
    seen_sizes = set()
    for trial in range(5):
        skip = [0.0, 0.15, 0.35, 0.6, 0.3][trial]
        sizes, crashed, _ = _run_both(rng, 30, skip, diff_dtype)
        n_steps += len(sizes)
        n_crash += crashed
        seen_sizes.update(sizes)
    print(f"{diff_dtype}: {n_steps} processed frames compared, {_run_both.appended} compressions, "
          f"bank sizes seen {sorted(seen_sizes)}, reference crashes reproduced {n_crash}")
    assert n_steps >= 80 and _run_both.appended >= 30
    assert {0, 1, 5, 6} <= seen_sizes


def test_window_then_compression_sizes_hand_made():
    """Frames 0..30, frame 3 skipped. Frame 8 is the first with 7 processed frames before it
    (0,1,2,4,5,6,7), so frames <= 7 use the window: at frame 7 it is {1,2,4,5,6} (frame 3
    missing) -> 5 entries; from frame 8 on, append t-1 + compress keeps 5."""
    rng = np.random.default_rng(5)
    T = 31
    src, spos, tgt, tpos, ptr = _frame_data(rng, T)
    processed = np.ones(T, bool)
    processed[3] = False
    processed[20] = False  # frame 19 never enters the bank; frame 21 appends nothing
    eager = oracle.EagerDualMemory(T)
    state = mem.init_state(N, C, D)
    sizes, modes, appended = {}, {}, {}
    for t in range(T):
        state, info = _advance(state, t, bool(processed[t]))
        if processed[t]:
            ref = eager.gather(t)
            _check_same(state, info, ref, t, T)
            sizes[t], modes[t], appended[t] = len(ref.src), ref.compress_mode, bool(info.appended)
            eager.store(t, src[t], spos[t], tgt[t], tpos[t], ptr[t])
        state = _commit(state, t, src[t], spos[t], tgt[t], tpos[t], ptr[t], bool(processed[t]))
    assert [sizes[t] for t in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 3, 4, 5, 5]
    assert not modes[7] and modes[8]
    assert all(sizes[t] == 5 for t in range(8, T) if processed[t])
    assert appended[8] and appended[19] and not appended[21] and appended[22]
    # frame 19 never entered (the appended frame at 21 would have been 20: skipped)
    assert not np.any(np.asarray(state.tgt.frame) == 19)


def test_empty_bank_at_the_switch_is_where_the_reference_crashes():
    """Process 0..5, skip 6..11, process 12, 13, 14. Frame 12 is the 7th processed frame and
    still uses the window [6, 11] -> empty (its pointers exist but MV_MoE is skipped); frame 13
    is in compression mode and appends frame 12 to the empty bank: the reference compresses a
    1-entry stack and crashes (torch.min over an empty dim)."""
    T = 16
    processed = np.zeros(T, bool)
    processed[[0, 1, 2, 3, 4, 5, 12, 13, 14]] = True
    rng = np.random.default_rng(6)
    src, spos, tgt, tpos, ptr = _frame_data(rng, T)
    eager = oracle.EagerDualMemory(T)
    state = mem.init_state(N, C, D)
    for t in range(T):
        state, info = _advance(state, t, bool(processed[t]))
        if processed[t]:
            if t == 13:
                assert bool(info.ref_would_crash)
                with pytest.raises(oracle.ReferenceCrash):
                    eager.gather(t)
                assert int(state.src.size) == 0  # ours: the bank stays empty
                break
            ref = eager.gather(t)
            _check_same(state, info, ref, t, T)
            if t == 12:
                assert len(ref.src) == 0 and len(ref.ptr) > 0 and not ref.has_memory  # pointers alone: V only
            eager.store(t, src[t], spos[t], tgt[t], tpos[t], ptr[t])
        state = _commit(state, t, src[t], spos[t], tgt[t], tpos[t], ptr[t], bool(processed[t]))


def test_lax_scan_tracker_matches_eager_and_assemble_memory():
    """The whole per-frame loop inside one lax.scan (advance -> assemble -> commit)."""
    rng = np.random.default_rng(7)
    T = 26
    src, spos, tgt, tpos, ptr = _frame_data(rng, T)
    processed = rng.random(T) >= 0.25
    processed[0] = True
    tpos_enc = jnp.asarray(rng.standard_normal((7, 1, 1, C)), jnp.float32)
    ptr_pos_table = jnp.asarray(rng.standard_normal((16, C)), jnp.float32)  # stand-in for sine+proj, by t_diff

    def step(state, xs):
        t, p, s, sp, g, gp, o = xs
        state, info = mem.advance(state, t, p)
        tdiff, _, _ = mem.pointer_tdiff(state, t, T)
        am = mem.assemble_memory(state, t, tpos_enc, ptr_pos_table[tdiff], T)
        state = _commit(state, t, s, sp, g, gp, o, p)
        return state, (am.memory, am.memory_pos, am.valid, am.has_memory, info.compress_mode)

    xs = (jnp.arange(T, dtype=jnp.int32), jnp.asarray(processed), src, spos, tgt, tpos, ptr)
    _, (M, MP, V, H, CM) = jax.jit(lambda s, x: jax.lax.scan(step, s, x))(mem.init_state(N, C, D), xs)
    M, MP, V = np.asarray(M), np.asarray(MP), np.asarray(V)
    S, P = 6, 15
    assert M.shape == (T, 2 * S * N + 4 * P, C)

    eager = oracle.EagerDualMemory(T)
    te = np.asarray(tpos_enc).reshape(7, C)
    for t in range(T):
        if not processed[t]:
            continue
        ref = eager.gather(t)
        assert bool(H[t]) == ref.has_memory and bool(CM[t]) == ref.compress_mode
        keys, kpos = [], []
        for feats, poss in ((ref.src, ref.src_pos), (ref.tgt, ref.tgt_pos)):
            for i, (f, p) in enumerate(zip(feats, poss)):
                keys.append(np.asarray(f))
                kpos.append(np.asarray(p) + te[ref.tpos_index[i]])
        for o, td in zip(ref.ptr, ref.ptr_tdiff):
            keys.append(np.asarray(o).reshape(D // C, C))
            kpos.append(np.repeat(np.asarray(ptr_pos_table[td])[None], D // C, 0))
        got_k, got_p = M[t][V[t]], MP[t][V[t]]
        want_k = np.concatenate(keys) if keys else np.zeros((0, C))
        want_p = np.concatenate(kpos) if kpos else np.zeros((0, C))
        np.testing.assert_array_equal(got_k, want_k)
        np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-6)
        assert np.all(M[t][~V[t]] == 0)
        eager.store(t, src[t], spos[t], tgt[t], tpos[t], ptr[t])


def test_training_tpos_rule_differs_from_inference():
    # training: previous frame -> 0 ... t-6 -> 5; inference: list position i -> 5 - i
    np.testing.assert_array_equal(np.asarray(mem.training_window_tpos_index(np.array([4, 5]), 6)), [1, 0])
    np.testing.assert_array_equal(np.asarray(mem.bank_tpos_index(6))[:2], [5, 4])


def test_autocast_mode_subtracts_in_bf16_only_at_the_first_compression():
    """x = [1, 256, 1 + 2^-7] (bf16 numbers): f32 distances [255, 254.9921875] -> drop 2;
    in bf16 the second difference rounds to 255 -> tie -> first -> drop 1."""
    vals = np.array([1.0, 256.0, 1.0078125], np.float32)
    x = vals.reshape(3, 1, 1)
    assert int(oracle.compress_list(x, x, jnp.float32)[2][0]) == 2
    assert int(oracle.compress_list(x, x, jnp.bfloat16)[2][0]) == 1
    assert int(oracle.compress_list(jnp.asarray(x, jnp.bfloat16), x, None)[2][0]) == 1  # torch-like

    state = mem.init_state(1, 1, 4)
    for i, f in enumerate((5, 6)):  # a 2-entry bank (frames 5, 6)
        state = state._replace(
            src=mem.append_slot(state.src, x[i], x[i], np.full((1,), f)),
            tgt=mem.append_slot(state.tgt, x[i], x[i], np.full((1,), f)))
    pend = mem.Pending(x[2], x[2], x[2], x[2], jnp.asarray(7, jnp.int32))
    state = state._replace(pending=pend, n_processed=jnp.asarray(7, jnp.int32))
    for n_comp, mode, want in ((0, mem.AUTOCAST, 1), (1, mem.AUTOCAST, 2), (0, jnp.float32, 2)):
        s = state._replace(n_compressions=jnp.asarray(n_comp, jnp.int32))
        out, info = _advance(s, 8, True, diff_dtype=mode)
        assert bool(info.appended) and int(info.drop_src[0]) == want and int(info.drop_tgt[0]) == want
        assert int(out.src.size) == 2 and int(out.n_compressions) == n_comp + 1
