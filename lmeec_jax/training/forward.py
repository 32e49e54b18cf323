"""The LM-EEC *training* forward pass over a batch of two-view clips.

This is ``SAM2Train.forward`` with ``SAM2Base._prepare_memory_conditioned_features_wo_prompt``
(``training/model/sam2.py``, ``sam2/modeling/sam2_base.py`` l.554-772 of the reference),
which differs from the inference step of :mod:`lmeec_jax.tracking.frame_step`
(see ``docs/lmeec_semantics.md`` §6):

* clips of ``T`` (8) frames, every frame processed (an empty source mask is just encoded);
* the image encoder runs on every frame of both views first;
* frame ``t``: the memory is the plain window of frames ``t-6 … t-1`` (no compression,
  nothing carried), each entry with ``maskmem_tpos_enc[t - f - 1]`` (frame distance, not
  list position), as [source window | target window | object pointers];
* object pointers of the target view for ``t_diff = 1 … min(T, 16) - 1`` with the sine
  temporal encoding normalised by ``t_diff_max = min(T, 16) - 1`` (7 for 8 frames);
* source memory of frame ``t`` from the source GT mask (``sigmoid(m)*20-10``, object
  forced present); view expert V over it; memory expert M over the window; ``MV_MoE(M, V)``
  from frame 1 on (the source window is non-empty exactly when ``t >= 1``), V on frame 0;
* SAM heads with no dense prompt, ``multimask_output=False``, training mode (no dynamic
  multimask); target memory from the predicted high-res logits (gradients flow through
  the memories into later frames, as in torch).

Static shapes: the frames run in one ``lax.scan`` whose carry holds 6 window slots (oldest first, slot ``j`` = frame
``t - 6 + j``, so slot ``j`` always gets ``maskmem_tpos_enc[5 - j]``) and 7 pointer slots
(newest first, slot ``k`` = frame ``t - 1 - k``) with validity masks; a masked slot gets no
attention weight and shifts no RoPE or temporal encoding (on frame 0 every slot is
masked and the memory expert's output is discarded). ``unroll=True`` instead runs a
Python loop over compact lists exactly as the reference builds them (the test oracle).

Everything is a pure function of ``(graphdef, params, rngs, rest, batch)``: the module is
merged inside (also inside the scan body, so dropout streams are carried through the scan
and ``jax.checkpoint`` can wrap a frame). Mixed precision: parameters stay float32; with
``dtype=bfloat16`` a bf16 copy is used for compute (image encoder, memory encoder, memory
attention and SAM heads run in bf16; softmax, LayerNorm statistics, mask logits and the
loss stay float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.tracking.memory import training_window_tpos_index
from lmeec_jax.models.sam2 import SAM2Model

__all__ = [
    "TrainForwardConfig",
    "ClipBatch",
    "ClipOutputs",
    "split_model",
    "cast_floating",
    "reseed_rngs",
    "encode_images",
    "clip_forward",
    "window_slots",
    "pointer_slots",
]


@dataclass(frozen=True)
class TrainForwardConfig:
    """Static options of the training forward pass."""

    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    remat_blocks: bool = False  # jax.checkpoint each Hiera block
    remat_frames: bool = False  # jax.checkpoint each frame: its image encoding (one frame at a time) and tracking step
    unroll: bool = False  # Python loop with compact lists (reference structure) instead of lax.scan
    deterministic: bool = False  # True: dropout / drop-path off (for tests)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


class ClipBatch(NamedTuple):
    """B two-view clips of T frames (ego→exo: source = ego)."""

    src_images: jax.Array  # [B, T, S, S, 3] ImageNet-normalised
    tgt_images: jax.Array  # [B, T, S, S, 3]
    src_masks: jax.Array  # [B, T, S, S] 0/1 (any dtype)
    tgt_masks: jax.Array  # [B, T, S, S] 0/1 (the loss target)


class ClipOutputs(NamedTuple):
    """Per-frame SAM-head outputs on the target view, frame-major."""

    high_res_logits: jax.Array  # [T, B, 1, S, S] float32 (after the -1024 no-object fill)
    low_res_logits: jax.Array  # [T, B, 1, 4h, 4w] float32
    ious: jax.Array  # [T, B, 1]
    object_score_logits: jax.Array  # [T, B, 1]


# ----------------------------------------------------------------------------- state plumbing


def split_model(model: nnx.Module):
    """``(graphdef, params, rngs, rest)``: trainable params, dropout/drop-path RNG streams,
    and everything else (buffers such as the prompt encoder's Gaussian matrix)."""
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def reseed_rngs(rngs, key):
    """A copy of the RNG-stream state with stream ``i`` keyed ``fold_in(key, i)`` and every
    count reset: dropout masks become a pure function of ``key`` (e.g. (seed, step))."""
    leaves, treedef = jax.tree.flatten(rngs)
    out = []
    for i, x in enumerate(leaves):
        out.append(jax.random.fold_in(key, i) if _is_key(x) else jnp.zeros_like(x))
    return jax.tree.unflatten(treedef, out)


def cast_floating(tree, dtype):
    """Floating leaves of ``tree`` cast to ``dtype`` (keys and integers untouched)."""
    dtype = jnp.dtype(dtype)

    def one(x):
        if _is_key(x) or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) or x.dtype == dtype:
            return x
        return x.astype(dtype)

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- image encoder


