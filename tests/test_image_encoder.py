"""Parity of the SAM 2.1 image encoder (Hiera trunk + FPN neck) with sam2==1.1.0.

Tolerance: activations are O(1)-O(10) after random init (see reference.randomize_) and
pass through 12-24 blocks; in float32 with "highest" matmul precision the two stacks
differ only by summation order, which stays well under 1e-3 absolute (measured errors
are printed, run with -s). The sine position encodings are exact constants (1e-5).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from tests.reference import CONFIGS, max_err, numpy_state_dict, reference_model, to_nchw, to_nhwc, torch

from lmeec_jax.models.fpn import FpnNeck, ImageEncoder
from lmeec_jax.models.hiera import Hiera, max_pool2d, window_partition, window_unpartition
from lmeec_jax.models.weights import load_state_dict, to_state_dict

import sam2

FEAT_TOL = 1e-3
POS_TOL = 1e-5


def _yaml_image_encoder_cfg(size: str) -> dict:
    path = os.path.join(os.path.dirname(sam2.__file__), CONFIGS[size])
    with open(path) as f:
        return yaml.safe_load(f)["model"]["image_encoder"]


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build_image_encoder(size: str, **trunk_overrides) -> ImageEncoder:
    """The NNX image encoder built from the sam2 yaml's arguments (as the lead's config will)."""
    cfg = _yaml_image_encoder_cfg(size)
    rngs = nnx.Rngs(0)
    trunk = Hiera(**{**_strip(cfg["trunk"]), **trunk_overrides}, rngs=rngs)
    neck = FpnNeck(**_strip(cfg["neck"]), rngs=rngs)
    return ImageEncoder(trunk, neck, scalp=cfg.get("scalp", 0), rngs=rngs)


def loaded_image_encoder(size: str, ref) -> ImageEncoder:
    """Built abstractly (eager random init of ~100 layers costs ~50 s on CPU) and then
    filled strictly from the torch state dict."""
    model = nnx.eval_shape(lambda: build_image_encoder(size))
    load_state_dict(model, numpy_state_dict(ref))
    return model


def _run_parity(size: str, image_size: int, batch: int):
    ref = reference_model(size, image_size).image_encoder
    model = loaded_image_encoder(size, ref)

    rng = np.random.default_rng(image_size + batch)
    x = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    with torch.inference_mode():
        t_out = ref(to_nchw(x))
    j_out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))

    errs = {}
    assert len(j_out["backbone_fpn"]) == len(t_out["backbone_fpn"])
    assert len(j_out["vision_pos_enc"]) == len(t_out["vision_pos_enc"])
    for lvl, (a, b) in enumerate(zip(j_out["backbone_fpn"], t_out["backbone_fpn"])):
        errs[f"fpn{lvl}"] = max_err(a, to_nhwc(b))
    for lvl, (a, b) in enumerate(zip(j_out["vision_pos_enc"], t_out["vision_pos_enc"])):
        errs[f"pos{lvl}"] = max_err(a, to_nhwc(b))
    errs["vision_features"] = max_err(j_out["vision_features"], to_nhwc(t_out["vision_features"]))
    scale = max(float(np.abs(to_nhwc(b)).max()) for b in t_out["backbone_fpn"])
    print(f"\n[image_encoder {size} {image_size} b{batch}] max|ref|={scale:.2f} "
          + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v < (POS_TOL if k.startswith("pos") else FEAT_TOL), (k, v)
    return errs


# ------------------------------------------------------------------ small unit checks


def test_state_dict_names_roundtrip():
    ref = reference_model("tiny", 480).image_encoder
    sd = numpy_state_dict(ref)
    model = loaded_image_encoder("tiny", ref)
    back = to_state_dict(model)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_window_partition_roundtrip_and_pool():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 30, 30, 5)), jnp.float32)
    w, pad_hw = window_partition(x, 14)
    assert w.shape == (2 * 9, 14, 14, 5) and pad_hw == (42, 42)
    np.testing.assert_array_equal(window_unpartition(w, 14, pad_hw, (30, 30)), x)
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    for k in (2, 3):
        ref = torch.nn.functional.max_pool2d(xt, k, k).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(max_pool2d(x, (k, k), (k, k)), ref)


def test_chunked_attention_matches_plain():
    """The CPU query-chunked path (long global attention) equals plain softmax attention,
    including a query count that is not a multiple of the chunk."""
    from lmeec_jax.models import hiera

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, 8)), jnp.float32) for n in (1000, 4500, 4500))
    assert q.shape[1] * k.shape[1] >= hiera._CHUNK_MIN_LOGITS
    err = max_err(jax.jit(hiera._attention)(q, k, v), jax.nn.dot_product_attention(q, k, v))
    print(f"\n[chunked attention] err={err:.2e}")
    assert err < 1e-5


def test_pos_embed_bicubic():
    """Background position embedding: torch bicubic (a=-0.75) vs jax 'bicubic-pytorch'."""
    ref = reference_model("base_plus", 480).image_encoder.trunk
    model = nnx.eval_shape(lambda: build_image_encoder("base_plus").trunk)
    load_state_dict(model, numpy_state_dict(ref))
    for hw in ((120, 120), (256, 256), (16, 16)):
        with torch.no_grad():
            t = ref._get_pos_embed(hw).numpy()
        err = max_err(model._get_pos_embed(hw), t)
        print(f"\n[pos_embed bicubic {hw}] err={err:.2e}")
        assert err < 1e-5


def test_drop_path_train_mode():
    """drop_path is off by default (eval), random per sample after .train(), off after .eval()."""
    model = Hiera(embed_dim=8, num_heads=1, drop_path_rate=0.5, q_pool=1, stages=(1, 1), window_spec=(4, 2),
                  global_att_blocks=(), window_pos_embed_bkg_spatial_size=(4, 4), rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, x: m(x)[-1])
    x = jnp.ones((8, 16, 16, 3), jnp.float32)
    y0 = fwd(model, x)
    model.train()
    y1 = fwd(model, x)
    y2 = fwd(model, x)
    model.eval()
    y3 = fwd(model, x)
    np.testing.assert_array_equal(y0, y3)
    assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
    # identical inputs: samples differ only through their drop masks
    assert any(not np.allclose(y1[0], y1[i]) for i in range(1, x.shape[0]))


# ------------------------------------------------------------------ full parity


@pytest.mark.parametrize(
    "size,image_size,batch",
    [("tiny", 480, 2), ("tiny", 1024, 1), ("base_plus", 480, 1)],
)
def test_image_encoder_parity(size, image_size, batch):
    _run_parity(size, image_size, batch)


@pytest.mark.slow
def test_image_encoder_parity_base_plus_1024():
    _run_parity("base_plus", 1024, 1)
