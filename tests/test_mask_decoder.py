"""Parity of the SAM 2.1 prompt encoder, two-way transformer and mask decoder against sam2==1.1.0.

Tolerances: every compared tensor is float32 output of the same maths with random O(1) inputs
and randomised weights; we allow 1e-4 absolute on O(1) values, scaled by the tensor's magnitude
where it is larger (mask logits reach ~10-100 with random weights, so absolute error grows with
the summed magnitude; f32 rounding of a 256-term reduction is ~1e-6 relative).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import max_err, numpy_state_dict, reference_model, to_nchw, to_nhwc, torch

from lmeec_jax.models.mask_decoder import MaskDecoder
from lmeec_jax.models.prompt_encoder import PromptEncoder
from lmeec_jax.models.transformer import TwoWayTransformer
from lmeec_jax.models.weights import load_state_dict

REL_TOL = 1e-5  # relative to max(1, |reference|_inf)
ABS_TOL = 1e-4


def check(name, ours, ref, tol_scale=1.0):
    ours = np.asarray(ours)
    ref = ref.detach().cpu().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    if ref.size == 0:
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        print(f"  {name:38s} empty {ours.shape}")
        return 0.0
    err = max_err(ours, ref)
    scale = float(np.max(np.abs(ref)))
    tol = tol_scale * max(ABS_TOL, REL_TOL * scale)
    print(f"  {name:38s} max abs err {err:.3e}  (|ref|max {scale:.3g}, tol {tol:.1e})")
    assert err <= tol, (name, err, tol)
    return err


def build_prompt_encoder(tpe):
    pe = PromptEncoder(
        embed_dim=tpe.embed_dim,
        image_embedding_size=tpe.image_embedding_size,
        input_image_size=tpe.input_image_size,
        mask_in_chans=tpe.mask_downscaling[0].out_channels * 4,
        rngs=nnx.Rngs(0),
    )
    load_state_dict(pe, numpy_state_dict(tpe))
    return pe


def build_mask_decoder(tmd):
    tt = tmd.transformer
    transformer = TwoWayTransformer(
        depth=tt.depth,
        embedding_dim=tt.embedding_dim,
        num_heads=tt.num_heads,
        mlp_dim=tt.mlp_dim,
        rngs=nnx.Rngs(1),
    )
    md = MaskDecoder(
        transformer_dim=tmd.transformer_dim,
        transformer=transformer,
        num_multimask_outputs=tmd.num_multimask_outputs,
        iou_head_depth=tmd.iou_prediction_head.num_layers,
        iou_head_hidden_dim=tmd.iou_prediction_head.layers[0].out_features,
        use_high_res_features=tmd.use_high_res_features,
        iou_prediction_use_sigmoid=tmd.iou_prediction_head.sigmoid_output,
        dynamic_multimask_via_stability=tmd.dynamic_multimask_via_stability,
        dynamic_multimask_stability_delta=tmd.dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh=tmd.dynamic_multimask_stability_thresh,
        pred_obj_scores=tmd.pred_obj_scores,
        pred_obj_scores_mlp=hasattr(tmd.pred_obj_score_head, "layers"),
        use_multimask_token_for_obj_ptr=tmd.use_multimask_token_for_obj_ptr,
        rngs=nnx.Rngs(2),
    )
    load_state_dict(md, numpy_state_dict(tmd))
    return md


@pytest.fixture(scope="module")
def tiny480():
    ref = reference_model("tiny", 480)
    return ref, build_prompt_encoder(ref.sam_prompt_encoder), build_mask_decoder(ref.sam_mask_decoder)


def _prompts(rng, b, image_size):
    coords = rng.uniform(0, image_size, size=(b, 4, 2)).astype(np.float32)
    labels = np.array([[1, 0, -1, 1], [0, 1, 2, 3]][:b], dtype=np.int32)
    boxes = np.sort(rng.uniform(0, image_size, size=(b, 2, 2)), axis=1).reshape(b, 4).astype(np.float32)
    return coords, labels, boxes


def test_sam21_config(tiny480):
    """The reference decoder is configured as SAM 2.1 (so our constructor args are exercised)."""
    ref, _, md = tiny480
    tmd = ref.sam_mask_decoder
    assert md.use_high_res_features and md.pred_obj_scores and md.use_multimask_token_for_obj_ptr
    assert tmd.dynamic_multimask_via_stability is True
    assert tmd.dynamic_multimask_stability_delta == 0.05 and tmd.dynamic_multimask_stability_thresh == 0.98
    assert tmd.iou_prediction_head.sigmoid_output is True


def test_prompt_encoder(tiny480):
    ref, pe, _ = tiny480
    tpe = ref.sam_prompt_encoder
    rng = np.random.default_rng(0)
    b = 2
    coords, labels, boxes = _prompts(rng, b, 480)
    h, w = tpe.image_embedding_size
    masks = rng.normal(size=(b, 1, 4 * h, 4 * w)).astype(np.float32)
    tc, tl, tb, tm = (torch.from_numpy(x) for x in (coords, labels, boxes, masks))
    print()
    with torch.no_grad():
        check("dense pe", pe.get_dense_pe(), to_nhwc(tpe.get_dense_pe()))
        cases = {
            "points (pad)": ((tc, tl), None, None),
            "points + boxes": ((tc, tl), tb, None),
            "boxes": (None, tb, None),
            "points + mask": ((tc, tl), None, tm),
            "mask only": (None, None, tm),
            "none": (None, None, None),
        }
        for name, (pts, bx, mk) in cases.items():
            ts, td = tpe(pts, bx, mk)
            js, jd = pe(
                None if pts is None else (jnp.asarray(coords), jnp.asarray(labels)),
                None if bx is None else jnp.asarray(boxes),
                None if mk is None else jnp.asarray(masks.transpose(0, 2, 3, 1)),
            )
            assert js.shape == tuple(ts.shape), (name, js.shape, ts.shape)
            check(f"{name}: sparse", js, ts)
            check(f"{name}: dense", jd, to_nhwc(td))


def _run_pair(ref, pe, md, *, b, image_batch, multimask, prompt, seed, jit=False):
    """Run the torch and NNX prompt encoder + decoder (high-res features through conv_s0/s1)."""
    tpe, tmd = ref.sam_prompt_encoder, ref.sam_mask_decoder
    rng = np.random.default_rng(seed)
    h, w = tpe.image_embedding_size
    c = tpe.embed_dim
    img = rng.normal(size=(image_batch, c, h, w)).astype(np.float32)
    fpn0 = rng.normal(size=(image_batch, c, 4 * h, 4 * w)).astype(np.float32)
    fpn1 = rng.normal(size=(image_batch, c, 2 * h, 2 * w)).astype(np.float32)
    coords, labels, boxes = _prompts(rng, b, tpe.input_image_size[0])
    masks_in = rng.normal(size=(b, 1, 4 * h, 4 * w)).astype(np.float32)
    pts = (coords, labels) if prompt in ("points", "points+mask") else None
    bx = boxes if prompt == "box" else None
    mk = masks_in if prompt in ("mask", "points+mask") else None
    repeat_image = image_batch != b

    with torch.no_grad():
        t_s0 = tmd.conv_s0(torch.from_numpy(fpn0))
        t_s1 = tmd.conv_s1(torch.from_numpy(fpn1))
        if repeat_image:  # as SAM2 image predictor: high-res feats per image repeated per prompt
            t_hr = [torch.repeat_interleave(t, b, dim=0) for t in (t_s0, t_s1)]
        else:
            t_hr = [t_s0, t_s1]
        ts, td = tpe(
            None if pts is None else tuple(torch.from_numpy(x) for x in pts),
            None if bx is None else torch.from_numpy(bx),
            None if mk is None else torch.from_numpy(mk),
        )
        t_out = tmd(
            image_embeddings=torch.from_numpy(img),
            image_pe=tpe.get_dense_pe(),
            sparse_prompt_embeddings=ts,
            dense_prompt_embeddings=td,
            multimask_output=multimask,
            repeat_image=repeat_image,
            high_res_features=t_hr,
        )

    def fwd(pe, md, img, fpn0, fpn1, pts, bx, mk):
        s0 = md.conv_s0(fpn0)
        s1 = md.conv_s1(fpn1)
        if repeat_image:
            s0, s1 = jnp.repeat(s0, b, axis=0), jnp.repeat(s1, b, axis=0)
        sparse, dense = pe(pts, bx, mk)
        out = md(img, pe.get_dense_pe(), sparse, dense, multimask, repeat_image, (s0, s1))
        return (s0, s1) + tuple(out)

    if jit:
        fwd = nnx.jit(fwd)
    args = (
        jnp.asarray(img.transpose(0, 2, 3, 1)),
        jnp.asarray(fpn0.transpose(0, 2, 3, 1)),
        jnp.asarray(fpn1.transpose(0, 2, 3, 1)),
        None if pts is None else tuple(jnp.asarray(x) for x in pts),
        None if bx is None else jnp.asarray(bx),
        None if mk is None else jnp.asarray(mk.transpose(0, 2, 3, 1)),
    )
    j_out = fwd(pe, md, *args)
    return (t_hr[0], t_hr[1]) + tuple(t_out), j_out


def _compare(tag, t_out, j_out):
    t_s0, t_s1, t_masks, t_iou, t_tok, t_obj = t_out
    j_s0, j_s1, j_masks, j_iou, j_tok, j_obj = j_out
    print(f"\n [{tag}]  masks {tuple(j_masks.shape)}, tokens {tuple(j_tok.shape)}")
    errs = {
        "conv_s0": check("conv_s0(fpn0)", j_s0, to_nhwc(t_s0)),
        "conv_s1": check("conv_s1(fpn1)", j_s1, to_nhwc(t_s1)),
        "masks": check("masks", j_masks, to_nhwc(t_masks)),
        "iou_pred": check("iou_pred", j_iou, t_iou),
        "sam_tokens_out": check("sam_tokens_out", j_tok, t_tok),
        "object_score_logits": check("object_score_logits", j_obj, t_obj),
    }
    return errs


CASES = [
    # (prompt, multimask, image_batch, jit)
    ("points", True, 2, False),
    ("points", False, 2, True),
    ("box", True, 2, False),
    ("box", False, 2, False),
    ("mask", False, 2, False),
    ("points+mask", True, 1, False),  # repeat_image: one image, two prompts
]


@pytest.mark.parametrize("prompt,multimask,image_batch,jit", CASES)
def test_mask_decoder_tiny480(tiny480, prompt, multimask, image_batch, jit):
    ref, pe, md = tiny480
    t_out, j_out = _run_pair(
        ref, pe, md, b=2, image_batch=image_batch, multimask=multimask, prompt=prompt, seed=1, jit=jit
    )
    _compare(f"tiny 480 {prompt} multimask={multimask} image_batch={image_batch} jit={jit}", t_out, j_out)


def test_mask_decoder_tiny1024():
    ref = reference_model("tiny", 1024)
    pe, md = build_prompt_encoder(ref.sam_prompt_encoder), build_mask_decoder(ref.sam_mask_decoder)
    t_out, j_out = _run_pair(ref, pe, md, b=2, image_batch=2, multimask=False, prompt="points", seed=3, jit=True)
    _compare("tiny 1024 points single-mask jit", t_out, j_out)


def test_transformer_direct(tiny480):
    ref, _, md = tiny480
    tt = ref.sam_mask_decoder.transformer
    rng = np.random.default_rng(5)
    img = rng.normal(size=(2, 256, 30, 30)).astype(np.float32)
    pos = rng.normal(size=(2, 256, 30, 30)).astype(np.float32)
    tok = rng.normal(size=(2, 9, 256)).astype(np.float32)
    with torch.no_grad():
        tq, tk = tt(torch.from_numpy(img), torch.from_numpy(pos), torch.from_numpy(tok))
    jq, jk = md.transformer(
        jnp.asarray(img.transpose(0, 2, 3, 1)), jnp.asarray(pos.transpose(0, 2, 3, 1)), jnp.asarray(tok)
    )
    print()
    check("two-way transformer queries", jq, tq)
    check("two-way transformer keys", jk, tk)


def test_dynamic_multimask_selection(tiny480):
    """Stable / unstable / empty-union single masks and IoU ties, against torch's method."""
    ref, _, md = tiny480
    tmd = ref.sam_mask_decoder
    rng = np.random.default_rng(7)
    b, h, w = 5, 16, 16
    logits = rng.normal(size=(b, 4, h, w)).astype(np.float32)
    logits[0, 0] = 5.0  # fully stable
    logits[1, 0] = -5.0  # empty union -> stability 1 -> stable
    logits[2, 0] = rng.choice([-0.03, 0.03, 3.0], size=(h, w))  # unstable
    logits[3, 0, :8] = 4.0
    logits[3, 0, 8:] = -4.0  # stable
    ious = rng.uniform(size=(b, 4)).astype(np.float32)
    ious[2, 1:] = [0.5, 0.9, 0.9]  # tie -> first max (index 2)
    with torch.no_grad():
        tm, ti = tmd._dynamic_multimask_via_stability(torch.from_numpy(logits), torch.from_numpy(ious))
        t_stab = tmd._get_stability_scores(torch.from_numpy(logits[:, :1]))
    jm, ji = md._dynamic_multimask_via_stability(jnp.asarray(logits.transpose(0, 2, 3, 1)), jnp.asarray(ious))
    np.testing.assert_array_equal(np.asarray(md._get_stability_scores(jnp.asarray(logits[:, :1].transpose(0, 2, 3, 1)))), t_stab.numpy())
    np.testing.assert_array_equal(np.asarray(jm), to_nhwc(tm))
    np.testing.assert_array_equal(np.asarray(ji), ti.numpy())
    assert not np.array_equal(np.asarray(jm)[2, ..., 0], logits[2, 0])  # the fallback was taken


def test_training_mode_skips_dynamic(tiny480):
    ref, pe, md = tiny480
    rng = np.random.default_rng(9)
    img = jnp.asarray(rng.normal(size=(2, 30, 30, 256)).astype(np.float32))
    s0 = jnp.asarray(rng.normal(size=(2, 120, 120, 32)).astype(np.float32))
    s1 = jnp.asarray(rng.normal(size=(2, 60, 60, 64)).astype(np.float32))
    sparse, dense = pe(None, None, None)
    sparse, dense = jnp.zeros((2, 0, 256)), jnp.broadcast_to(dense, (2, 30, 30, 256))
    all_masks, all_iou, _, _ = md.predict_masks(img, pe.get_dense_pe(), sparse, dense, False, (s0, s1))
    m, i, tok, _ = md(img, pe.get_dense_pe(), sparse, dense, False, False, (s0, s1), training=True)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(all_masks[..., :1]))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(all_iou[:, :1]))
    assert tok.shape == (2, 1, 256)
