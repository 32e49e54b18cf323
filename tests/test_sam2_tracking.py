"""End-to-end SAM 2.1 parity: a three-frame track (frame 0 prompted, frames 1-2 from memory)
through our fixed-slot ``track_step`` against ``SAM2Base.track_step`` of sam2==1.1.0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import max_err, numpy_state_dict, reference_model, to_nhwc, torch

from lmeec_jax.models.config import get_config
from lmeec_jax.models.sam2 import build_model
from tests.sam2_video import init_state, track_step
from lmeec_jax.models.weights import load_state_dict

SIZE = 480


@pytest.fixture(scope="module")
def models():
    ref = reference_model("tiny", SIZE, seed=3)
    # Random weights give negative object scores (every mask -1024); shift the object-score
    # head so that the object is present and the masks carry real logits.
    with torch.no_grad():
        ref.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 30.0
    ours = build_model(get_config("tiny", image_size=SIZE), abstract=True)
    load_state_dict(ours, numpy_state_dict(ref))
    return ref, ours


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)
    # consecutive frames: a slowly changing scene
    return [base + 0.1 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(n)]


def _torch_track(ref, frames, prompt):
    out_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    outs = []
    with torch.inference_mode():
        for t, img in enumerate(frames):
            bo = ref.forward_image(torch.from_numpy(img.transpose(0, 3, 1, 2).copy()))
            _, feats, pos, sizes = ref._prepare_backbone_features(bo)
            kw = dict(point_inputs=None, mask_inputs=None)
            if t == 0:
                if prompt == "points":
                    kw["point_inputs"] = {
                        "point_coords": torch.tensor([[[200.0, 240.0]]]),
                        "point_labels": torch.tensor([[1]], dtype=torch.int32),
                    }
                else:
                    m = np.zeros((1, 1, SIZE, SIZE), np.float32)
                    m[:, :, 150:330, 120:300] = 1
                    kw["mask_inputs"] = torch.from_numpy(m) > 0.5
            o = ref.track_step(frame_idx=t, is_init_cond_frame=(t == 0), current_vision_feats=feats,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, output_dict=out_dict,
                               num_frames=len(frames), **kw)
            out_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = o
            outs.append(o)
    return outs


def _jax_track(model, frames, prompt):
    graphdef, params = nnx.split(model)

    @jax.jit
    def fwd(params, x):
        return nnx.merge(graphdef, params).forward_image(x)

    @jax.jit
    def step(params, s, f, p, t):
        return track_step(nnx.merge(graphdef, params), s, t, f, p, mode="track", num_frames=len(frames))

    state = init_state(model, 1)
    outs = []
    for t, img in enumerate(frames):
        fpn, pos = fwd(params, jnp.asarray(img))
        if t == 0 and prompt == "points":
            state, o = track_step(model, state, 0, fpn, pos, mode="points", num_frames=len(frames),
                                  point_coords=jnp.array([[[200.0, 240.0]]]), point_labels=jnp.array([[1]], jnp.int32),
                                  is_init_cond_frame=True)
        elif t == 0:
            m = np.zeros((1, SIZE, SIZE, 1), np.float32)
            m[:, 150:330, 120:300] = 1
            state, o = track_step(model, state, 0, fpn, pos, mode="mask", num_frames=len(frames),
                                  mask_inputs=jnp.asarray(m), is_init_cond_frame=True)
        else:
            state, o = step(params, state, fpn, pos, t)
        outs.append(o)
    return outs


@pytest.mark.parametrize("prompt", ["points", "mask"])
def test_three_frame_track_matches_reference(models, prompt):
    ref, ours = models
    frames = _frames(3, seed=1 if prompt == "points" else 2)
    t_outs = _torch_track(ref, frames, prompt)
    j_outs = _jax_track(ours, frames, prompt)
    for t, (to, jo) in enumerate(zip(t_outs, j_outs)):
        errs = {
            "pred_masks": max_err(jo["low_res_masks"], to_nhwc(to["pred_masks"])),
            "pred_masks_high_res": max_err(jo["high_res_masks"], to_nhwc(to["pred_masks_high_res"])),
            "obj_ptr": max_err(jo["obj_ptr"], to["obj_ptr"].numpy()),
            "object_score_logits": max_err(jo["object_score_logits"], to["object_score_logits"].numpy()),
            "maskmem_features": max_err(
                np.asarray(jo["maskmem_features"]).reshape(to_nhwc(to["maskmem_features"]).shape),
                to_nhwc(to["maskmem_features"])),
        }
        print(f"[{prompt}] frame {t}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        scale = max(1.0, float(np.abs(to["pred_masks"].numpy()).max()))
        assert errs["pred_masks"] < 2e-4 * scale, errs
        assert errs["pred_masks_high_res"] < 2e-4 * scale, errs
        assert errs["obj_ptr"] < 1e-4 and errs["object_score_logits"] < 1e-4, errs
        # 1e-4 absolute up to features of magnitude 10, relative 1e-5 beyond (after three frames
        # the features reach ~12.8 and float32 error ~1.0e-4 = 8 ulp on some CPUs)
        mscale = max(10.0, float(np.abs(to["maskmem_features"].numpy()).max()))
        assert errs["maskmem_features"] < 1e-5 * mscale, errs
        # the decision the tracker makes must agree exactly
        assert np.array_equal(np.asarray(jo["low_res_masks"]) > 0, to_nhwc(to["pred_masks"]) > 0)
        assert float(to["object_score_logits"]) > 0  # the test exercises real masks
        assert np.ptp(to["pred_masks"].numpy()) > 1.0
