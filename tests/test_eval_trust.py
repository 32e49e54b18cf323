"""Evaluation you can trust: the two named chains, resumable and sharded prediction,
path-unsafe object names and the faults of `eval predict` / `eval score`.

One synthetic split (3 takes x 3 frames, aria + 1 exo camera) and one nano model with
random weights shared by the module (in-process runs reuse its compiled step: every batch
is padded to 4 objects, chunks of 3 frames). The subprocess runs (SIGKILL / SIGINT) use
``random:lmeec_hiera_nano`` (the same weights) with a persistent compilation cache.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from eval.__main__ import main as eval_main
from lmeec_jax.data import egoexo
from lmeec_jax.data.synthetic import make_synthetic_split
from lmeec_jax.evaluation.gt import build_gt, write_gt
from lmeec_jax.evaluation.metrics import score_lmeec, score_official
from lmeec_jax.inference import predictor as predictor_module
from lmeec_jax.inference.split import read_done_records
from lmeec_jax.io import encode_name
from lmeec_jax.models.load import load as load_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "random:lmeec_hiera_nano"
FAST = ["--chunk", "3", "--max-objects", "4", "--batch-buckets", "4", "--no-progress"]


def _ann_path(split, take):
    return os.path.join(split, take, "annotation.json")


def _rewrite(split, take, fn):
    p = _ann_path(split, take)
    ann = json.load(open(p))
    fn(ann)
    with open(p, "w") as f:
        json.dump(ann, f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    split = str(root / "split")
    takes = make_synthetic_split(split, 3, seed=5, n_frames=3, n_exo=1, workers=1)
    gt = str(root / "gt.json")
    write_gt(build_gt(split), gt)
    # the same split with every target-view (exo) mask withheld: {} for every exo camera
    withheld = str(root / "withheld")
    shutil.copytree(split, withheld)
    for t in takes:
        def drop(ann):
            for cams in ann["masks"].values():
                for cam in cams:
                    if not egoexo.is_ego_camera(cam):
                        cams[cam] = {}
        _rewrite(withheld, t, drop)
    model = load_model_spec(CKPT, seed=0)
    cache = str(root / "jax_cache")
    return dict(root=root, split=split, takes=takes, gt=gt, withheld=withheld, model=model, cache=cache)


def run_cli(env, argv):
    with pytest.MonkeyPatch.context() as mp:  # one model (and one compiled step) for the module
        mp.setattr(predictor_module, "load_model_spec", lambda spec, seed=0: env["model"])
        return eval_main(argv)


def predict(env, out, direction="ego2exo", data=None, extra=()):
    return run_cli(env, ["predict", "--checkpoint", CKPT, "--data", data or env["split"], "--direction", direction,
                         "--out", str(out), *FAST, *extra])


def tree(folder, skip=("predict_report_",)):
    out = {}
    for dp, _, fs in os.walk(folder):
        for fn in fs:
            if not fn.startswith(skip):
                p = os.path.join(dp, fn)
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def official(env):
    out = env["root"] / "official"
    assert predict(env, out) == 0
    return str(out)


def _src_gt_frames(split, take, obj, cam):
    ann = egoexo.load_annotation(os.path.join(split, take))
    src = ann["masks"][obj].get(cam) or {}
    return {f for f, r in src.items()
            if mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}).any()}


def _subprocess_env(env):
    e = dict(os.environ, JAX_COMPILATION_CACHE_DIR=env["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return e


def _start(env, out, direction="ego2exo"):
    argv = [sys.executable, "-m", "eval", "predict", "--checkpoint", CKPT, "--data", env["split"],
            "--direction", direction, "--out", str(out), *FAST]
    return subprocess.Popen(argv, cwd=ROOT, env=_subprocess_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_first_record(proc, out, direction="ego2exo", timeout=1200):
    d = os.path.join(str(out), ".done", direction)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.isdir(d) and any(f != "run.json" and f.endswith(".json") for f in os.listdir(d)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- 1: chains


def test_official_chain_predicts_every_source_gt_frame_without_target_masks(env, official):
    out = env["root"] / "withheld_out"
    assert predict(env, out, data=env["withheld"]) == 0
    recs = egoexo.list_videos(env["withheld"], "ego2exo", frames="official")
    assert recs
    for rec in recs:
        files = {f[:-5] for f in os.listdir(os.path.join(str(out), rec.take, rec.pair, rec.obj))}
        assert files == _src_gt_frames(env["split"], rec.take, rec.obj, rec.src_cam), rec.key
    # target masks are never read: the withheld split gives the same outputs
    assert tree(str(out)) == tree(official)
    rep = json.load(open(os.path.join(official, "predict_report_ego2exo.json")))
    assert rep["run"]["protocol"] == "official" and rep["run"]["frames"] == "official"
    assert rep["run"]["confidence"] == "score" and rep["run"]["precision"] == "highest"  # item 4
    s = score_official(env["gt"], os.path.join(official, "predictions_ego2exo.json"), "ego2exo")
    assert s.issues == [] and s.metrics["n_samples"] > 0


def test_lmeec_chain_and_score_refusal(env, official, capsys):
    out = env["root"] / "lmeec"
    assert predict(env, out, extra=["--protocol", "lmeec"]) == 0
    for rec in egoexo.list_videos(env["split"], "ego2exo"):  # the reference's frame list
        files = {f[:-5] for f in os.listdir(os.path.join(str(out), rec.take, rec.pair, rec.obj))}
        assert files == set(rec.frames) & _src_gt_frames(env["split"], rec.take, rec.obj, rec.src_cam)
    sub = json.load(open(os.path.join(str(out), "predictions_ego2exo.json")))["ego-exo"]["results"]
    confs = {e["confidence"] for t in sub.values() for p in t["masks"].values() for fr in p.values() for e in fr.values()}
    assert confs <= {0, 1, 0.0}
    rep = json.load(open(os.path.join(str(out), "predict_report_ego2exo.json")))["run"]
    assert (rep["frames"], rep["confidence"]) == ("reference", "area")
    capsys.readouterr()
    # score prints the chain; lmeec on the folder = LM-EEC's numbers
    assert run_cli(env, ["score", "--gt", env["gt"], "--pred", str(out), "--direction", "ego2exo",
                         "--protocol", "lmeec"]) == 0
    text = capsys.readouterr().out
    assert "predictions: protocol lmeec, frames reference, confidence area" in text
    direct = score_lmeec(env["gt"], str(out), "ego2exo").metrics
    assert f"{direct['iou'] * 100:.2f}" in text
    # lmeec on an official JSON: one line saying what to pass instead
    rc = run_cli(env, ["score", "--gt", env["gt"], "--pred", os.path.join(official, "predictions_ego2exo.json"),
                       "--direction", "ego2exo", "--protocol", "lmeec"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--protocol" in err[0] and "frames official" in err[0]


# ----------------------------------------------------------------------------- 2: resume


def test_sigkill_then_rerun_equals_uninterrupted(env, official):
    out = env["root"] / "killed"
    proc = _start(env, out)
    killed = _wait_first_record(proc, out) and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert killed, "the run ended before its first completion record could be seen"
    assert predict(env, out) == 0
    rep = json.load(open(os.path.join(str(out), "predict_report_ego2exo.json")))["summary"]
    assert rep["videos_resumed"] >= 1 and rep["videos_written"] == rep["videos"]
    assert tree(str(out)) == tree(official)


def test_changed_arguments_refused_and_stale_files_removed(env, official, capsys):
    out = env["root"] / "stale"
    shutil.copytree(official, out)
    capsys.readouterr()
    assert predict(env, out, extra=["--confidence", "area"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "confidence" in err[0]
    # a take whose frame breaks: with --overwrite its old files go (not scored as fresh)
    split = str(env["root"] / "split_bad")
    shutil.copytree(env["split"], split)
    bad_take = env["takes"][0]
    bad = os.path.join(split, bad_take, "cam01", "60.jpg")
    open(bad, "wb").write(open(bad, "rb").read()[:100])
    assert predict(env, out, data=split, extra=["--overwrite", "--takes", bad_take]) == 1
    assert not os.path.exists(os.path.join(str(out), bad_take))
    assert not [k for k in read_done_records(str(out), "ego2exo") if k.startswith(bad_take)]


# ----------------------------------------------------------------------------- 3: shards


def test_shards_merge_equal_unsharded(env, official, capsys):
    dirs = [str(env["root"] / f"shard{i}") for i in range(2)]
    for i, d in enumerate(dirs):
        assert predict(env, d, extra=["--shard", f"{i}/2"]) == 0
    merged = str(env["root"] / "merged.json")
    base = ["merge", "--data", env["split"], "--direction", "ego2exo", "--out", merged]
    assert eval_main(base + ["--pred", *dirs]) == 0
    assert json.load(open(merged)) == json.load(open(os.path.join(official, "predictions_ego2exo.json")))
    assert open(merged).read() == open(os.path.join(official, "predictions_ego2exo.json")).read()
    os.remove(merged)
    capsys.readouterr()
    assert eval_main(base + ["--pred", dirs[0]]) == 1
    err = capsys.readouterr().err
    shard1_take = env["takes"][1]
    assert f"missing: {shard1_take}/" in err and not os.path.exists(merged)


# ----------------------------------------------------------------------------- 5: names


def test_path_unsafe_object_names_round_trip(env, capsys):
    split = str(env["root"] / "names")
    take = env["takes"][0]
    os.makedirs(split)
    shutil.copytree(os.path.join(env["split"], take), os.path.join(split, take))
    ann = json.load(open(_ann_path(split, take)))
    old = list(ann["masks"])[:3]
    new = ["bowl/left", ".hidden cup", "very long " + "x" * 300]
    renamed = dict(zip(old, new))

    def rename(a):
        for key in ("masks", "annotated_frames"):
            if key in a:
                a[key] = {renamed.get(k, k): v for k, v in a[key].items()}
    _rewrite(split, take, rename)
    gt = str(env["root"] / "names_gt.json")
    write_gt(build_gt(split), gt)
    for protocol in ("official", "lmeec"):
        out = str(env["root"] / f"names_{protocol}")
        assert predict(env, out, data=split, extra=["--protocol", protocol]) == 0
        for name in new:
            assert os.path.isdir(os.path.join(out, take, "aria01__cam01", encode_name(name))), name
        assert not os.path.exists(os.path.join(out, take, "aria01__cam01", "bowl"))
        rep = score_lmeec(gt, out, "ego2exo")
        assert not rep.errors and not [i for i in rep.warnings if "not in the GT" in i.message]
        assert rep.counts["gt_pairs_predicted"] == rep.counts["gt_pairs"]
        sub = os.path.join(out, "predictions_ego2exo.json")
        assert set(new) <= set(json.load(open(sub))["ego-exo"]["results"][take]["masks"])
        assert score_official(gt, sub, "ego2exo").issues == []
    plain = [n for n in ann["masks"] if n not in old]
    assert all(encode_name(n) == n for n in plain)


# ----------------------------------------------------------------------------- 6: faults


def test_sigint_writes_report_and_exits_130(env):
    out = env["root"] / "interrupted"
    proc = _start(env, out)
    seen = _wait_first_record(proc, out) and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1200)
    assert seen
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("interrupted")]) == 1
    rep = json.load(open(os.path.join(str(out), "predict_report_ego2exo.json")))["summary"]
    assert rep["interrupted"] and 1 <= rep["videos_written"] < rep["videos"]


def _one_line(capsys, rc, expect_rc, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == expect_rc and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]


def test_unusable_data_and_outputs(env, tmp_path, capsys):
    def go(data, out=None, direction="ego2exo"):
        capsys.readouterr()
        return predict(env, out or tmp_path / "o", direction=direction, data=str(data))

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(capsys, go(empty), 1, "no takes")
    no_aria = tmp_path / "no_aria"
    shutil.copytree(env["split"], no_aria)
    for t in env["takes"]:
        shutil.rmtree(no_aria / t / "aria01")
    _one_line(capsys, go(no_aria), 1, "aria")
    no_frames = tmp_path / "no_frames"
    shutil.copytree(env["split"], no_frames)
    for t in env["takes"]:
        def clear(ann):
            ann["annotated_frames"] = {o: {c: [] for c in cams} for o, cams in ann["masks"].items()}
        _rewrite(str(no_frames), t, clear)
    _one_line(capsys, go(no_frames), 1, "annotated frames")
    _one_line(capsys, go(tmp_path / "missing"), 2, "--data", "no such directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(capsys, go(env["split"], out=afile), 2, "--out", "not a directory")
    _one_line(capsys, go(env["split"], out=afile / "sub"), 2, "--out", "not writable")
    capsys.readouterr()
    rc = run_cli(env, ["score", "--gt", env["gt"], "--pred", env["gt"], "--direction", "ego2exo",
                       "--json", str(afile / "scores.json")])
    _one_line(capsys, rc, 2, "--json")
