"""`python -m eval predict`: layout, official file, equality with a direct scan, bad input.

One small synthetic split (2 takes x 5 frames, aria + 1 exo camera) and the nano model with
random weights (object-score bias raised so that masks are not empty), saved as a model
directory so the CLI's checkpoint loading is exercised (later CLI runs get the same model
without reloading it). Every batch is padded to 2 objects (``--batch-buckets 2``), so the
model step compiles once for (chunk 3, batch 2) and once for the direct reference scan
(whole video, batch 1).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from pycocotools import mask as mask_utils

from eval.__main__ import main as eval_main
from lmeec_jax.inference import predictor as predictor_module
from lmeec_jax.inference import split as P
from lmeec_jax.models.checkpoint import save_model
from lmeec_jax.models.config import get_config
from lmeec_jax.data import egoexo
from lmeec_jax.evaluation.gt import build_gt, write_gt
from lmeec_jax.data.synthetic import make_synthetic_split
from lmeec_jax.evaluation.metrics import score_lmeec, score_official
from lmeec_jax.tracking import video as lmeec
from lmeec_jax.inference.transforms import upsample_logits
from lmeec_jax.models.sam2 import build_model

N_FRAMES = 5
CHUNK = 3  # 5 frames -> a full chunk and a padded one
MAX_OBJ = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    split = str(root / "split")
    takes = make_synthetic_split(split, 2, seed=3, n_frames=N_FRAMES, n_exo=1, workers=1)
    model = build_model(get_config("lmeec_hiera_nano"), seed=0)
    b = model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    b.set_value(b.get_value() + 5.0)  # random init leaves object scores near 0
    ckpt = str(root / "ckpt")
    save_model(model, model.cfg, ckpt)
    gt = str(root / "gt.json")
    write_gt(build_gt(split), gt)
    return dict(root=root, split=split, takes=takes, model=model, ckpt=ckpt, gt=gt)


def _predict(env, out, direction, split=None, reload=False):
    argv = ["predict", "--checkpoint", env["ckpt"], "--data", split or env["split"], "--direction", direction,
            "--out", str(out), "--chunk", str(CHUNK), "--max-objects", str(MAX_OBJ), "--batch-buckets", str(MAX_OBJ),
            "--no-progress"]
    if reload:
        return eval_main(argv)
    with pytest.MonkeyPatch.context() as mp:  # same weights as the checkpoint, without loading it again
        mp.setattr(predictor_module, "load_model_spec", lambda ckpt, seed=0: (env["model"], env["model"].cfg))
        return eval_main(argv)


@pytest.fixture(scope="module")
def e2x(env):
    out = env["root"] / "out_e2x"
    rc = _predict(env, out, "ego2exo", reload=True)
    return rc, str(out)


@pytest.fixture(scope="module")
def x2e(env, e2x):  # after e2x: reuses its compiled shapes
    out = env["root"] / "out_x2e"
    rc = _predict(env, out, "exo2ego")
    return rc, str(out)


def _expected_frames(env, rec):
    """Frames LM-EEC predicts: source annotation present and non-empty at full resolution."""
    ann = egoexo.load_annotation(os.path.join(env["split"], rec.take))
    src = ann["masks"][rec.obj].get(rec.src_cam) or {}
    return {f for f in rec.frames if f in src and mask_utils.decode(
        {"size": src[f]["size"], "counts": src[f]["counts"].encode()}).any()}


# ----------------------------------------------------------------------------- unit


def test_buckets_and_grouping():
    assert [P.bucket_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [P.bucket_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [P.bucket_size(n, 4, [4]) for n in range(1, 5)] == [4, 4, 4, 4]
    assert [P.bucket_size(n, 3, [2, 8]) for n in range(1, 4)] == [2, 2, 8]
    with pytest.raises(ValueError):
        P.bucket_size(3, 2)
    R = lambda obj, frames, tgt="cam01": egoexo.VideoRecord("t", "aria01", tgt, obj, frames, "ego2exo")
    recs = [R("a", ("0", "30")), R("b", ("0", "30")), R("c", ("0",)), R("d", ("0", "30")), R("e", ("0", "30"), "cam02")]
    groups = P.group_videos(recs, max_objects=2)
    assert [[r.obj for r in g.records] for g in groups] == [["a", "b"], ["d"], ["c"], ["e"]]
    # every object of a camera pair in one batch, whatever its frame list (union of the lists)
    pairs = P.group_pairs(recs, max_objects=8, exact=False)
    assert [([r.obj for r in g.records], g.frames) for g in pairs] == [(["a", "b", "c", "d"], ("0", "30")),
                                                                       (["e"], ("0", "30"))]
    # exact (default): every video keeps the batch size of its frame-list group (same bits)
    pairs = P.group_pairs(recs, max_objects=2)
    assert [[r.obj for r in g.records] for g in pairs] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [[r.obj for r in g.records] for g in P.group_pairs(recs, 2, buckets=[2])] == [["a", "b"], ["c", "d"], ["e"]]
    # pad=False (CPU): a pair's objects cut into bucket sizes, largest first, never padded
    six = [R(o, ("0", "30")) for o in "abcdef"] + [R("g", ("0",), "cam02")]
    cut = lambda **kw: [[r.obj for r in g.records] for g in P.group_pairs(six, 8, exact=False, pad=False, **kw)]
    assert cut() == [["a", "b", "c", "d"], ["e", "f"], ["g"]]
    assert cut(buckets=[3, 8]) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]  # 1 < smallest bucket: one batch
    assert [len(g.records) for g in P.group_pairs(six, 8, exact=False)] == [6, 1]  # pad=True: one padded batch


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("direction", ["ego2exo", "exo2ego"])
def test_layout_and_json(env, e2x, x2e, direction):
    rc, out = e2x if direction == "ego2exo" else x2e
    assert rc == 0
    recs = egoexo.list_videos(env["split"], direction, frames="official")  # the default chain's frames
    assert recs
    n_files = n_nonempty = 0
    for rec in recs:
        vdir = os.path.join(out, rec.take, f"{rec.src_cam}__{rec.tgt_cam}", rec.obj)
        assert os.path.isdir(vdir), vdir  # created even if every frame is skipped (as the reference)
        files = {f[:-5] for f in os.listdir(vdir)}
        assert files == _expected_frames(env, rec), rec.key  # skipped frames: no file
        for f in files:
            with open(os.path.join(vdir, f + ".json")) as fp:
                d = json.load(fp)
            assert list(d) == ["size", "counts"] and d["size"] == [480, 480] and isinstance(d["counts"], str)
            m = mask_utils.decode({"size": d["size"], "counts": d["counts"].encode()})
            assert m.shape == (480, 480) and set(np.unique(m)) <= {0, 1}
            n_files += 1
            n_nonempty += bool(m.any())
    assert n_files > 10 and n_nonempty > 0
    rep = json.load(open(os.path.join(out, f"predict_report_{direction}.json")))
    assert rep["summary"]["ok"] and rep["summary"]["videos_written"] == len(recs)
    assert rep["summary"]["frames_predicted"] == n_files


@pytest.mark.parametrize("direction", ["ego2exo", "exo2ego"])
def test_official_file_validates(env, e2x, x2e, direction):
    _, out = e2x if direction == "ego2exo" else x2e
    path = os.path.join(out, f"predictions_{direction}.json")
    rep = score_official(env["gt"], path, direction)
    assert rep.issues == [], [str(i) for i in rep.issues[:5]]
    assert rep.metrics is not None and rep.metrics["n_samples"] > 0 and rep.metrics["n_gt_visible"] > 0
    sub = json.load(open(path))
    task = "ego-exo" if direction == "ego2exo" else "exo-ego"
    assert list(sub) == [task] and set(sub[task]) == {"version", "challenge", "results"}
    shape = [270, 480] if direction == "ego2exo" else [480, 480]
    for take in sub[task]["results"].values():
        for pairs in take["masks"].values():
            for frames in pairs.values():
                for e in frames.values():
                    assert e["pred_mask"]["size"] == shape and 0.0 <= e["confidence"] <= 1.0
    # LM-EEC's own protocol reads the per-frame directory
    rep2 = score_lmeec(env["gt"], out, direction)
    assert not rep2.errors, [str(i) for i in rep2.errors[:5]]


# ----------------------------------------------------------------------------- equality


def test_equals_direct_scan(env, e2x):
    """Chunking (3 + padded 2) and batching (2 objects, or 1 object + a padding object,
    vs a batch of 1) and the loader change nothing: per-frame masks and confidences equal
    one direct ``scan_chunk`` over the whole video, fed by the data module's own loader."""
    _, out = e2x
    model = env["model"]
    recs = egoexo.list_videos(env["split"], "ego2exo", frames="official")
    groups = P.group_videos(recs, MAX_OBJ)
    picked = [g.records[1] for g in groups if len(g.records) == 2][:1] + \
             [g.records[0] for g in groups if len(g.records) == 1][:1]
    assert len(picked) == 2, "the synthetic split should give a batch of 2 and a batch of 1 (padded to 2)"
    official = json.load(open(os.path.join(out, "predictions_ego2exo.json")))["ego-exo"]["results"]
    graphdef, params = nnx.split(model)

    @jax.jit
    def direct(params, s, g, m, p, num_frames):
        mdl = nnx.merge(graphdef, params)
        return lmeec.scan_chunk(mdl, lmeec.init_state(mdl, 1), s, g, m, p, 0, num_frames)

    for rec in picked:
        v = egoexo.load_video(env["split"], rec, image_size=model.cfg.image_size)
        T = len(rec.frames)
        masks = v["src_masks"][:, None].astype(np.float32)
        _, o = direct(params, v["src_images"], v["tgt_images"], masks, v["src_valid"][:, None], T)
        low = np.asarray(o.low_res_logits[:, 0])
        up = np.asarray(upsample_logits(jnp.asarray(low), (480, 480)))
        up_off = np.asarray(upsample_logits(jnp.asarray(low), (270, 480)))
        conf = np.asarray(jax.nn.sigmoid(o.object_score_logits[:, 0]))
        vdir = os.path.join(out, rec.take, rec.pair, rec.obj)
        pair = official[rec.take]["masks"][rec.obj][f"{rec.src_cam}_{rec.tgt_cam}"]
        n_cmp = 0
        for t, f in enumerate(rec.frames):
            path = os.path.join(vdir, f + ".json")
            assert os.path.isfile(path) == bool(v["src_valid"][t]), (rec.key, f)
            if not v["src_valid"][t]:
                continue
            d = json.load(open(path))
            m = mask_utils.decode({"size": d["size"], "counts": d["counts"].encode()}).astype(bool)
            sure = np.abs(up[t]) > 1e-4  # pixels whose sign cannot flip by rounding
            assert np.array_equal(m[sure], up[t][sure] > 0), (rec.key, f)
            e = pair[f]
            mo = mask_utils.decode({"size": e["pred_mask"]["size"], "counts": e["pred_mask"]["counts"].encode()})
            sure = np.abs(up_off[t]) > 1e-4
            assert np.array_equal(mo.astype(bool)[sure], up_off[t][sure] > 0)
            assert abs(e["confidence"] - conf[t]) < 1e-5
            n_cmp += 1
        assert n_cmp >= 2 and np.ptp(low[v["src_valid"]]) > 0.1


