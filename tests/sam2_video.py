"""SAM 2.1 video tracking (``SAM2Base.track_step``) for one object, over fixed memory slots.

The torch reference keeps a dict of every past frame's outputs and gathers, for frame t,
the conditioning frames plus the non-conditioning frames t-1 .. t-6 (temporal encoding
``maskmem_tpos_enc[t_rel - 1]``, conditioning frames ``maskmem_tpos_enc[6]``) and the
object pointers of the conditioning frames and of frames t-1 .. t-15. Here that dict
becomes a pytree of fixed-size slots:

* conditioning slots (capacity ``max_cond``), filled in order;
* a ring of the last ``num_maskmem - 1`` non-conditioning memories (slot = t mod 6);
* a ring of the last ``max_obj_ptrs_in_encoder - 1`` non-conditioning object pointers.

Every slot stores the frame index it holds (-1 = empty); which slots a frame attends to,
and with which temporal encoding, is computed from those indices, so the step is a pure
jittable function of (params, state, frame) and a video is a ``lax.scan`` over it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmeec_jax.models.sam2 import SAM2Model


class TrackState(NamedTuple):
    cond_feats: jax.Array  # [B, Kc, N, mem]
    cond_pos: jax.Array  # [B, Kc, N, mem]
    cond_ptr: jax.Array  # [B, Kc, C]
    cond_frame: jax.Array  # [Kc] int32, -1 = empty
    mem_feats: jax.Array  # [B, R, N, mem]
    mem_pos: jax.Array  # [B, R, N, mem]
    mem_frame: jax.Array  # [R]
    ptr: jax.Array  # [B, P, C]
    ptr_frame: jax.Array  # [P]


def init_state(model: SAM2Model, batch: int, max_cond: int = 1, dtype=jnp.float32) -> TrackState:
    cfg = model.cfg
    n = cfg.feat_size * cfg.feat_size
    r = cfg.num_maskmem - 1
    p = cfg.max_obj_ptrs_in_encoder - 1
    z = lambda *s: jnp.zeros(s, dtype)
    neg = lambda k: jnp.full((k,), -1, jnp.int32)
    return TrackState(
        z(batch, max_cond, n, cfg.mem_dim), z(batch, max_cond, n, cfg.mem_dim), z(batch, max_cond, cfg.d_model),
        neg(max_cond), z(batch, r, n, cfg.mem_dim), z(batch, r, n, cfg.mem_dim), neg(r),
        z(batch, p, cfg.d_model), neg(p),
    )


def gather_memory(model: SAM2Model, state: TrackState, frame_idx, num_frames):
    """The memory a non-initial frame attends to: (feats, pos incl. temporal enc, valid,
    ptr tokens, ptr pos, ptr valid), all padded to fixed size."""
    cfg = model.cfg
    B = state.mem_feats.shape[0]
    nm = cfg.num_maskmem
    # conditioning frames: t_pos 0 -> maskmem_tpos_enc[nm - 1]
    cond_valid = state.cond_frame >= 0
    cond_pos = state.cond_pos + model.tpos_enc(jnp.full((state.cond_frame.shape[0],), nm - 1))[None, :, None, :]
    # non-conditioning ring: frames t-1 .. t-(nm-1), t_rel -> maskmem_tpos_enc[t_rel - 1]
    t_rel = frame_idx - state.mem_frame
    mem_valid = (state.mem_frame >= 0) & (t_rel >= 1) & (t_rel <= nm - 1)
    idx = jnp.clip(t_rel - 1, 0, nm - 1)
    mem_pos = state.mem_pos + model.tpos_enc(idx)[None, :, None, :]
    feats = jnp.concatenate([state.cond_feats, state.mem_feats], axis=1)
    pos = jnp.concatenate([cond_pos, mem_pos], axis=1)
    valid = jnp.broadcast_to(jnp.concatenate([cond_valid, mem_valid])[None], (B, feats.shape[1]))

    # object pointers: conditioning frames in the past (signed distance), then t-1 .. t-(max-1)
    max_ptrs = jnp.minimum(num_frames, cfg.max_obj_ptrs_in_encoder)
    cond_ptr_valid = cond_valid & (state.cond_frame <= frame_idx)
    tdiff_c = frame_idx - state.cond_frame
    tdiff_n = frame_idx - state.ptr_frame
    ptr_valid_n = (state.ptr_frame >= 0) & (tdiff_n >= 1) & (tdiff_n < max_ptrs) & (state.ptr_frame < num_frames)
    ptrs = jnp.concatenate([state.cond_ptr, state.ptr], axis=1)
    tdiff = jnp.concatenate([tdiff_c, tdiff_n])
    ptr_valid = jnp.concatenate([cond_ptr_valid, ptr_valid_n])
    tokens, tok_pos = model.obj_ptr_tokens(ptrs, jnp.broadcast_to(tdiff[None], (B, tdiff.shape[0])), max_ptrs - 1)
    k = tokens.shape[1] // ptrs.shape[1]
    tok_valid = jnp.broadcast_to(jnp.repeat(ptr_valid, k)[None], (B, tokens.shape[1]))
    return feats, pos, valid, tokens, tok_pos, tok_valid


def track_step(
    model: SAM2Model,
    state: TrackState,
    frame_idx,
    fpn,
    fpn_pos,
    *,
    mode: str,
    num_frames,
    point_coords=None,
    point_labels=None,
    mask_inputs=None,
    is_init_cond_frame: bool = False,
    cond_slot: int = 0,
    binarize_points_for_mem: bool = False,
):
    """One SAM 2.1 ``track_step`` for a batch of objects on one frame.

    fpn / fpn_pos: the three feature levels of this frame from ``model.forward_image``
    ([B, h*4, w*4, C/8], [B, 2h, 2w, C/4], [B, h, w, C]).
    mode (static): ``"mask"`` (conditioning frame with a mask input, used as the output),
    ``"points"`` (conditioning frame with clicks), ``"track"`` (propagation from memory).
    Conditioning outputs go to conditioning slot ``cond_slot``; others to the rings.
    Returns (new_state, outputs dict).
    """
    cfg = model.cfg
    high_res = [fpn[0], fpn[1]]
    feat, pos = fpn[2], fpn_pos[2]
    is_cond = mode in ("mask", "points")
    if mode == "mask":
        out = model.use_mask_as_output(feat, high_res, mask_inputs)
    else:
        if is_init_cond_frame:
            pix = model.no_memory_features(feat)
        else:
            mf, mp, mv, pt, pp, pv = gather_memory(model, state, frame_idx, num_frames)
            pix = model.attend_memory(feat, pos, mf, mp, mv, pt, pp, pv)
        num_pts = 0 if point_labels is None else point_labels.shape[1]
        # SAM 2.1: multimask_output_in_sam and multimask_output_for_tracking are on,
        # multimask_min_pt_num 0 / max 1: one mask or three by the number of clicks.
        multimask = 0 <= num_pts <= 1
        out = model.forward_sam_heads(
            pix, point_coords, point_labels, mask_inputs=None, high_res_features=high_res, multimask_output=multimask
        )
    binarize = binarize_points_for_mem and mode == "points"
    maskmem, maskmem_pos = model.encode_new_memory(feat, out["high_res_masks"], out["object_score_logits"], binarize)
    B = feat.shape[0]
    maskmem = maskmem.reshape(B, -1, maskmem.shape[-1])
    maskmem_pos = maskmem_pos.reshape(B, -1, maskmem_pos.shape[-1])
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    if is_cond:
        state = state._replace(
            cond_feats=state.cond_feats.at[:, cond_slot].set(maskmem),
            cond_pos=state.cond_pos.at[:, cond_slot].set(maskmem_pos),
            cond_ptr=state.cond_ptr.at[:, cond_slot].set(out["obj_ptr"]),
            cond_frame=state.cond_frame.at[cond_slot].set(frame_idx),
        )
    else:
        r = frame_idx % state.mem_frame.shape[0]
        p = frame_idx % state.ptr_frame.shape[0]
        state = state._replace(
            mem_feats=state.mem_feats.at[:, r].set(maskmem),
            mem_pos=state.mem_pos.at[:, r].set(maskmem_pos),
            mem_frame=state.mem_frame.at[r].set(frame_idx),
            ptr=state.ptr.at[:, p].set(out["obj_ptr"]),
            ptr_frame=state.ptr_frame.at[p].set(frame_idx),
        )
    out = dict(out, maskmem_features=maskmem, maskmem_pos_enc=maskmem_pos)
    return state, out
