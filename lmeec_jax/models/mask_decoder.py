"""SAM 2.1 mask decoder (sam2.modeling.sam.mask_decoder.MaskDecoder), NHWC.

Parameter names mirror torch: ``transformer.*``, ``iou_token.weight``, ``mask_tokens.weight``,
``obj_score_token.weight``, ``output_upscaling.{0,1,3}.*`` (index 0/3 ConvTranspose2d kept in
torch layout [I, O, 2, 2]), ``conv_s0``, ``conv_s1``, ``output_hypernetworks_mlps.{i}.layers.{j}``,
``iou_prediction_head.layers.{j}``, ``pred_obj_score_head`` (Linear, or ``.layers.{j}`` MLP).

Masks are returned NHWC: [B, H, W, num_masks] (torch: [B, num_masks, H, W]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmeec_jax.models.common import MLP, Activation, conv2d
from lmeec_jax.models.prompt_encoder import embedding


class ConvTranspose2x2(nnx.Module):
    """torch nn.ConvTranspose2d(in, out, kernel_size=2, stride=2) on NHWC input.

    ``weight`` keeps the torch layout [in, out, 2, 2]; ``bias`` [out]. With kernel = stride = 2
    the output patches do not overlap: out[b, 2i+k, 2j+l, o] = sum_c x[b, i, j, c] W[c, o, k, l] + bias[o].
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        bound = 1.0 / np.sqrt(out_channels * 4)
        key_w, key_b = rngs.params(), rngs.params()
        self.weight = nnx.Param(
            jax.random.uniform(key_w, (in_channels, out_channels, 2, 2), jnp.float32, -bound, bound)
        )
        self.bias = nnx.Param(jax.random.uniform(key_b, (out_channels,), jnp.float32, -bound, bound))
        self.dtype = None  # compute dtype (mixed precision, models/precision.py); None: promoted

    def __call__(self, x):
        b, h, w, _ = x.shape
        o = self.weight.shape[1]
        wt, bias = self.weight[...], self.bias[...]
        if self.dtype is not None:
            x, wt, bias = x.astype(self.dtype), wt.astype(self.dtype), bias.astype(self.dtype)
        y = jnp.einsum("bhwc,cokl->bhkwlo", x, wt)
        return y.reshape(b, 2 * h, 2 * w, o) + bias


