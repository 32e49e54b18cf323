"""The training forward pass with the reference's structure: a Python loop over frames and
compact memory lists (only the frames that exist, no masking, static ``t``). The oracle of
the fixed-slot scan in :func:`lmeec_jax.training.forward.clip_forward`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lmeec_jax.tracking.frame_step import heads_and_target_memory, memory_expert, source_memory_and_view
from lmeec_jax.tracking.memory import training_window_tpos_index
from lmeec_jax.tracking.policies import MemoryRead
from lmeec_jax.training.forward import (ClipOutputs, _encode_all, cast_floating, frame_inputs)


def clip_unrolled(graphdef, params, rngs, rest, batch, fcfg):
    dtype, det = fcfg.compute_dtype, fcfg.deterministic
    model = nnx.merge(graphdef, cast_floating(params, dtype), rngs, cast_floating(rest, dtype))
    cfg = model.cfg
    B, T = batch.src_images.shape[:2]
    W = cfg.num_maskmem - 1
    t_diff_max = min(T, cfg.max_obj_ptrs_in_encoder) - 1
    inp = frame_inputs(_encode_all(model, batch, fcfg), batch)
    stored = {}  # frame -> (src_mem, src_pos, tgt_mem, tgt_pos, obj_ptr)
    results = []
    for t in range(T):
        fpn0, fpn1, tgt_feat = (x[t] for x in inp.tgt_fpn)
        tgt_pos, src_feat = inp.tgt_pos[t], inp.src_feat[t]
        src_mem, src_pos, V = source_memory_and_view(model, src_feat, inp.src_mask[t], tgt_feat, tgt_pos,
                                                     deterministic=det)
        window = [f for f in range(t - W, t) if f in stored]  # oldest first
        ptr_frames = [t - d for d in range(1, t_diff_max + 1) if t - d in stored]  # newest first
        if window:
            tp = model.tpos_enc(training_window_tpos_index(jnp.asarray(window), t)).astype(dtype)  # [L, mem]
            st = lambda i: jnp.stack([stored[f][i] for f in window], 1)
            L, P = len(window), len(ptr_frames)
            tdiff = jnp.broadcast_to(jnp.asarray([t - f for f in ptr_frames], jnp.int32)[None], (B, P))
            read = MemoryRead(
                feats=jnp.concatenate([st(0), st(2)], 1),
                pos=jnp.concatenate([st(1) + tp[None, :, None], st(3) + tp[None, :, None]], 1),
                valid=jnp.ones((B, 2 * L), bool), ptrs=jnp.stack([stored[f][4] for f in ptr_frames], 1),
                ptr_tdiff=tdiff, ptr_valid=jnp.ones((B, P), bool), t_diff_max=jnp.asarray(t_diff_max),
                has_memory=jnp.ones((B,), bool))
            M = memory_expert(model, tgt_feat, tgt_pos, read, deterministic=det)
            fused = model.MV_MoE(M, V) if cfg.mv_moe else M
        else:
            fused = V
        out, tgt_mem, tgt_mpos = heads_and_target_memory(model, fused, fpn0, fpn1, tgt_feat, deterministic=det)
        stored[t] = (src_mem, src_pos, tgt_mem, tgt_mpos, out["obj_ptr"].astype(dtype))
        f32 = lambda x: x.astype(jnp.float32)
        results.append((f32(out["high_res_masks"][..., 0])[:, None], f32(out["low_res_masks"][..., 0])[:, None],
                        f32(out["ious"]), f32(out["object_score_logits"])))
    return ClipOutputs(*(jnp.stack(x, 0) for x in zip(*results))), nnx.state(model, nnx.RngState)