def _block(blk, x):
    return blk(x)


def _remat_block(blk, x):
    """``blk(x)`` under ``jax.checkpoint``; the block's RNG streams (drop path) are carried
    out functionally and written back."""
    g, st = nnx.split(blk)

    def f(st, x):
        b = nnx.merge(g, st)
        return b(x), nnx.state(b, nnx.RngState)

    y, rs = jax.checkpoint(f)(st, x)
    nnx.update(blk, rs)
    return y


def encode_images(model: SAM2Model, images, *, remat_blocks: bool = False, dtype=jnp.float32):
    """``SAM2Model.forward_image`` with optional per-block rematerialisation.

    images [n, S, S, 3] -> (fpn levels high-res first [n, 4h, 4w, C/8], [n, 2h, 2w, C/4],
    [n, h, w, C]; pos of the lowest level [n, h, w, C]), all in ``dtype``.
    """
    trunk = model.image_encoder.trunk
    x = trunk.patch_embed(images.astype(dtype))
    x = x + trunk._get_pos_embed(x.shape[1:3]).astype(x.dtype)
    block = _remat_block if remat_blocks else _block
    outs = []
    for i, blk in enumerate(trunk.blocks):
        x = block(blk, x)
        if i == trunk.stage_ends[-1] or (i in trunk.stage_ends and trunk.return_interm_layers):
            outs.append(x)
    feats, pos = model.image_encoder.neck(outs)
    scalp = model.image_encoder.scalp
    if scalp > 0:
        feats, pos = feats[:-scalp], pos[:-scalp]
    feats = list(feats)
    feats[0] = model.sam_mask_decoder.conv_s0(feats[0])
    feats[1] = model.sam_mask_decoder.conv_s1(feats[1])
    return tuple(f.astype(dtype) for f in feats), pos[-1].astype(dtype)


# ----------------------------------------------------------------------------- per-frame maths


def _encode_memory(model: SAM2Model, pix_feat, mask_logits, object_score_logits, dtype):
    """``SAM2Base._encode_new_memory`` (as ``SAM2Model.encode_new_memory``) with the scaled
    mask computed in float32 and handed to the memory encoder in the compute dtype.
    mask_logits [B, S, S, 1]; object_score_logits [B, 1] or None (object present).
    Returns (features [B, N, mem], pos [B, N, mem])."""
    cfg = model.cfg
    m = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    m = (m * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc).astype(dtype)
    out = model.memory_encoder(pix_feat, m, skip_mask_sigmoid=True)
    feats, pos = out["vision_features"], out["vision_pos_enc"][-1]
    if object_score_logits is not None:
        absent = 1.0 - (object_score_logits > 0).astype(feats.dtype)  # [B, 1]
        feats = feats + absent[:, None, None, :] * model.no_obj_embed_spatial[...][:, None, None, :].astype(feats.dtype)
    B = feats.shape[0]
    return feats.reshape(B, -1, feats.shape[-1]).astype(dtype), pos.reshape(B, -1, pos.shape[-1]).astype(dtype)


def window_slots(cfg) -> int:
    """Memory window slots: ``num_maskmem - 1`` (6) previous frames."""
    return cfg.num_maskmem - 1


def pointer_slots(cfg, num_frames: int) -> int:
    """Object-pointer slots: ``min(num_frames, max_obj_ptrs_in_encoder) - 1`` (7 for 8 frames)."""
    return min(num_frames, cfg.max_obj_ptrs_in_encoder) - 1


