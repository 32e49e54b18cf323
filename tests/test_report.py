"""`python -m eval report`: files, headline = `eval score`, links resolve, failed videos listed.

One synthetic split (2 takes x 3 frames, aria + 1 exo camera; one target JPEG of the last
take truncated so that its videos fail) and one `eval predict` run with the nano model's
random weights; the report is built from it under both protocols. exo->ego is checked on
a prediction folder made from the GT itself (no model run, no predict report).
"""

import json
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from eval.__main__ import main as eval_main
from lmeec_jax.data.rle import decode_rle, encode_mask
from lmeec_jax.data.synthetic import make_synthetic_split
from lmeec_jax.evaluation.gt import build_gt, write_gt
from lmeec_jax.evaluation.metrics import official_eval_shape, reshape_nopad

PLOTS = ("iou_hist.png", "iou_vs_size.png", "iou_vs_position.png", "visibility_confusion.png")
KEYS = ("iou", "contour_accuracy", "location_error", "balanced_accuracy", "n_samples")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    split = str(root / "split")
    takes = make_synthetic_split(split, 2, seed=5, n_frames=3, n_exo=1, workers=1)
    bad = os.path.join(split, takes[-1], "cam01", "60.jpg")
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    gt = str(root / "gt.json")
    write_gt(build_gt(split), gt)
    pred = str(root / "pred")
    rc = eval_main(["predict", "--checkpoint", "random:lmeec_hiera_nano", "--data", split, "--direction", "ego2exo",
                    "--out", pred, "--no-progress", "--chunk", "3", "--batch-buckets", "8"])
    assert rc == 1  # the corrupt take's videos failed
    return dict(root=root, split=split, takes=takes, gt=gt, pred=pred)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("href", "src") and v]


def _check_links(out):
    """Every href/src of every page is a relative link to a file inside ``out``."""
    n = 0
    for dp, _, fs in os.walk(out):
        for fn in fs:
            if not fn.endswith(".html"):
                continue
            p = _Links()
            p.feed(open(os.path.join(dp, fn)).read())
            for ref in p.refs:
                if ref.startswith("#"):
                    continue
                assert "://" not in ref and not ref.startswith("/"), ref
                target = os.path.normpath(os.path.join(dp, ref.split("#")[0]))
                assert os.path.commonpath([target, os.path.abspath(out)]) == os.path.abspath(out), ref
                assert os.path.isfile(target), f"{fn}: {ref}"
                n += 1
    return n


def _score(gt, pred, direction, protocol, tmp):
    js = os.path.join(tmp, f"score_{protocol}_{direction}.json")
    eval_main(["score", "--gt", gt, "--pred", pred, "--direction", direction, "--protocol", protocol, "--json", js])
    return json.load(open(js))


@pytest.mark.parametrize("protocol", ["official", "lmeec"])
def test_report(env, protocol, capsys):
    out = str(env["root"] / f"report_{protocol}")
    rc = eval_main(["report", "--data", env["split"], "--pred", env["pred"], "--gt", env["gt"],
                    "--direction", "ego2exo", "--out", out, "--protocol", protocol, "--worst", "2"])
    assert rc == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    pred = env["pred"] if protocol == "lmeec" else os.path.join(env["pred"], "predictions_ego2exo.json")
    sc = _score(env["gt"], pred, "ego2exo", protocol, str(env["root"]))
    for k in KEYS:  # the headline is the scorer's, and the per-video samples pool to it
        assert rep["headline"][k] == pytest.approx(sc[k], abs=1e-12), k
        assert rep["pooled"][k] == pytest.approx(sc[k], abs=1e-9), k
    assert rep["consistent"]
    printed = capsys.readouterr().out
    assert f"IoU {100 * sc['iou']:.2f}" in printed

    for fn in ("index.html", "report.json", *(os.path.join("plots", p) for p in PLOTS)):
        assert os.path.getsize(os.path.join(out, fn)) > 0, fn
    vids = rep["per_video"]
    assert len(vids) == len({v["key"] for v in vids}) and all(os.path.isfile(os.path.join(out, v["page"])) for v in vids)
    assert len(rep["gifs"]) == 2
    from PIL import Image

    gifs = [f for f in os.listdir(os.path.join(out, "videos")) if f.endswith(".gif")]
    assert len(gifs) == 2 and Image.open(os.path.join(out, "videos", gifs[0])).n_frames >= 1
    assert _check_links(out) >= len(vids) + len(PLOTS) + 2
    html = open(os.path.join(out, "index.html")).read()
    assert "http://" not in html and "https://" not in html
    for v in vids:
        assert v["page"] in html
    # the failed videos: listed with the reason, marked in the table
    failed = rep["failed"]
    assert failed and all(e["take"] == env["takes"][-1] for e in failed)
    for e in failed:
        assert e["video"] in html
    assert "corrupt" in html and 'class="l bad"' in html
    if protocol == "official":  # failed videos are in the submission as empty masks: scored, marked failed
        assert {v["key"] for v in vids if v["failed"]} == {e["video"] for e in failed}


def test_report_exo2ego_from_gt(env):
    """A submission made from the GT itself: IoU 100, every link resolves, no predict report needed."""
    gt = json.load(open(env["gt"]))
    results = {}
    for take, g in gt["annotations"].items():
        masks = {}
        for obj, cams in g["masks"].items():
            masks[obj] = {}
            egos = [c for c in cams if "aria" in c]
            for ego, exo in ((e, x) for e in egos[:1] for x in cams if x != e):
                shape = official_eval_shape(*decode_rle(next(iter(cams[ego].values()))).shape)
                entries = {}
                for f in cams[exo]:
                    m = reshape_nopad(decode_rle(cams[ego][f])) if f in cams[ego] else np.zeros(shape, np.uint8)
                    entries[f] = {"pred_mask": encode_mask(m.astype(np.uint8)), "confidence": float(f in cams[ego])}
                masks[obj][f"{exo}_{ego}"] = entries
        results[take] = {"masks": masks, "subsample_idx": []}
    pred = env["root"] / "pred_x2e"
    pred.mkdir()
    (pred / "predictions_exo2ego.json").write_text(json.dumps({"exo-ego": {"version": "x", "challenge": "c",
                                                                          "results": results}}))
    out = str(env["root"] / "report_x2e")
    assert eval_main(["report", "--data", env["split"], "--pred", str(pred), "--gt", env["gt"],
                      "--direction", "exo2ego", "--out", out, "--worst", "1"]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    sc = _score(env["gt"], str(pred / "predictions_exo2ego.json"), "exo2ego", "official", str(env["root"]))
    assert rep["headline"]["iou"] == pytest.approx(sc["iou"]) == pytest.approx(1.0)
    assert rep["consistent"] and rep["failed"] == []
    assert all(" &rarr; aria" in open(os.path.join(out, v["page"])).read() for v in rep["per_video"])
    _check_links(out)
    shutil.rmtree(out)
