"""The public Predictor and `eval track`: your own two videos through the same tracker as
`eval predict`.

* ``Predictor.track`` on a synthetic take given as two camera image folders plus source PNG
  masks yields the same masks as ``eval predict`` on that take (the low-res logits
  upsampled to 480x480 the same way), and target-resolution masks consistent with them;
* ``eval track`` on two mp4 files made from a synthetic take with an index PNG of two
  objects writes per-object PNGs at the target resolution, scores.json and an overlay;
* one-line errors (exit 2) for bad input, and for a plain SAM 2.1 model.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval.__main__ import main as eval_main
from lmeec_jax import Predictor
from lmeec_jax.data.egoexo import ANNOTATION_FILE, ViewMasks, list_take_videos, load_annotation
from lmeec_jax.data.rle import decode_rle
from lmeec_jax.data.synthetic import make_synthetic_split
from lmeec_jax.inference.split import group_videos
from lmeec_jax.models.checkpoint import save_model
from lmeec_jax.models.config import get_config
from lmeec_jax.models.sam2 import build_model

N_FRAMES = 7
CHUNK = 4  # 7 frames -> a full chunk and a padded one


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    split = str(root / "split")
    (take,) = make_synthetic_split(split, 1, seed=5, n_frames=N_FRAMES, n_exo=1, workers=1, raw_masks=False)
    model = build_model(get_config("lmeec_hiera_nano"), seed=0)
    b = model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    b.set_value(b.get_value() + 5.0)  # random init leaves object scores near 0
    ckpt = str(root / "ckpt")
    save_model(model, model.cfg, ckpt)
    return dict(root=root, split=split, take=take, model=model, ckpt=ckpt)


def _export(env, batch, out):
    """The video's frames as two image folders and its source masks as index PNGs."""
    take_dir = os.path.join(env["split"], batch.take)
    ann = load_annotation(take_dir, batch.take)
    for d in ("src", "tgt", "masks"):
        os.makedirs(out / d, exist_ok=True)
    views = [ViewMasks(ann, batch.take, r.obj, batch.src_cam, path=os.path.join(take_dir, ANNOTATION_FILE))
             for r in batch.records]
    for f in batch.frames:
        shutil.copy(os.path.join(take_dir, batch.src_cam, f + ".jpg"), out / "src" / f"{f}.jpg")
        shutil.copy(os.path.join(take_dir, batch.tgt_cam, f + ".jpg"), out / "tgt" / f"{f}.jpg")
        idx = None
        for k, v in enumerate(views, start=1):
            m = v.get(f)
            if m is None:
                continue
            idx = np.zeros(m.shape, np.uint8) if idx is None else idx
            idx[m.astype(bool)] = k
        if idx is not None:
            Image.fromarray(idx).save(out / "masks" / f"{f}.png")
    return out


def test_track_equals_eval_predict(env, tmp_path):
    split, take = env["split"], env["take"]
    recs = list_take_videos(split, take, "ego2exo")
    batch = max(group_videos(recs, 8), key=lambda b: len(b.records))  # objects sharing a frame list
    pred_dir = tmp_path / "pred"
    rc = eval_main(["predict", "--checkpoint", env["ckpt"], "--data", split, "--direction", "ego2exo",
                    "--out", str(pred_dir), "--chunk", str(CHUNK), "--takes", take, "--no-progress",
                    "--frames", "reference"])  # the frames exported below: source JPEGs ∩ target GT keys
    assert rc == 0
    folders = _export(env, batch, tmp_path / "mine")
    predictor = Predictor(env["model"], chunk=CHUNK)
    frames = list(predictor.track(folders / "src", folders / "tgt", folders / "masks"))
    assert [f.name for f in frames] == list(batch.frames)
    assert frames[0].object_ids == tuple(range(1, len(batch.records) + 1))
    compared = 0
    for fr in frames:
        sq = predictor.transforms.masks(fr.low_res_logits, (480, 480))
        with Image.open(folders / "tgt" / f"{fr.name}.jpg") as im:
            assert fr.masks.shape == (len(batch.records), im.height, im.width)
        for j, rec in enumerate(batch.records):
            path = pred_dir / take / rec.pair / rec.obj / f"{fr.name}.json"
            assert fr.processed[j] == path.exists()
            if not path.exists():
                assert not fr.masks[j].any() and np.isnan(fr.object_scores[j])
                continue
            want = decode_rle(json.loads(path.read_text())).astype(bool)
            np.testing.assert_array_equal(sq[j], want)
            compared += 1
            # target-resolution masks: the same logits upsampled straight to the frame's size
            np.testing.assert_array_equal(fr.masks[j], predictor.transforms.masks(fr.low_res_logits[j],
                                                                                  fr.masks.shape[1:]))
            assert fr.visible[j] == (fr.object_scores[j] > 0)
    n_files = sum(len(list((pred_dir / take / r.pair / r.obj).glob("*.json"))) for r in batch.records)
    assert compared == n_files >= 2


