"""An eager LM-EEC tracker that follows the reference control flow literally: a Python loop
over frames, Python dicts of processed frames and growing/compressed Python lists
(``tests.memory_oracle.EagerDualMemory``), concatenating only the memories that exist. It is the oracle
for the jitted fixed-slot ``lax.scan`` in ``lmeec_jax.tracking.frame_step``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.memory_oracle import EagerDualMemory
from lmeec_jax.models.sam2 import get_1d_sine_pe


def eager_track(model, src_images, tgt_images, src_masks):
    """src/tgt images [T, S, S, 3]; src_masks [T, S, S] binary. Returns a list with, per frame,
    None (skipped: empty source mask) or (low_res_logits [4h, 4w], object_score_logit)."""
    cfg = model.cfg
    T = len(src_images)
    em = EagerDualMemory(T, num_maskmem=cfg.num_maskmem, max_obj_ptrs=cfg.max_obj_ptrs_in_encoder)
    tpos = np.asarray(model.maskmem_tpos_enc[...]).reshape(cfg.num_maskmem, -1)
    graphdef, params = nnx.split(model)
    # image features are not what this oracle checks: compute them jitted
    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).forward_image(x))
    outs = []
    for t in range(T):
        if not np.any(src_masks[t]):  # SPEC 9: skipped, nothing stored, index advances
            outs.append(None)
            continue
        g = em.gather(t)
        fpn_t, pos_t = encode(params, jnp.asarray(tgt_images[t])[None])
        fpn_s, _ = encode(params, jnp.asarray(src_images[t])[None])
        feat, pos = fpn_t[2], pos_t[2]
        _, h, w, C = feat.shape
        N = h * w
        curr, curr_pos = feat.reshape(1, N, C), pos.reshape(1, N, C)
        src_mem, src_pos = model.encode_new_memory(fpn_s[2], jnp.asarray(src_masks[t], jnp.float32)[None, ..., None], None)
        src_mem, src_pos = src_mem.reshape(N, -1), src_pos.reshape(N, -1)
        V = model.memory_attention(curr=curr, curr_pos=curr_pos, memory=src_mem[None], memory_pos=src_pos[None],
                                   num_obj_ptr_tokens=0).reshape(1, h, w, C)
        if g.has_memory:
            mems = list(g.src) + list(g.tgt)
            poss = [p + tpos[i] for p, i in zip(g.src_pos, g.tpos_index)]
            poss += [p + tpos[i] for p, i in zip(g.tgt_pos, g.tpos_index)]
            n_ptr = 0
            if g.ptr:
                ptrs = jnp.stack(g.ptr)  # [P, C]
                k = C // cfg.mem_dim
                tokens = ptrs.reshape(len(g.ptr) * k, cfg.mem_dim)
                pe = get_1d_sine_pe(jnp.asarray(g.ptr_tdiff, jnp.float32) / g.t_diff_max, dim=C)
                ppos = jnp.repeat(model.obj_ptr_tpos_proj(pe), k, axis=0)
                mems.append(tokens)
                poss.append(ppos)
                n_ptr = tokens.shape[0]
            memory = jnp.concatenate([jnp.asarray(m, jnp.float32) for m in mems], axis=0)[None]
            memory_pos = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in poss], axis=0)[None]
            M = model.memory_attention(curr=curr, curr_pos=curr_pos, memory=memory, memory_pos=memory_pos,
                                       num_obj_ptr_tokens=n_ptr).reshape(1, h, w, C)
            fused = model.MV_MoE(M, V)
        else:
            fused = V
        out = model.forward_sam_heads(fused, high_res_features=[fpn_t[0], fpn_t[1]], multimask_output=False,
                                      add_dense_prompt=False)
        tgt_mem, tgt_pos = model.encode_new_memory(feat, out["high_res_masks"], out["object_score_logits"])
        em.store(t, src_mem, src_pos, tgt_mem.reshape(N, -1), tgt_pos.reshape(N, -1), out["obj_ptr"][0])
        outs.append((np.asarray(out["low_res_masks"][0, ..., 0]), float(out["object_score_logits"][0, 0])))
    return outs
