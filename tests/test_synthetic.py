"""Synthetic ego-exo generator: layout, determinism, visibility, occlusion, speed."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lmeec_jax.data import synthetic as S
from lmeec_jax.data.egoexo import decode_mask

N_FRAMES = 8


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    t0 = time.time()
    takes = S.make_synthetic_split(d, 4, seed=11, n_frames=N_FRAMES, n_exo=2, workers=1)
    dt = time.time() - t0
    print(f"\n[synthetic] 4 takes x {N_FRAMES} frames x 3 cameras: {dt:.2f} s ({dt / 4:.2f} s/take)")
    return str(d), takes


def _tree_bytes(root):
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_layout(split):
    d, takes = split
    assert len(takes) == 4 and len(set(takes)) == 4
    assert open(os.path.join(d, "takes.txt")).read().split() == takes
    assert json.load(open(os.path.join(d, "split.json"))) == {"train": takes}
    frames = [str(30 * i) for i in range(N_FRAMES)]
    for t in takes:
        ann = json.load(open(os.path.join(d, t, "annotation.json")))
        assert ann["subsample_idx"] == [30 * i for i in range(N_FRAMES)]
        assert sorted(os.listdir(os.path.join(d, t))) == ["annotation.json", "aria01", "cam01", "cam02"]
        for cam, wh in (("aria01", (704, 704)), ("cam01", (960, 540)), ("cam02", (960, 540))):
            assert sorted(os.listdir(os.path.join(d, t, cam)), key=lambda s: int(s[:-4])) == [f + ".jpg" for f in frames]
            with Image.open(os.path.join(d, t, cam, "0.jpg")) as im:
                assert im.size == wh and im.format == "JPEG"
        assert ann["masks"]
        for obj, cams in ann["masks"].items():
            for cam, fr in cams.items():
                for f, rle in fr.items():
                    assert f in frames
                    # raw camera resolution, as EgoExo4D stores masks
                    assert rle["size"] == ([1408, 1408] if cam == "aria01" else [2160, 3840])
                    assert isinstance(rle["counts"], str)
            assert set(ann["annotated_frames"][obj]) == {"aria01", "cam01", "cam02"}


def test_rle_upsampled_matches_pycocotools():
    rng = np.random.default_rng(0)
    for h, w, s in ((7, 9, 1), (12, 5, 2), (30, 40, 4), (20, 20, 8)):
        for density in (0.0, 0.05, 0.5, 1.0):
            m = rng.random((h, w)) < density
            if density == 0.5:
                m[:, :2] = False
            got = S.rle_upsampled(m, s, s)
            big = np.kron(m, np.ones((s, s), bool)).astype(np.uint8)
            ref = mask_utils.encode(np.asfortranarray(big))
            assert got["size"] == [h * s, w * s]
            assert got["counts"] == ref["counts"].decode(), (h, w, s, density)


def test_deterministic_and_idempotent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ta = S.make_synthetic_split(a, 2, seed=5, n_frames=4, workers=1)
    tb = S.make_synthetic_split(b, 2, seed=5, n_frames=4, workers=1)
    assert ta == tb
    ba, bb = _tree_bytes(a), _tree_bytes(b)
    assert ba.keys() == bb.keys() and all(ba[k] == bb[k] for k in ba)
    tc = S.make_synthetic_split(c, 2, seed=6, n_frames=4, workers=1)
    assert set(tc).isdisjoint(ta)
    # idempotent: a second call rewrites nothing, more takes only adds
    in_takes = [k for k in ba if os.sep in k]
    mt = {k: os.path.getmtime(os.path.join(a, k)) for k in in_takes}
    ta3 = S.make_synthetic_split(a, 3, seed=5, n_frames=4, workers=1)
    assert ta3[:2] == ta and len(ta3) == 3
    assert all(os.path.getmtime(os.path.join(a, k)) == mt[k] for k in in_takes)
    # the take index alone fixes the take: takes 0-1 of a 3-take split are the same bytes
    after = _tree_bytes(a)
    assert all(after[k] == ba[k] for k in in_takes)


def test_visibility_varies(split):
    """Objects leave and enter the ego view: some frames have no ego annotation."""
    d, takes = split
    absent_ego = present_ego = absent_exo = 0
    for t in takes:
        ann = json.load(open(os.path.join(d, t, "annotation.json")))
        for obj, cams in ann["masks"].items():
            for cam in ("aria01", "cam01"):
                keys = cams.get(cam, {})
                vis = [f for f, r in keys.items() if decode_mask(r).any()]
                if cam == "aria01":
                    present_ego += len(vis)
                    absent_ego += N_FRAMES - len(vis)
                else:
                    absent_exo += N_FRAMES - len(vis)
    print(f"\n[synthetic] ego frames with object visible {present_ego}, absent {absent_ego}; exo absent {absent_exo}")
    assert present_ego > 0 and absent_ego > 0
    assert absent_ego / (absent_ego + present_ego) > 0.05


def test_masks_respect_occlusion():
    rng = np.random.default_rng(3)
    take = S.build_take("t", rng, S.SynthConfig(n_frames=2, n_exo=1))
    exo = take.cameras[1]
    R, C = exo.poses[0]
    # a floating sphere half way between the exo camera and object 0, covering the
    # centre of object 0's silhouette
    a = take.objects[0].prim.pos.copy()
    r0 = float(np.max(take.objects[0].prim.size))
    occ = S.Prim("sphere", C + 0.5 * (a - C), np.full(3, 0.25 * r0), 0.0, S.Texture("solid", (1, 0, 0), (1, 0, 0)))
    take.objects[1].prim = occ
    take.objects[1].path = None
    take.objects[0].path = None
    _, lab = S.render_view(take, exo, 0, 1)
    _, solo0 = S.render_view(take, exo, 0, 1, only=[0])
    m0, full0 = lab == 0, solo0 == 0
    assert full0.sum() > 0
    assert np.all(full0[m0])  # the visible part lies inside the unoccluded silhouette
    hidden = full0 & ~m0
    assert 0 < m0.sum() and hidden.sum() > 0  # partly hidden ...
    assert (lab[hidden] == 1).mean() > 0.9  # ... by the occluder

    # random scenes: every label is inside its solo silhouette, labels never overlap
    for seed in range(3):
        take = S.build_take("t", np.random.default_rng(seed), S.SynthConfig(n_frames=3, n_exo=1))
        for cam in take.cameras:
            for i in range(3):
                _, lab = S.render_view(take, cam, i, 4)
                for k in range(len(take.objects)):
                    _, solo = S.render_view(take, cam, i, 4, only=[k])
                    assert np.all((solo == k)[lab == k])


def test_written_masks_match_labels(tmp_path):
    takes = S.make_synthetic_split(tmp_path, 1, seed=2, n_frames=3, workers=1, p_empty_key=0.0)
    take = S.build_take(takes[0], np.random.default_rng([2, 0, 0x5EED]), S.SynthConfig(n_frames=3))
    ann = json.load(open(tmp_path / takes[0] / "annotation.json"))
    for cam in take.cameras:
        for i in range(3):
            _, lab = S.render_view(take, cam, i, 2)
            for k, o in enumerate(take.objects):
                if not o.name:
                    continue
                rle = ann["masks"][o.name].get(cam.name, {}).get(str(30 * i))
                if (lab == k).sum() < 4:
                    assert rle is None
                    continue
                m = decode_mask(rle)
                s = 4 if cam.is_ego else 8
                assert np.array_equal(m[::s, ::s].astype(bool), lab == k)


def test_generation_speed(tmp_path):
    t0 = time.time()
    S.make_synthetic_split(tmp_path, 2, seed=1, workers=1)  # default: 16 frames, 1 exo camera
    dt = (time.time() - t0) / 2
    print(f"\n[synthetic] default take (16 frames, aria01 + cam01): {dt:.2f} s/take on 1 process "
          f"(load average {os.getloadavg()[0]:.1f})")
    assert dt < 30


def test_cli(tmp_path):
    from eval.__main__ import main as eval_main

    assert eval_main(["make-synthetic", "--out", str(tmp_path), "--takes", "1", "--frames", "2", "--workers", "1",
                      "--seed", "3"]) == 0
    (take,) = open(tmp_path / "takes.txt").read().split()
    assert take == S.take_uid(3, 0)
    assert sorted(os.listdir(tmp_path / take / "aria01")) == ["0.jpg", "30.jpg"]


def test_fixed_camera_cache_is_exact():
    """Exo frames rendered with the per-take cache (room + static objects once) equal a
    from-scratch render, pixel for pixel, including frames where the hand and a carried
    object move over the static scene."""
    for idx in range(3):
        take = S.build_take("t", np.random.default_rng([3, idx, 0x5EED]), S.SynthConfig(n_frames=6))
        exo = take.cameras[1]
        cache = {}
        for i in range(6):
            rgb_c, lab_c = S.render_view(take, exo, i, 4, cache=cache)
            rgb, lab = S.render_view(take, exo, i, 4)
            assert np.array_equal(lab_c, lab) and np.array_equal(rgb_c, rgb)


def test_scene_knobs(tmp_path):
    """Knobs of the built-in training data: bigger objects, a closer exo camera, one plain
    colour per object, no look-alikes; defaults unchanged; settings recorded."""
    rng = lambda: np.random.default_rng([0, 1, 0x5EED])  # noqa: E731
    base = S.build_take("t", rng(), S.SynthConfig(n_frames=4))
    big = S.build_take("t", rng(), S.SynthConfig(n_frames=4, object_scale=2.0, exo_distance=(1.1, 1.2), p_lookalike=0.0,
                                                 p_small=0.0, patterns=("solid",), distinct_colours=True))
    assert all(o.prim.tex.kind == "solid" for o in big.objects)
    colours = [o.prim.tex.c1 for o in big.objects]
    assert len(set(colours)) == len(colours)
    assert min(np.max(o.prim.size) for o in big.objects) > max(0.025, min(np.max(o.prim.size) for o in base.objects))
    cam = big.cameras[1].poses[0][1]
    assert 1.1 <= np.hypot(cam[0], cam[1]) <= 1.2 + 1e-9
    # the recorded settings guard against mixing takes made with other settings
    S.make_synthetic_split(tmp_path, 1, seed=0, n_frames=2, workers=1, object_scale=1.5)
    rec = json.load(open(tmp_path / S.GENERATOR_RECORD))
    assert rec["object_scale"] == 1.5 and rec["seed"] == 0
    S.make_synthetic_split(tmp_path, 1, seed=0, n_frames=2, workers=1, object_scale=1.5)  # same: fine
    with pytest.raises(ValueError, match="object_scale"):
        S.make_synthetic_split(tmp_path, 1, seed=0, n_frames=2, workers=1, object_scale=1.0)
    with pytest.raises(ValueError, match="pattern"):
        S.make_synthetic_split(tmp_path / "x", 1, seed=0, n_frames=2, workers=1, patterns=("plaid",))