def _mp4(frames_dir, path):
    import av

    names = sorted(os.listdir(frames_dir), key=lambda n: int(os.path.splitext(n)[0]))
    with av.open(str(path), "w", format="mp4") as c:
        with Image.open(os.path.join(frames_dir, names[0])) as im:
            w, h = im.size
        s = c.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for n in names:
            with Image.open(os.path.join(frames_dir, n)) as im:
                for pkt in s.encode(av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB")), format="rgb24")):
                    c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return names


def test_eval_track_two_mp4_files_index_png(env, tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (the `video` extra) reads mp4 files")
    split, take = env["split"], env["take"]
    recs = list_take_videos(split, take, "ego2exo")
    batch = max(group_videos(recs, 8), key=lambda b: len(b.records))
    folders = _export(env, batch, tmp_path / "mine")
    names = _mp4(folders / "src", tmp_path / "ego.mp4")
    _mp4(folders / "tgt", tmp_path / "exo.mp4")
    # an index PNG of two objects per video frame, named like the decoded frames (00000, 00001, ...)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, n in enumerate(names):
        stem = os.path.splitext(n)[0]
        p = folders / "masks" / f"{stem}.png"
        if p.exists():
            a = np.asarray(Image.open(p))
            Image.fromarray(np.where(a <= 2, a, 0).astype(np.uint8)).save(masks / f"{i:05d}.png")
    out = tmp_path / "out"
    rc = eval_main(["track", "--checkpoint", env["ckpt"], "--src", str(tmp_path / "ego.mp4"),
                    "--tgt", str(tmp_path / "exo.mp4"), "--src-masks", str(masks), "--out", str(out),
                    "--chunk", str(CHUNK), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    ids = scores["objects"]
    assert ids == [1, 2][:len(ids)] and len(ids) == min(2, len(batch.records))
    with Image.open(folders / "tgt" / names[0]) as im:
        tgt_size = im.size
    for k in ids:
        pngs = sorted(os.listdir(out / str(k)))
        assert len(pngs) == len(names)
        for f in pngs:
            with Image.open(out / str(k) / f) as im:
                assert im.size == tgt_size and im.mode == "L"
                assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
        assert len(scores["scores"][str(k)]) == len(names)
    ov = [f for f in os.listdir(out) if f.startswith("overlay.")]
    assert ov == ["overlay.mp4"]
    import av

    with av.open(str(out / ov[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == len(names)
    assert frames[0].shape[0] == 270 and frames[0].shape[1] > 2 * 270  # source | target side by side


@pytest.mark.parametrize("case", ["count", "size", "empty", "unreadable", "sam21"])
def test_eval_track_one_line_errors(env, tmp_path, capsys, case):
    split, take = env["split"], env["take"]
    batch = max(group_videos(list_take_videos(split, take, "ego2exo"), 8), key=lambda b: len(b.frames))
    f = _export(env, batch, tmp_path / "mine")
    ckpt = env["ckpt"]
    if case == "count":
        shutil.copy(f / "tgt" / f"{batch.frames[0]}.jpg", f / "tgt" / "zz_extra.jpg")
    elif case == "size":
        p = next((f / "masks").iterdir())
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(p)
    elif case == "empty":
        for p in (f / "masks").iterdir():
            Image.fromarray(np.zeros(np.asarray(Image.open(p)).shape, np.uint8)).save(p)
    elif case == "unreadable":
        (f / "src" / f"{batch.frames[-1]}.jpg").write_bytes(b"not a jpeg")
    elif case == "sam21":
        ckpt = "random:sam2.1_hiera_t"
    rc = eval_main(["track", "--checkpoint", ckpt, "--src", str(f / "src"), "--tgt", str(f / "tgt"),
                    "--src-masks", str(f / "masks"), "--out", str(tmp_path / "out"), "--chunk", str(CHUNK),
                    "--no-progress", "--no-overlay"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    want = {"count": "pair up one to one", "size": "differs from its frame", "empty": "empty",
            "unreadable": "unreadable image", "sam21": "no MV_MoE weights"}[case]
    assert want in err[0], err[0]
    if case == "sam21":
        assert "python -m convert" in err[0] and "--model lmeec_hiera_b+" in err[0]


def test_eval_predict_plain_sam21_is_one_line_exit_2(env, tmp_path, capsys):
    rc = eval_main(["predict", "--checkpoint", "random:sam2.1_hiera_t", "--data", env["split"], "--direction",
                    "ego2exo", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no MV_MoE weights" in err[0] and "python -m convert" in err[0]