def _tree(out):
    files = {}
    for dp, dns, fns in os.walk(out):
        dns[:] = [d for d in dns if d != ".done"]
        for fn in fns:
            if not fn.startswith("predict_report"):
                p = os.path.join(dp, fn)
                files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


def test_both_directions_in_one_run(env, e2x, x2e):
    """``--direction both``: the files of the two runs, byte for byte (features shared)."""
    out = env["root"] / "out_both"
    rc = _predict(env, out, "both")
    assert rc == 0
    both, sep = _tree(str(out)), {**_tree(e2x[1]), **_tree(x2e[1])}
    assert len(both) == len(sep) > 20
    assert both == sep
    for d in ("ego2exo", "exo2ego"):
        rep = json.load(open(os.path.join(out, f"predict_report_{d}.json")))
        assert rep["summary"]["ok"] and rep["run"]["direction"] == d


def test_pair_batch_equals_videos_alone(env):
    """Objects with different frame lists in one batch (per-object indices, shared features)
    give the bits of each video run alone (encoder inside its chunks, its own list)."""
    model = env["model"]
    runner = P.ChunkRunner(model)
    take = env["takes"][0]
    ann = egoexo.load_annotation(os.path.join(env["split"], take), take)
    recs = egoexo.list_take_videos(env["split"], take, "ego2exo", frames="official")
    # two objects, frame lists made to differ (a frame dropped from each)
    a, b = recs[0], recs[1 % len(recs)]
    a = egoexo.VideoRecord(a.take, a.src_cam, a.tgt_cam, a.obj, a.frames[1:], a.direction)
    b = egoexo.VideoRecord(b.take, b.src_cam, b.tgt_cam, b.obj + "", b.frames[:1] + b.frames[2:], b.direction)
    (pb,) = P.group_pairs([a, b], MAX_OBJ, exact=False)
    assert len(pb.records) == 2 and pb.records[0].frames != pb.records[1].frames
    (res,) = P.run_take(runner, env["split"], take, ann, [pb], chunk=CHUNK, max_objects=MAX_OBJ, buckets=[MAX_OBJ],
                        keep_logits=True)
    n = 0
    for j, rec in enumerate((a, b)):
        alone = P.run_batch(runner, env["split"], P.VideoBatch(take, rec.src_cam, rec.tgt_cam, rec.frames, (rec,)),
                            ann, chunk=CHUNK, bucket=MAX_OBJ, keep_logits=True)
        got, ref = res.objects[j], alone.objects[0]
        assert got.masks == ref.masks and got.confidence == ref.confidence and set(got.logits) == set(ref.logits)
        for f in ref.logits:
            assert np.array_equal(got.logits[f], ref.logits[f]), (rec.key, f)
            n += 1
    assert n >= 4