class _FrameFeats(NamedTuple):
    fpn0: jax.Array  # [B, 4h, 4w, C/8]
    fpn1: jax.Array  # [B, 2h, 2w, C/4]
    tgt_feat: jax.Array  # [B, h, w, C]
    tgt_pos: jax.Array  # [B, h, w, C]
    src_feat: jax.Array  # [B, h, w, C]
    src_mask: jax.Array  # [B, S, S]


def _source_memory_and_view(model, ff: _FrameFeats, dtype, deterministic):
    B, h, w, C = ff.tgt_feat.shape
    src_mem, src_pos = _encode_memory(model, ff.src_feat, ff.src_mask.astype(jnp.float32)[..., None], None, dtype)
    V = model.attend_memory(ff.tgt_feat, ff.tgt_pos, src_mem[:, None], src_pos[:, None], jnp.ones((B, 1), bool),
                            deterministic=deterministic)
    return src_mem, src_pos, V.astype(dtype)


def _heads_and_target_memory(model, ff: _FrameFeats, fused, dtype, deterministic):
    out = model.forward_sam_heads(fused.astype(dtype), high_res_features=[ff.fpn0, ff.fpn1], multimask_output=False,
                                  add_dense_prompt=False, training=not deterministic)
    tgt_mem, tgt_pos = _encode_memory(model, ff.tgt_feat, out["high_res_masks"], out["object_score_logits"], dtype)
    res = (out["high_res_masks"][..., 0][:, None].astype(jnp.float32),
           out["low_res_masks"][..., 0][:, None].astype(jnp.float32),
           out["ious"].astype(jnp.float32), out["object_score_logits"].astype(jnp.float32))
    return res, tgt_mem, tgt_pos, out["obj_ptr"].astype(dtype)


def _memory_expert(model, ff: _FrameFeats, mem_feats, mem_pos, mem_valid, ptrs, ptr_tdiff, ptr_valid, t_diff_max,
                   dtype, deterministic):
    """M = memory attention over [src window | tgt window | pointer tokens].

    mem_feats/mem_pos [B, 2W, N, mem] (source slots then target slots, pos already with the
    temporal encoding), mem_valid [B, 2W]; ptrs [B, P, C], ptr_tdiff [B, P], ptr_valid [B, P]."""
    B, h, w, C = ff.tgt_feat.shape
    tokens, tok_pos = model.obj_ptr_tokens(ptrs, ptr_tdiff, t_diff_max)
    k = tokens.shape[1] // max(ptrs.shape[1], 1)
    M = model.attend_memory(ff.tgt_feat, ff.tgt_pos, mem_feats.astype(dtype), mem_pos.astype(dtype), mem_valid,
                            ptr_tokens=tokens.astype(dtype), ptr_pos=tok_pos.astype(dtype),
                            ptr_valid=jnp.repeat(ptr_valid, k, axis=1), deterministic=deterministic)
    return M.astype(dtype)


def _frame_feats(feats, t):
    return _FrameFeats(*(x[t] for x in feats))


# ----------------------------------------------------------------------------- the clip


def _frame_major_images(batch: ClipBatch):
    """[T, 2B, S, S, 3]: for each frame the B source images then the B target images."""
    imgs = jnp.concatenate([batch.src_images, batch.tgt_images], axis=0)  # [2B, T, S, S, 3]
    return jnp.swapaxes(imgs, 0, 1)


def _all_features(model, batch: ClipBatch, fcfg: TrainForwardConfig, encoded=None):
    """Image features of every frame of both views, frame-major: each field [T, B, ...].

    ``encoded``: ``(fpn levels, pos)`` already computed, each [T, 2B, ...] (the per-frame
    path of :func:`clip_forward`); otherwise all T*2B images are encoded in one batch."""
    B, T = batch.src_images.shape[:2]
    if encoded is None:
        imgs = _frame_major_images(batch)
        encoded = jax.tree.map(lambda x: x.reshape((T, 2 * B) + x.shape[1:]),
                               encode_images(model, imgs.reshape((T * 2 * B,) + imgs.shape[2:]),
                                             remat_blocks=fcfg.remat_blocks, dtype=fcfg.compute_dtype))
    fpn, pos = encoded

    def per_frame(x):  # [T, 2B, ...] -> (src [T, B, ...], tgt [T, B, ...])
        x = x.reshape((T, 2, B) + x.shape[2:])
        return x[:, 0], x[:, 1]

    _, fpn0 = per_frame(fpn[0])
    _, fpn1 = per_frame(fpn[1])
    src_feat, tgt_feat = per_frame(fpn[2])
    _, tgt_pos = per_frame(pos)
    src_mask = jnp.swapaxes(batch.src_masks, 0, 1)
    return _FrameFeats(fpn0, fpn1, tgt_feat, tgt_pos, src_feat, src_mask)