class MaskDecoder(nnx.Module):
    """Two-way transformer over [obj_score?, iou, mask tokens, prompt tokens] and image tokens,
    hypernetwork mask heads on the upscaled embedding, IoU head and object-score head.

    ``conv_s0`` / ``conv_s1`` (present when ``use_high_res_features``) are applied by the caller to
    FPN levels 0 / 1 (NHWC), as SAM2Base.forward_image does, and passed as ``high_res_features``.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nnx.Module,
        num_multimask_outputs: int = 3,
        activation: str = "gelu",
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
        rngs: nnx.Rngs,
    ):
        c = transformer_dim
        self.transformer_dim = c
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = embedding(1, c, rngs=rngs)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = embedding(self.num_mask_tokens, c, rngs=rngs)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = embedding(1, c, rngs=rngs)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        self.output_upscaling = nnx.List(
            [
                ConvTranspose2x2(c, c // 4, rngs=rngs),
                nnx.LayerNorm(c // 4, epsilon=1e-6, use_fast_variance=False, rngs=rngs),
                Activation(activation),
                ConvTranspose2x2(c // 4, c // 8, rngs=rngs),
                Activation(activation),
            ]
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = conv2d(c, c // 8, 1, rngs=rngs)
            self.conv_s1 = conv2d(c, c // 4, 1, rngs=rngs)

        self.output_hypernetworks_mlps = nnx.List(
            [MLP(c, c, c // 8, 3, rngs=rngs) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            c,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
            rngs=rngs,
        )
        if pred_obj_scores:
            if pred_obj_scores_mlp:
                self.pred_obj_score_head = MLP(c, c, 1, 3, rngs=rngs)
            else:
                self.pred_obj_score_head = nnx.Linear(c, 1, rngs=rngs)

        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh
        # dtype of the mask-logit product's result (mixed precision: float32, accumulated in
        # float32 from bf16 operands); None: that of the operands
        self.logits_dtype = None

    def __call__(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Optional[Sequence] = None,
        *,
        training: bool = False,
    ):
        """
        image_embeddings [Bi, H, W, C]; image_pe [1, H, W, C] (``get_dense_pe()``);
        sparse_prompt_embeddings [B, N, C]; dense_prompt_embeddings [B, H, W, C];
        high_res_features: (feat_s0 [B, 4H, 4W, C/8], feat_s1 [B, 2H, 2W, C/4]) already through
        conv_s0 / conv_s1. ``multimask_output`` / ``repeat_image`` / ``training`` are static.
        ``training=False`` is torch's eval mode: single-mask output then uses the dynamic
        stability fallback when it is configured.

        Returns masks [B, 4H, 4W, M] (M = 3 if multimask_output else 1), iou_pred [B, M],
        sam_tokens_out [B, 3 or 1, C], object_score_logits [B, 1].
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )
        if multimask_output:
            masks = masks[..., 1:]
            iou_pred = iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks = masks[..., 0:1]
            iou_pred = iou_pred[:, 0:1]

        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        repeat_image: bool,
        high_res_features: Optional[Sequence] = None,
    ):
        """All mask-token outputs: masks [B, 4H, 4W, T], iou_pred [B, T], mask tokens [B, T, C],
        object_score_logits [B, 1] (T = num_mask_tokens)."""
        if self.pred_obj_scores:
            output_tokens = jnp.concatenate(
                [self.obj_score_token.embedding[...], self.iou_token.embedding[...], self.mask_tokens.embedding[...]],
                axis=0,
            )
            s = 1
        else:
            output_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0)
            s = 0
        bt = sparse_prompt_embeddings.shape[0]
        output_tokens = jnp.broadcast_to(output_tokens[None], (bt,) + output_tokens.shape)
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)

        if repeat_image:
            src = jnp.repeat(image_embeddings, bt, axis=0)
        else:
            if image_embeddings.shape[0] != bt:
                raise ValueError("image_embeddings and prompts must have the same batch size")
            src = image_embeddings
        src = src + dense_prompt_embeddings
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe should have size 1 in batch dim (from `get_dense_pe()`)")
        pos_src = jnp.repeat(image_pe, bt, axis=0)
        b, h, w, c = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]

        src = src.reshape(b, h, w, c)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        if not self.use_high_res_features:
            up = act2(dc2(act1(ln1(dc1(src)))))
        else:
            feat_s0, feat_s1 = high_res_features
            up = act1(ln1(dc1(src) + feat_s1))
            up = act2(dc2(up) + feat_s0)

        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
        )  # [B, T, C/8]
        if self.logits_dtype is None:
            masks = jnp.einsum("btc,bhwc->bhwt", hyper_in, up)
        else:
            masks = jnp.einsum("btc,bhwc->bhwt", hyper_in, up, preferred_element_type=self.logits_dtype)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:
            object_score_logits = jnp.full((iou_pred.shape[0], 1), 10.0, iou_pred.dtype)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits):
        """IoU of {logits > delta} and {logits > -delta} per mask; mask_logits [B, H, W, M] -> [B, M]."""
        delta = self.dynamic_multimask_stability_delta
        area_i = jnp.sum(mask_logits > delta, axis=(1, 2)).astype(jnp.float32)
        area_u = jnp.sum(mask_logits > -delta, axis=(1, 2)).astype(jnp.float32)
        return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)

    def _dynamic_multimask_via_stability(self, all_mask_logits, all_iou_scores):
        """Single-mask output, falling back to the best-IoU multimask output (tokens 1..3) when
        the single mask's stability score is below the threshold."""
        multimask_logits = all_mask_logits[..., 1:]
        multimask_iou = all_iou_scores[:, 1:]
        best = jnp.argmax(multimask_iou, axis=-1)  # first maximum, like torch
        best_logits = jnp.take_along_axis(multimask_logits, best[:, None, None, None], axis=-1)
        best_iou = jnp.take_along_axis(multimask_iou, best[:, None], axis=-1)

        single_logits = all_mask_logits[..., 0:1]
        single_iou = all_iou_scores[:, 0:1]
        is_stable = self._get_stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh  # [B, 1]
        mask_out = jnp.where(is_stable[:, None, None, :], single_logits, best_logits)
        iou_out = jnp.where(is_stable, single_iou, best_iou)
        return mask_out, iou_out
