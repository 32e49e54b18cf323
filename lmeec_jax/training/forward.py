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
masked and the memory expert's output is discarded). The frame itself is the one
:func:`lmeec_jax.tracking.frame_step.frame_step` that inference runs, over the
:class:`~lmeec_jax.tracking.policies.TrainingWindow` memory; ``tests/train_oracle.py``
builds the compact lists exactly as the reference does (the test oracle).

Everything is a pure function of ``(graphdef, params, rngs, rest, batch)``: the module is
merged inside (also inside the scan body, so dropout streams are carried through the scan
and ``jax.checkpoint`` can wrap a frame). Mixed precision (``dtype=bfloat16``): the CUDA
autocast-like policy of :mod:`lmeec_jax.models.precision` - float32 master parameters used
as they are, bf16 inputs to every matmul / conv, float32 LayerNorms, softmax, positional
tables, mask logits and loss; image features and the memory window are kept in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.precision import autocast_graphdef
from lmeec_jax.models.sam2 import SAM2Model
from lmeec_jax.tracking.frame_step import FrameInput, frame_step
from lmeec_jax.tracking.policies import TrainingWindow

__all__ = [
    "TrainForwardConfig",
    "ClipBatch",
    "ClipOutputs",
    "split_model",
    "cast_floating",
    "reseed_rngs",
    "encode_images",
    "clip_forward",
]


@dataclass(frozen=True)
class TrainForwardConfig:
    """Static options of the training forward pass."""

    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    remat_blocks: bool = False  # jax.checkpoint each Hiera block
    remat_frames: bool = False  # jax.checkpoint each frame: its image encoding (one frame at a time) and tracking step
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


def encode_images(model: SAM2Model, images, *, remat_blocks: bool = False, dtype=jnp.float32):
    """``SAM2Model.forward_image`` in the compute dtype: images [n, S, S, 3] -> (fpn levels
    high-res first [n, 4h, 4w, C/8], [n, 2h, 2w, C/4], [n, h, w, C]; pos of the lowest
    level [n, h, w, C])."""
    fpn, pos = model.forward_image(images.astype(dtype), remat_blocks=remat_blocks)
    return tuple(f.astype(dtype) for f in fpn), pos[-1].astype(dtype)


def _frame_major_images(batch: ClipBatch):
    """[T, 2B, S, S, 3]: for each frame the B source images then the B target images."""
    imgs = jnp.concatenate([batch.src_images, batch.tgt_images], axis=0)  # [2B, T, S, S, 3]
    return jnp.swapaxes(imgs, 0, 1)


def frame_inputs(encoded, batch: ClipBatch):
    """Per-frame :class:`FrameInput` fields, frame-major ([T, B, ...] each), from the encoded
    images ``(fpn levels, pos)`` of :func:`_frame_major_images` ([T, 2B, ...] each)."""
    B, T = batch.src_images.shape[:2]
    fpn, pos = encoded
    src = lambda x: x[:, :B]
    tgt = lambda x: x[:, B:]
    return FrameInput(tgt_fpn=(tgt(fpn[0]), tgt(fpn[1]), tgt(fpn[2])), tgt_pos=tgt(pos), src_feat=src(fpn[2]),
                      src_mask=jnp.swapaxes(batch.src_masks, 0, 1), processed=jnp.ones((T, B), bool),
                      t=jnp.arange(T, dtype=jnp.int32))


def _encode_all(model, batch: ClipBatch, fcfg: TrainForwardConfig):
    """All T*2B images in one encoder batch -> ``(fpn, pos)`` with each field [T, 2B, ...]."""
    imgs = _frame_major_images(batch)
    T, n = imgs.shape[:2]
    out = encode_images(model, imgs.reshape((T * n,) + imgs.shape[2:]), remat_blocks=fcfg.remat_blocks,
                        dtype=fcfg.compute_dtype)
    return jax.tree.map(lambda x: x.reshape((T, n) + x.shape[1:]), out)


# ----------------------------------------------------------------------------- the clip


def clip_forward(graphdef, params, rngs, rest, batch: ClipBatch, fcfg: TrainForwardConfig = TrainForwardConfig()):
    """The training forward pass. Returns ``(ClipOutputs, rngs_after)``.

    ``graphdef, params, rngs, rest`` come from :func:`split_model` of a model in training
    mode (``model.train()``: dropout and drop-path on) or eval mode. A compute dtype other
    than float32 sets the mixed-precision policy on the graphdef (parameters stay float32, so
    gradients w.r.t. ``params`` are float32). Each frame is
    :func:`lmeec_jax.tracking.frame_step.frame_step` over the :class:`TrainingWindow` memory.
    """
    dtype = fcfg.compute_dtype
    graphdef = autocast_graphdef(graphdef, params, rngs, rest, dtype=dtype)  # float32: unchanged
    merge = lambda r: nnx.merge(graphdef, params, r, rest)
    cfg = merge(rngs).cfg
    B, T = batch.src_images.shape[:2]
    policy = TrainingWindow(cfg, T)

    # NNX variables merged at this level cannot be mutated under jax.grad, so every module
    # call that draws dropout bits runs on a module merged inside a transform (here a
    # checkpoint that saves everything, i.e. no recomputation; below the scan body) and
    # the RNG-stream state is threaded through explicitly.
    def encode(rngs_, b):
        m = merge(rngs_)
        return _encode_all(m, b, fcfg), nnx.state(m, nnx.RngState)

    def encode_frame(rngs_, imgs):  # the 2B images of one frame
        m = merge(rngs_)
        return nnx.state(m, nnx.RngState), encode_images(m, imgs, remat_blocks=fcfg.remat_blocks, dtype=dtype)

    if fcfg.remat_frames:
        # one frame at a time, recomputed in the backward pass: the encoder's activations
        # live for 2B images instead of T*2B (b+ at 480, 8 frames: ~8x less peak memory)
        rngs, encoded = jax.lax.scan(jax.checkpoint(encode_frame, prevent_cse=False), rngs,
                                     _frame_major_images(batch))
    else:
        encoded, rngs = jax.checkpoint(encode, policy=jax.checkpoint_policies.everything_saveable)(rngs, batch)
    inputs = frame_inputs(encoded, batch)
    h, w = inputs.src_feat.shape[2:4]

    def body(c, inp):
        rngs_, mem = c
        m = merge(rngs_)
        mem, out = frame_step(m, policy, mem, inp, deterministic=fcfg.deterministic)
        res = (out.high_res_logits[:, None], out.low_res_logits[:, None], out.ious[:, None],
               out.object_score_logits[:, None])
        return (nnx.state(m, nnx.RngState), mem), res

    if fcfg.remat_frames:
        body = jax.checkpoint(body, prevent_cse=False)
    (rngs, _), res = jax.lax.scan(body, (rngs, policy.init(B, h * w, dtype)), inputs)
    return ClipOutputs(*res), rngs