def clip_forward(graphdef, params, rngs, rest, batch: ClipBatch, fcfg: TrainForwardConfig = TrainForwardConfig()):
    """The training forward pass. Returns ``(ClipOutputs, rngs_after)``.

    ``graphdef, params, rngs, rest`` come from :func:`split_model` of a model in training
    mode (``model.train()``: dropout and drop-path on) or eval mode. Parameters are cast to
    the compute dtype here; gradients w.r.t. ``params`` are float32.
    """
    dtype = fcfg.compute_dtype
    det = fcfg.deterministic
    cparams = cast_floating(params, dtype)
    crest = cast_floating(rest, dtype)
    model = nnx.merge(graphdef, cparams, rngs, crest)
    cfg = model.cfg
    T = batch.src_images.shape[1]
    W = window_slots(cfg)
    P = pointer_slots(cfg, T)
    t_diff_max = P  # min(num_frames, max_obj_ptrs_in_encoder) - 1

    if fcfg.unroll:
        return _clip_unrolled(model, _all_features(model, batch, fcfg), T, t_diff_max, dtype, det)

    # NNX variables merged at this level cannot be mutated under jax.grad, so every module
    # call that draws dropout bits runs on a module merged inside a transform (here a
    # checkpoint that saves everything, i.e. no recomputation; below the scan body) and
    # the RNG-stream state is threaded through explicitly.
    def encode(rngs_, b):
        m = nnx.merge(graphdef, cparams, rngs_, crest)
        return _all_features(m, b, fcfg), nnx.state(m, nnx.RngState)

    def encode_frame(rngs_, imgs):  # the 2B images of one frame
        m = nnx.merge(graphdef, cparams, rngs_, crest)
        return nnx.state(m, nnx.RngState), encode_images(m, imgs, remat_blocks=fcfg.remat_blocks, dtype=dtype)

    if fcfg.remat_frames:
        # one frame at a time, recomputed in the backward pass: the encoder's activations
        # live for 2B images instead of T*2B (b+ at 480, 8 frames: ~8x less peak memory)
        rngs, encoded = jax.lax.scan(jax.checkpoint(encode_frame, prevent_cse=False), rngs,
                                     _frame_major_images(batch))
        feats = _all_features(None, batch, fcfg, encoded=encoded)
    else:
        feats, rngs = jax.checkpoint(encode, policy=jax.checkpoint_policies.everything_saveable)(rngs, batch)

    B = batch.src_images.shape[0]
    h, w, C = feats.tgt_feat.shape[2:]
    N, Cm = h * w, cfg.mem_dim
    zeros_win = jnp.zeros((W, B, N, Cm), dtype)
    carry = dict(src=zeros_win, src_pos=zeros_win, tgt=zeros_win, tgt_pos=zeros_win,
                 ptr=jnp.zeros((P, B, C), dtype))
    slot = jnp.arange(W, dtype=jnp.int32)
    pslot = jnp.arange(P, dtype=jnp.int32)
    tpos_idx = training_window_tpos_index(slot - W, 0)  # frame t-W+j at frame t -> W-1-j
    tpos = model.tpos_enc(tpos_idx).astype(dtype)  # [W, mem]

    def body(c, xs):
        rngs_, mem = c
        ff, t = xs
        m = nnx.merge(graphdef, cparams, rngs_, crest)
        src_mem, src_pos, V = _source_memory_and_view(m, ff, dtype, det)
        win_valid = (t - W + slot) >= 0  # [W]
        ptr_valid = (t - 1 - pslot) >= 0  # [P]
        sw = jnp.swapaxes(mem["src"], 0, 1)  # [B, W, N, mem]
        tw = jnp.swapaxes(mem["tgt"], 0, 1)
        swp = jnp.swapaxes(mem["src_pos"], 0, 1) + tpos[None, :, None, :]
        twp = jnp.swapaxes(mem["tgt_pos"], 0, 1) + tpos[None, :, None, :]
        mem_valid = jnp.broadcast_to(jnp.concatenate([win_valid, win_valid])[None], (B, 2 * W))
        ptrs = jnp.swapaxes(mem["ptr"], 0, 1)  # [B, P, C] newest first
        tdiff = jnp.broadcast_to(jnp.where(ptr_valid, pslot + 1, 0)[None], (B, P))
        # on frame 0 every key is masked: M is finite (zero attention) and unused
        M = _memory_expert(m, ff, jnp.concatenate([sw, tw], 1), jnp.concatenate([swp, twp], 1), mem_valid, ptrs,
                           tdiff, jnp.broadcast_to(ptr_valid[None], (B, P)), t_diff_max, dtype, det)
        fused = m.MV_MoE(M, V) if cfg.mv_moe else M
        fused = jnp.where(t >= 1, fused, V)  # the source window is non-empty from frame 1 on
        res, tgt_mem, tgt_pos, obj_ptr = _heads_and_target_memory(m, ff, fused, dtype, det)
        shift = lambda buf, new: jnp.concatenate([buf[1:], new[None].astype(buf.dtype)], 0)  # oldest first
        new = dict(src=shift(mem["src"], src_mem), src_pos=shift(mem["src_pos"], src_pos),
                   tgt=shift(mem["tgt"], tgt_mem), tgt_pos=shift(mem["tgt_pos"], tgt_pos),
                   ptr=jnp.concatenate([obj_ptr[None].astype(mem["ptr"].dtype), mem["ptr"][:-1]], 0))  # newest first
        return (nnx.state(m, nnx.RngState), new), res

    if fcfg.remat_frames:
        body = jax.checkpoint(body, prevent_cse=False)
    ts = jnp.arange(T, dtype=jnp.int32)
    (rngs, _), res = jax.lax.scan(body, (rngs, carry), (feats, ts))
    return ClipOutputs(*res), rngs


