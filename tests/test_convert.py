"""`python -m convert`: round trip, strictness, and clear errors."""

import numpy as np
import pytest

from tests.reference import numpy_state_dict, reference_model, torch

from convert.__main__ import main as convert_main
from convert.infer import MV_MOE_KEYS, infer_model_name
from lmeec_jax.models.checkpoint import load_model
from lmeec_jax.models.weights import to_state_dict


@pytest.fixture(scope="module")
def tiny_sd():
    return reference_model("tiny", 1024).state_dict()


def _save(tmp_path, obj, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_round_trip_and_infer(tmp_path, tiny_sd, capsys):
    src = _save(tmp_path, {"model": tiny_sd})
    out = tmp_path / "out"
    assert convert_main(["--src", str(src), "--out", str(out)]) == 0
    model, cfg = load_model(out)
    assert cfg.name == "sam2.1_hiera_t" and cfg.image_size == 1024
    back = to_state_dict(model)
    assert set(back) == set(tiny_sd)
    worst = max(float(np.abs(back[k] - v.numpy()).max()) for k, v in tiny_sd.items())
    assert worst == 0.0


def test_module_prefix_and_bare_state_dict(tmp_path, tiny_sd):
    src = _save(tmp_path, {"module." + k: v for k, v in tiny_sd.items()})
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "o"), "--image-size", "480"]) == 0
    _, cfg = load_model(tmp_path / "o")
    assert cfg.image_size == 480


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_strict_errors_name_the_key(tmp_path, tiny_sd, capsys, defect):
    sd = dict(tiny_sd)
    key = "sam_mask_decoder.iou_prediction_head.layers.1.weight"
    if defect == "missing":
        del sd[key]
    elif defect == "extra":
        key = "sam_mask_decoder.some_new_head.weight"
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(7, 7)
    src = _save(tmp_path, {"model": sd})
    out = tmp_path / "o"
    assert convert_main(["--src", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert key in err
    assert {"missing": "missing key", "extra": "unexpected key", "shape": "wrong shape"}[defect] in err
    assert not (out / "config.json").exists()


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("this is not a checkpoint\n")
    assert convert_main(["--src", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.pt" in err and "Traceback" not in err
    assert convert_main(["--src", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_infer_sizes():
    for size, name in [("tiny", "sam2.1_hiera_t"), ("small", "sam2.1_hiera_s"), ("base_plus", "sam2.1_hiera_b+")]:
        shapes = {k: tuple(v.shape) for k, v in reference_model(size, 1024).state_dict().items()}
        assert infer_model_name(shapes) == name
        shapes.update({k: (1,) for k in MV_MOE_KEYS})
        if size == "base_plus":
            assert infer_model_name(shapes) == "lmeec_hiera_b+"
        else:
            with pytest.raises(ValueError, match="base_plus"):
                infer_model_name(shapes)


def test_sam21_b_plus_to_lmeec_initialises_mv_moe(tmp_path, capsys):
    sd = reference_model("base_plus", 1024).state_dict()
    src = _save(tmp_path, {"model": sd}, "sam2.1_hiera_base_plus.pt")
    out = tmp_path / "lmeec"
    assert convert_main(["--src", str(src), "--out", str(out), "--model", "lmeec_hiera_b+"]) == 0
    log = capsys.readouterr().out
    assert "12 MV_MoE tensors" in log
    for k in MV_MOE_KEYS:
        assert k in log
    model, cfg = load_model(out)
    assert cfg.mv_moe and cfg.image_size == 480
    back = to_state_dict(model)
    assert all(np.isfinite(back[k]).all() for k in MV_MOE_KEYS)
    # a full LM-EEC checkpoint (with MV_MoE) converts strictly, inferred without --model
    full = {"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()}, "epoch": 3}
    src2 = _save(tmp_path, full, "checkpoint.pt")
    assert convert_main(["--src", str(src2), "--out", str(tmp_path / "lm2")]) == 0
    _, cfg2 = load_model(tmp_path / "lm2")
    assert cfg2.name == "lmeec_hiera_b+"