# ----------------------------------------------------------------------------- bad input


def test_corrupt_jpeg_skips_only_that_take(env, e2x, capsys):
    _, good = e2x
    split = str(env["root"] / "split_bad")
    shutil.copytree(env["split"], split)
    bad_take = env["takes"][1]
    bad = os.path.join(split, bad_take, "cam01", "120.jpg")  # last frame: fails in the 2nd chunk
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    out = env["root"] / "out_bad"
    capsys.readouterr()
    rc = _predict(env, out, "ego2exo", split=split)
    text = capsys.readouterr()
    text = text.out + text.err
    assert rc != 0
    assert "FAILED" in text and bad_take in text and "cam01" in text and "'120'" in text
    rep = json.load(open(os.path.join(out, "predict_report_ego2exo.json")))
    failed = rep["summary"]["videos_failed"]
    n_bad = len(egoexo.list_videos(split, "ego2exo", takes=[bad_take], frames="official"))
    assert len(failed) == n_bad and all(p["take"] == bad_take and p["frame"] == "120" for p in failed)
    assert not os.path.exists(os.path.join(out, bad_take))  # nothing half-written
    good_take = env["takes"][0]
    for dp, _, fs in os.walk(os.path.join(good, good_take)):
        for fn in fs:
            p = os.path.join(dp, fn)
            q = os.path.join(str(out), os.path.relpath(p, good))
            assert open(p).read() == open(q).read()
    # the submission is still complete (failed videos: empty masks, confidence 0)
    assert score_official(env["gt"], os.path.join(out, "predictions_ego2exo.json"), "ego2exo").issues == []