def _clip_unrolled(model, feats, T, t_diff_max, dtype, det):
    """Reference structure: Python loop, compact memory lists (no masking), static t."""
    cfg = model.cfg
    W = window_slots(cfg)
    stored = {}  # frame -> (src_mem, src_pos, tgt_mem, tgt_pos, obj_ptr)
    results = []
    for t in range(T):
        ff = _frame_feats(feats, t)
        B = ff.tgt_feat.shape[0]
        src_mem, src_pos, V = _source_memory_and_view(model, ff, dtype, det)
        window = [f for f in range(t - W, t) if f in stored]  # oldest first (t_pos 1..6)
        ptr_frames = [t - d for d in range(1, t_diff_max + 1) if t - d in stored]  # newest first
        if window:
            idx = training_window_tpos_index(jnp.asarray(window), t)
            tp = model.tpos_enc(idx).astype(dtype)  # [L, mem]
            sw = jnp.stack([stored[f][0] for f in window], 1)
            tw = jnp.stack([stored[f][2] for f in window], 1)
            swp = jnp.stack([stored[f][1] for f in window], 1) + tp[None, :, None]
            twp = jnp.stack([stored[f][3] for f in window], 1) + tp[None, :, None]
            ptrs = jnp.stack([stored[f][4] for f in ptr_frames], 1)
            tdiff = jnp.broadcast_to(jnp.asarray([t - f for f in ptr_frames], jnp.int32)[None], (B, len(ptr_frames)))
            L = len(window)
            M = _memory_expert(model, ff, jnp.concatenate([sw, tw], 1), jnp.concatenate([swp, twp], 1),
                               jnp.ones((B, 2 * L), bool), ptrs, tdiff, jnp.ones(tdiff.shape, bool), t_diff_max,
                               dtype, det)
            fused = model.MV_MoE(M, V) if cfg.mv_moe else M
        else:
            fused = V
        res, tgt_mem, tgt_pos, obj_ptr = _heads_and_target_memory(model, ff, fused, dtype, det)
        stored[t] = (src_mem, src_pos, tgt_mem, tgt_pos, obj_ptr)
        results.append(res)
    outs = [jnp.stack(x, 0) for x in zip(*results)]
    return ClipOutputs(*outs), nnx.state(model, nnx.RngState)
