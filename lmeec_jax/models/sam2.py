"""SAM 2.1 as one NNX module (``sam2.modeling.sam2_base.SAM2Base``) plus its per-frame maths.

Attribute names equal the torch state dict (``image_encoder``, ``memory_attention``,
``memory_encoder``, ``sam_prompt_encoder``, ``sam_mask_decoder``, ``obj_ptr_proj``,
``obj_ptr_tpos_proj``, ``mask_downsample``, ``maskmem_tpos_enc``, ``no_mem_embed``,
``no_mem_pos_enc``, ``no_obj_ptr``, ``no_obj_embed_spatial`` and, for LM-EEC, ``MV_MoE``),
so that ``weights.load_state_dict`` maps a checkpoint without a name table.

The methods are the building blocks of a tracking step, all jittable, NHWC, with
fixed shapes: image features, SAM heads, memory encoding, memory conditioning over a
padded set of memory slots with validity masks, and object-pointer tokens. The SAM 2.1
video ``track_step`` over fixed slots is in :mod:`tests.sam2_video`; the LM-EEC
two-view step is in :mod:`lmeec_jax.tracking.frame_step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.config import ModelConfig
from lmeec_jax.models.common import MLP, conv2d, resize_bilinear
from lmeec_jax.models.fpn import FpnNeck, ImageEncoder
from lmeec_jax.models.hiera import Hiera
from lmeec_jax.models.mask_decoder import MaskDecoder
from lmeec_jax.models.memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention
from lmeec_jax.models.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from lmeec_jax.models.position_encoding import PositionEmbeddingSine
from lmeec_jax.models.prompt_encoder import PromptEncoder
from lmeec_jax.models.transformer import TwoWayTransformer

NO_OBJ_SCORE = -1024.0


def _trunc_normal(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.truncated_normal(rngs.params(), -2.0 / std, 2.0 / std, shape, jnp.float32)


def get_1d_sine_pe(pos, dim: int, temperature: float = 10000.0):
    """sam2_utils.get_1d_sine_pe: [..., ] positions -> [..., dim] (sin half, cos half)."""
    pe_dim = dim // 2
    dim_t = jnp.arange(pe_dim, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / pe_dim)
    pos_embed = pos[..., None].astype(jnp.float32) / dim_t
    return jnp.concatenate([jnp.sin(pos_embed), jnp.cos(pos_embed)], axis=-1)


class SAM2Model(nnx.Module):
    """SAM 2.1 (and, with ``cfg.mv_moe``, LM-EEC) parameters and per-frame operations."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        C, mem = cfg.d_model, cfg.mem_dim
        fs = cfg.feat_size
        t = cfg.trunk
        trunk = Hiera(
            embed_dim=t.embed_dim, num_heads=t.num_heads, drop_path_rate=t.drop_path_rate, q_pool=t.q_pool,
            q_stride=t.q_stride, stages=t.stages, dim_mul=t.dim_mul, head_mul=t.head_mul,
            window_pos_embed_bkg_spatial_size=t.window_pos_embed_bkg_spatial_size,
            window_spec=t.window_spec, global_att_blocks=t.global_att_blocks, rngs=rngs,
        )
        neck = FpnNeck(
            position_encoding=PositionEmbeddingSine(C), d_model=C,
            backbone_channel_list=cfg.backbone_channel_list, fpn_top_down_levels=cfg.fpn_top_down_levels,
            fpn_interp_model="nearest", rngs=rngs,
        )
        self.image_encoder = ImageEncoder(trunk, neck, scalp=cfg.scalp, rngs=rngs)

        def rope_attn(kv_in_dim=None, k_repeat=False):
            return RoPEAttention(C, 1, 1, cfg.dropout, kv_in_dim, rope_theta=cfg.rope_theta,
                                 rope_k_repeat=k_repeat, feat_sizes=(fs, fs), rngs=rngs)

        layer = MemoryAttentionLayer(
            activation="relu", cross_attention=rope_attn(mem, True), d_model=C,
            dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout, pos_enc_at_attn=False,
            pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
            self_attention=rope_attn(), rngs=rngs,
        )
        self.memory_attention = MemoryAttention(C, True, layer, cfg.memory_attention_layers, rngs=rngs)
        self.memory_encoder = MemoryEncoder(
            out_dim=mem,
            mask_downsampler=MaskDownSampler(embed_dim=C, kernel_size=3, stride=2, padding=1, rngs=rngs),
            fuser=Fuser(CXBlock(C, 7, 3, layer_scale_init_value=1e-6, use_dwconv=True, rngs=rngs),
                        cfg.fuser_layers, rngs=rngs),
            position_encoding=PositionEmbeddingSine(mem),
            in_dim=C, rngs=rngs,
        )
        self.maskmem_tpos_enc = nnx.Param(_trunc_normal(rngs, (cfg.num_maskmem, 1, 1, mem)))
        self.no_mem_embed = nnx.Param(_trunc_normal(rngs, (1, 1, C)))
        self.no_mem_pos_enc = nnx.Param(_trunc_normal(rngs, (1, 1, C)))
        self.mask_downsample = conv2d(1, 1, 4, 4, rngs=rngs)
        self.no_obj_ptr = nnx.Param(_trunc_normal(rngs, (1, C)))
        self.no_obj_embed_spatial = nnx.Param(_trunc_normal(rngs, (1, mem)))
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=C, image_embedding_size=(fs, fs), input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=16, rngs=rngs,
        )
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=C, mlp_dim=2048, num_heads=8, rngs=rngs),
            transformer_dim=C, iou_head_depth=3, iou_head_hidden_dim=256, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=0.05, dynamic_multimask_stability_thresh=0.98,
            rngs=rngs,
        )
        self.obj_ptr_proj = MLP(C, C, C, 3, rngs=rngs)
        self.obj_ptr_tpos_proj = nnx.Linear(C, mem, rngs=rngs)
        if cfg.mv_moe:
            from lmeec_jax.models.mv_moe import MV_MoE

            self.MV_MoE = MV_MoE(C, rngs=rngs)

    # ------------------------------------------------------------------ image
    def forward_image(self, images, *, remat_blocks: bool = False):
        """images [B, S, S, 3] normalised -> (backbone_fpn, vision_pos_enc), 3 levels each, high-res first.

        ``conv_s0``/``conv_s1`` of the mask decoder are applied to levels 0 and 1 (as SAM2Base).
        ``remat_blocks``: recompute each Hiera block in the backward pass (training memory).
        """
        out = self.image_encoder(images, remat_blocks=remat_blocks)
        fpn = list(out["backbone_fpn"])
        fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return fpn, list(out["vision_pos_enc"])

    # ------------------------------------------------------------------ SAM heads
    def forward_sam_heads(
        self,
        backbone_features,
        point_coords=None,
        point_labels=None,
        mask_inputs=None,
        high_res_features=None,
        multimask_output: bool = False,
        add_dense_prompt: bool = True,
        training: bool = False,
    ):
        """SAM2Base._forward_sam_heads. backbone_features [B, h, w, C]; points in pixels of the
        input image; mask_inputs [B, H, W, 1] (any size; resized to 4h×4w with antialias).

        ``add_dense_prompt=False`` is LM-EEC's decoder, which does not add the dense
        (no-mask) prompt embedding to the image embedding.
        Returns a dict with low_res_multimasks, high_res_multimasks, ious, low_res_masks,
        high_res_masks, obj_ptr, object_score_logits (masks NHWC with M channels).
        """
        B = backbone_features.shape[0]
        if point_coords is None:
            point_coords = jnp.zeros((B, 1, 2), jnp.float32)
            point_labels = -jnp.ones((B, 1), jnp.int32)
        sam_mask_prompt = None
        if mask_inputs is not None:
            size = self.sam_prompt_encoder.mask_input_size
            if tuple(mask_inputs.shape[1:3]) != tuple(size):
                sam_mask_prompt = resize_bilinear(mask_inputs.astype(jnp.float32), size, antialias=True)
            else:
                sam_mask_prompt = mask_inputs.astype(jnp.float32)
        sparse, dense = self.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=sam_mask_prompt)
        if not add_dense_prompt:
            dense = jnp.zeros_like(dense)
        low_res_multimasks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res_features,
            training=training,
        )
        is_obj_appearing = object_score_logits > 0  # [B, 1]
        low_res_multimasks = jnp.where(is_obj_appearing[:, None, None, :], low_res_multimasks, NO_OBJ_SCORE)
        low_res_multimasks = low_res_multimasks.astype(jnp.float32)
        S = self.cfg.image_size
        high_res_multimasks = resize_bilinear(low_res_multimasks, (S, S), antialias=False)

        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best = jnp.argmax(ious, axis=-1)
            take = lambda x: jnp.take_along_axis(x, best[:, None, None, None], axis=-1)
            low_res_masks, high_res_masks = take(low_res_multimasks), take(high_res_multimasks)
            if sam_output_tokens.shape[1] > 1:
                sam_output_token = jnp.take_along_axis(sam_output_tokens, best[:, None, None], axis=1)[:, 0]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        lam = is_obj_appearing.astype(jnp.float32)
        obj_ptr = lam * obj_ptr  # fixed_no_obj_ptr
        obj_ptr = obj_ptr + (1 - lam) * self.no_obj_ptr[...]
        return dict(
            low_res_multimasks=low_res_multimasks, high_res_multimasks=high_res_multimasks, ious=ious,
            low_res_masks=low_res_masks, high_res_masks=high_res_masks, obj_ptr=obj_ptr,
            object_score_logits=object_score_logits,
        )

    def use_mask_as_output(self, backbone_features, high_res_features, mask_inputs):
        """SAM2Base._use_mask_as_output: a binary mask input [B, S, S, 1] becomes the output."""
        out_scale, out_bias = 20.0, -10.0
        m = mask_inputs.astype(jnp.float32)
        high_res_masks = m * out_scale + out_bias
        h, w = high_res_masks.shape[1] // 4, high_res_masks.shape[2] // 4
        low_res_masks = resize_bilinear(high_res_masks, (h, w), antialias=True)
        ious = jnp.ones((m.shape[0], 1), jnp.float32)
        obj_ptr = self.forward_sam_heads(
            backbone_features, mask_inputs=self.mask_downsample(m), high_res_features=high_res_features
        )["obj_ptr"]
        lam = jnp.any(m.reshape(m.shape[0], -1) > 0.0, axis=1)[:, None].astype(jnp.float32)
        object_score_logits = out_scale * lam + out_bias
        obj_ptr = lam * obj_ptr + (1 - lam) * self.no_obj_ptr[...]
        return dict(
            low_res_multimasks=low_res_masks, high_res_multimasks=high_res_masks, ious=ious,
            low_res_masks=low_res_masks, high_res_masks=high_res_masks, obj_ptr=obj_ptr,
            object_score_logits=object_score_logits,
        )

    # ------------------------------------------------------------------ memory
    def encode_new_memory(self, pix_feat, pred_masks_high_res, object_score_logits, binarize: bool = False):
        """SAM2Base._encode_new_memory -> (maskmem_features [B,h,w,mem], maskmem_pos_enc [B,h,w,mem]).

        ``object_score_logits`` [B, 1]; ``None`` means the object is treated as present
        (no no-object embedding), as LM-EEC does for the source view.
        """
        if binarize:
            mask_for_mem = (pred_masks_high_res > 0).astype(jnp.float32)
        else:
            mask_for_mem = jax.nn.sigmoid(pred_masks_high_res.astype(jnp.float32))
        mask_for_mem = mask_for_mem * self.cfg.sigmoid_scale_for_mem_enc + self.cfg.sigmoid_bias_for_mem_enc
        if jnp.issubdtype(pix_feat.dtype, jnp.floating) and pix_feat.dtype != jnp.float32:
            mask_for_mem = mask_for_mem.astype(pix_feat.dtype)  # the scaled mask in f32, the encoder in bf16
        out = self.memory_encoder(pix_feat, mask_for_mem, skip_mask_sigmoid=True)
        feats, pos = out["vision_features"], out["vision_pos_enc"][-1]
        if object_score_logits is not None:
            absent = 1.0 - (object_score_logits > 0).astype(feats.dtype)  # [B, 1]
            feats = feats + absent[:, None, None, :] * self.no_obj_embed_spatial[...][:, None, None, :].astype(feats.dtype)
        return feats, pos

    def tpos_enc(self, index):
        """maskmem_tpos_enc[index] for an int array of indices -> [..., mem]."""
        table = self.maskmem_tpos_enc[...].reshape(self.cfg.num_maskmem, -1)
        return table[index]

    def obj_ptr_tokens(self, ptrs, tdiff, t_diff_max):
        """Object pointers [B, P, C] at signed temporal distances ``tdiff`` [B, P] ->
        (tokens [B, P*k, mem], pos [B, P*k, mem]) with k = C // mem, as SAM2Base splits them."""
        B, P, C = ptrs.shape
        mem = self.cfg.mem_dim
        t_diff_max = jnp.maximum(jnp.asarray(t_diff_max, jnp.float32), 1.0)
        pos = get_1d_sine_pe(tdiff.astype(jnp.float32) / t_diff_max, dim=C)
        pos = self.obj_ptr_tpos_proj(pos)  # [B, P, mem]
        k = C // mem
        if k > 1:
            ptrs = ptrs.reshape(B, P * k, mem)  # pointer p -> tokens p*k .. p*k+k-1
            pos = jnp.repeat(pos, k, axis=1)
        return ptrs, pos

    def attend_memory(self, feat, feat_pos, mem_feats, mem_pos, mem_valid, ptr_tokens=None, ptr_pos=None,
                      ptr_valid=None, deterministic: bool = True):
        """Memory attention of the current frame over padded memory slots.

        feat/feat_pos [B, h, w, C]; mem_feats/mem_pos [B, S, h*w, mem] (pos already including the
        temporal encoding); mem_valid [B, S] bool; ptr_tokens/ptr_pos [B, T, mem]; ptr_valid [B, T].
        Invalid slots get zero attention weight. Returns [B, h, w, C].
        """
        B, h, w, C = feat.shape
        S, N = mem_feats.shape[1], mem_feats.shape[2]
        memory = mem_feats.reshape(B, S * N, -1)
        memory_pos = mem_pos.reshape(B, S * N, -1)
        mask = jnp.repeat(mem_valid, N, axis=1)
        n_ptr = 0
        if ptr_tokens is not None and ptr_tokens.shape[1] > 0:
            n_ptr = ptr_tokens.shape[1]
            memory = jnp.concatenate([memory, ptr_tokens.astype(memory.dtype)], axis=1)
            memory_pos = jnp.concatenate([memory_pos, ptr_pos.astype(memory_pos.dtype)], axis=1)
            mask = jnp.concatenate([mask, ptr_valid], axis=1)
        out = self.memory_attention(
            curr=feat.reshape(B, h * w, C), curr_pos=feat_pos.reshape(B, h * w, C), memory=memory,
            memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr, memory_mask=mask, deterministic=deterministic,
        )
        return out.reshape(B, h, w, C)

    def no_memory_features(self, feat):
        """Initial conditioning frame: pixel features + no_mem_embed (directly_add_no_mem_embed)."""
        return feat + self.no_mem_embed[...].reshape(1, 1, 1, -1)


def build_model(cfg: ModelConfig, *, seed: int = 0, abstract: bool = False) -> SAM2Model:
    """The model for ``cfg``, randomly initialised from ``seed`` with numpy (see
    :mod:`lmeec_jax.models.init`; no per-shape XLA compilation). ``abstract=True`` returns
    shapes only, to be filled by ``weights.load_state_dict`` (what checkpoint loading does)."""
    from lmeec_jax.models.init import materialize

    model = nnx.eval_shape(lambda: SAM2Model(cfg, rngs=nnx.Rngs(seed)))
    return materialize(model, seed, params=not abstract)


def num_obj_ptr_slots(cfg: ModelConfig) -> int:
    """Maximum number of past object pointers a frame attends to (max_obj_ptrs_in_encoder - 1)."""
    return cfg.max_obj_ptrs_in_encoder - 1


__all__ = ["SAM2Model", "build_model", "get_1d_sine_pe", "NO_OBJ_SCORE", "num_obj_ptr_slots"]
