"""Data readers (processed layout, raw relations), bad-input handling, raw preprocessing, `eval show`."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lmeec_jax.data import egoexo as E
from lmeec_jax.data import images as I
from lmeec_jax.data import prepare as P
from lmeec_jax.data.synthetic import make_synthetic_split

N_FRAMES = 6


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    # masks at the JPEG size keep these tests fast; the raw-size path is covered below
    takes = make_synthetic_split(d, 3, seed=21, n_frames=N_FRAMES, n_exo=2, workers=1, raw_masks=False)
    return str(d), takes


@pytest.fixture(scope="module")
def raw_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("rawsplit")
    takes = make_synthetic_split(d, 1, seed=4, n_frames=3, n_exo=1, workers=1)
    return str(d), takes


def _copy_split(src, dst, takes):
    for t in takes:
        shutil.copytree(os.path.join(src, t), os.path.join(dst, t))
    return str(dst)


# ----------------------------------------------------------------------------- listing


def _reference_listing(base, ego2exo):
    """Transcription of LM-EEC tools/correspondence_inference.py's video loop (swap=True
    is ego->exo there)."""
    out = set()
    for video_name in os.listdir(base):
        if not os.path.isdir(os.path.join(base, video_name)):
            continue
        masks = json.load(open(os.path.join(base, video_name, "annotation.json")))["masks"]
        cams = [c for c in os.listdir(os.path.join(base, video_name)) if os.path.isdir(os.path.join(base, video_name, c))]
        ego_cam_name = None
        for c in cams:
            if "aria" in c:
                ego_cam_name = c
        if ego_cam_name is None:
            continue
        for object_name, annotated_cams in masks.items():
            for cam_name in [c for c in cams if c != ego_cam_name]:
                if cam_name not in masks[object_name]:
                    continue
                ego_frames = [int(f.split(".")[0]) for f in os.listdir(os.path.join(base, video_name, ego_cam_name))]
                exo_frames = [int(f.split(".")[0]) for f in os.listdir(os.path.join(base, video_name, cam_name))]
                if ego2exo:
                    if annotated_cams.get(cam_name) is None:
                        continue
                    frames = np.intersect1d(ego_frames, list(annotated_cams[cam_name].keys()))
                    src, tgt = ego_cam_name, cam_name
                else:
                    if annotated_cams.get(ego_cam_name) is None:
                        continue
                    frames = np.intersect1d(list(annotated_cams[ego_cam_name].keys()), exo_frames)
                    src, tgt = cam_name, ego_cam_name
                frames = tuple(sorted((str(f) for f in frames), key=int))
                if frames:  # the reference would crash on an empty video; we drop it
                    out.add((video_name, src, tgt, object_name, frames))
    return out


@pytest.mark.parametrize("direction", E.DIRECTIONS)
def test_listing_matches_reference(split, direction):
    d, takes = split
    rep = E.DataReport()
    vids = E.list_videos(d, direction, report=rep)
    assert len(rep) == 0
    got = {(v.take, v.src_cam, v.tgt_cam, v.obj, v.frames) for v in vids}
    assert got == _reference_listing(d, direction == "ego2exo")
    assert len(got) == len(vids) > 0
    for v in vids:
        assert list(v.frames) == sorted(v.frames, key=int)
        assert v.direction == direction
        assert ("aria" in v.src_cam) == (direction == "ego2exo")
        ann = json.load(open(os.path.join(d, v.take, "annotation.json")))["masks"][v.obj]
        assert set(v.frames) <= set(ann[v.tgt_cam])
        assert set(v.src_missing) == set(v.frames) - set(ann.get(v.src_cam, {}))
    if direction == "exo2ego":  # an ego target once per exo source camera
        per = {}
        for v in vids:
            per.setdefault((v.take, v.obj), []).append(v.src_cam)
        assert any(sorted(c) == ["cam01", "cam02"] for c in per.values())
        assert all(len(c) == len(set(c)) for c in per.values())


def test_natural_sort():
    assert E.natsorted(["120", "30", "0", "1050", "90"]) == ["0", "30", "90", "120", "1050"]
    assert E.natsorted(["cam10", "cam2", "aria01"]) == ["aria01", "cam2", "cam10"]


def test_train_listing(split):
    d, _ = split
    vids = E.list_train_videos(d, num_frames=3)
    assert vids
    for v in vids:
        ann = json.load(open(os.path.join(d, v.take, "annotation.json")))["masks"][v.obj]
        assert set(v.frames) == set(ann[v.src_cam]) & set(ann[v.tgt_cam]) and len(v.frames) >= 3


# ----------------------------------------------------------------------------- loading


def test_load_video(split):
    d, _ = split
    src = E.EgoExoVideoSource(d, "ego2exo")
    rec = max(src.records, key=lambda r: len(r.frames))
    out = E.load_video(d, rec)
    T = len(rec.frames)
    assert out["src_images"].shape == out["tgt_images"].shape == (T, 480, 480, 3)
    assert out["src_images"].dtype == np.float32
    assert out["src_masks"].shape == out["tgt_masks"].shape == (T, 480, 480)
    assert out["src_hw"] == (704, 704) and out["tgt_hw"] == (540, 960)
    # frame 0 as LM-EEC reads it
    f = rec.frames[0]
    im = Image.open(os.path.join(d, rec.take, rec.src_cam, f + ".jpg")).convert("RGB").resize((480, 480))
    x = (np.asarray(im) / 255.0).astype(np.float32)
    ref = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_array_equal(out["src_images"][0], ref)
    ann = json.load(open(os.path.join(d, rec.take, "annotation.json")))["masks"][rec.obj]
    for t, f in enumerate(rec.frames):
        assert out["tgt_present"][t]
        if f in ann[rec.src_cam]:
            m = mask_utils.decode(ann[rec.src_cam][f])
            assert out["src_valid"][t] == bool(m.any())
            np.testing.assert_array_equal(out["src_masks"][t], I.resize_mask_source(m))
        else:
            assert not out["src_present"][t] and not out["src_masks"][t].any()


def test_grain_source(split):
    import grain

    d, _ = split
    src = E.EgoExoVideoSource(d, "exo2ego")
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    assert len(src) > 0 and isinstance(src[0], E.VideoRecord)
    src2 = pickle.loads(pickle.dumps(src))
    assert src2.records == src.records
    ds = grain.MapDataset.source(E.EgoExoVideoSource(d, "exo2ego", load=True, records=src.records[:1]))
    item = ds[0]
    assert item["src_images"].shape[1:] == (480, 480, 3) and item["record"] == src.records[0]


def test_raw_resolution_masks(raw_split):
    d, takes = raw_split
    for direction in E.DIRECTIONS:
        recs = E.list_videos(d, direction)
        out = E.load_video(d, recs[0])
        want = {"aria01": (1408, 1408), "cam01": (2160, 3840)}
        assert out["src_mask_hw"] in (None, want[recs[0].src_cam])
        assert out["tgt_mask_hw"] == want[recs[0].tgt_cam]
    rec = max(E.list_train_videos(d, num_frames=1), key=lambda r: len(r.frames))
    clip = E.load_clip_raw(d, rec)
    T = len(rec.frames)
    assert clip["src_frames"].shape == (T, 704, 704, 3) and clip["src_frames"].dtype == np.uint8
    assert clip["tgt_frames"].shape == (T, 540, 960, 3)
    assert clip["src_masks"].shape == (T, 1408, 1408) and clip["tgt_masks"].shape == (T, 2160, 3840)
    assert clip["src_present"].all() and clip["tgt_present"].all() and clip["src_masks"][0].any()


def test_resize_mask_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, w in ((1408, 1408), (540, 960), (481, 479)):
        m = np.zeros((h, w), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, h // 2), x:x + rng.integers(1, w // 2)] = 1
        m ^= (rng.random((h, w)) < 0.01).astype(np.uint8)
        t = torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(480, 480),
                                            mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
        a = I.resize_bilinear_aa(m.astype(np.float32), (480, 480))
        assert np.abs(a - t).max() < 1e-6
        np.testing.assert_array_equal(I.resize_mask_source(m), t >= 0.5)


# ----------------------------------------------------------------------------- bad input


def _first_video(d, direction, take, tgt=None):
    return [v for v in E.list_videos(d, direction) if v.take == take and (tgt is None or v.tgt_cam == tgt)]


def _run_iter(d, direction, bad=None):
    """iter_videos over the bad video(s) plus one video of every other take (keeps it fast)."""
    rep = E.DataReport()
    recs = E.list_videos(d, direction, report=rep)
    keep, seen = [], set()
    for r in recs:
        if (bad is not None and r.key in bad) or r.take not in seen:
            keep.append(r)
            seen.add(r.take)
    got = [v["record"].key for v in E.iter_videos(d, direction, report=rep, records=keep)]
    return got, rep, keep


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg(split, tmp_path, kind):
    src, takes = split
    d = _copy_split(src, tmp_path, takes[:2])
    vids = _first_video(d, "ego2exo", takes[0], "cam01")
    f = vids[0].frames[len(vids[0].frames) // 2]
    path = os.path.join(d, takes[0], "cam01", f + ".jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(b"\xff\xd8\xff\xe0garbage" if kind == "garbage" else data[: len(data) // 3])
    with pytest.raises(E.DataError) as ei:
        E.load_video(d, vids[0])
    assert path in str(ei.value) and ei.value.camera == "cam01" and ei.value.frame == f
    assert ei.value.take == takes[0]
    got, rep, keep = _run_iter(d, "ego2exo", bad={v.key for v in vids if f in v.frames})
    bad = {p["video"] for p in rep.problems}
    assert bad and set(got) | bad == {r.key for r in keep} and not bad & set(got)
    assert all(p["path"] == path for p in rep.problems)
    assert any(k.startswith(takes[1]) for k in got)  # it went on with the next take


def test_missing_frame_file(split, tmp_path):
    src, takes = split
    d = _copy_split(src, tmp_path, takes[:1])
    v = _first_video(d, "ego2exo", takes[0], "cam02")[0]
    path = os.path.join(d, takes[0], "cam02", v.frames[-1] + ".jpg")
    os.remove(path)
    with pytest.raises(E.DataError, match="missing") as ei:
        E.load_video(d, v)
    assert path in str(ei.value)
    got, rep, _ = _run_iter(d, "ego2exo", bad={v.key})
    assert v.key not in got and v.key in {p["video"] for p in rep.problems}
    assert any(p["path"] == path for p in rep.problems)


@pytest.mark.parametrize("kind", ["other_size", "runs_mismatch", "not_rle"])
def test_bad_mask(split, tmp_path, kind):
    src, takes = split
    d = _copy_split(src, tmp_path, takes[:2])
    v = _first_video(d, "exo2ego", takes[0], "aria01")[0]
    ann_path = os.path.join(d, takes[0], "annotation.json")
    ann = json.load(open(ann_path))
    f = v.frames[0]
    rle = ann["masks"][v.obj]["aria01"][f]
    if kind == "other_size":  # a 100x300 mask for a 704x704 camera
        m = np.zeros((100, 300), np.uint8, order="F")
        m[10:20, 10:40] = 1
        r = mask_utils.encode(m)
        ann["masks"][v.obj]["aria01"][f] = {"size": [100, 300], "counts": r["counts"].decode()}
    elif kind == "runs_mismatch":  # size and runs disagree (pycocotools would decode garbage)
        ann["masks"][v.obj]["aria01"][f] = {"size": [rle["size"][0] + 1, rle["size"][1]], "counts": rle["counts"]}
    else:
        ann["masks"][v.obj]["aria01"][f] = {"counts": rle["counts"]}
    json.dump(ann, open(ann_path, "w"))
    with pytest.raises(E.DataError) as ei:
        E.load_video(d, v)
    e = ei.value
    assert e.path == ann_path and ann_path in str(e)
    assert (e.take, e.camera, e.frame, e.obj) == (takes[0], "aria01", f, v.obj)
    got, rep, _ = _run_iter(d, "exo2ego", bad={v.key})
    assert v.key in {p["video"] for p in rep.problems} and v.key not in got
    assert any(k.startswith(takes[1]) for k in got)


def test_truncated_json(split, tmp_path):
    src, takes = split
    d = _copy_split(src, tmp_path, takes)
    ann_path = os.path.join(d, takes[1], "annotation.json")
    data = open(ann_path).read()
    open(ann_path, "w").write(data[: len(data) // 2])
    with pytest.raises(E.DataError, match="JSON") as ei:
        E.list_videos(d, "ego2exo")
    assert ann_path in str(ei.value) and ei.value.take == takes[1]
    got, rep, _ = _run_iter(d, "ego2exo")
    assert len(rep) == 1 and rep.problems[0]["path"] == ann_path and rep.problems[0]["take"] == takes[1]
    assert {k.split("/")[0] for k in got} == {takes[0], takes[2]}
    src_ds = E.EgoExoVideoSource(d, "ego2exo")
    assert len(src_ds.report) == 1 and {r.take for r in src_ds.records} == {takes[0], takes[2]}


# ----------------------------------------------------------------------------- raw relations


def test_relations_roundtrip(tmp_path):
    m = np.zeros((40, 60), np.uint8, order="F")
    m[5:30, 10:50] = 1
    rle = mask_utils.encode(m)
    rle = {"size": [40, 60], "counts": rle["counts"].decode()}
    enc = E.encode_relation_mask(rle)
    assert enc["width"] == 60 and enc["height"] == 40 and enc["encodedMask"] != rle["counts"]
    assert E.decode_relation_mask(enc) == rle
    with pytest.raises(E.DataError):
        E.decode_relation_mask({"width": 60, "height": 40, "encodedMask": "@@@ not lz"})
    p = tmp_path / "relations_val.json"
    p.write_text(json.dumps({"annotations": {"t": {"take_name": "n", "object_masks": {
        "o": {"aria01": {"annotation": {"0": enc}, "annotated_frames": [0, 30]}}}}}}))
    annos = E.load_relations(p)
    assert E.relation_take_masks(annos["t"]) == {"o": {"aria01": {"0": rle}}}
    assert E.relation_annotated_frames(annos["t"]) == {"o": {"aria01": [0, 30]}}
    p.write_text(p.read_text()[:50])
    with pytest.raises(E.DataError, match="JSON"):
        E.load_relations(p)


# ----------------------------------------------------------------------------- raw preprocessing


def test_cv2_resize_linear_integer_factors():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    a = img.astype(np.int32)
    r2 = P.cv2_resize_linear(img, (12, 8))
    exp2 = (a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2] + 2) >> 2
    np.testing.assert_array_equal(r2, exp2)
    r4 = P.cv2_resize_linear(img, (6, 4))
    exp4 = (a[1::4, 1::4] + a[1::4, 2::4] + a[2::4, 1::4] + a[2::4, 2::4] + 2) >> 2
    np.testing.assert_array_equal(r4, exp4)
    np.testing.assert_array_equal(P.cv2_resize_linear(img, (24, 16)), img)


def _raw_frames(n, h, w, seed):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([30 + 25 * np.sin(xx / (5.0 + seed)), 30 + 25 * np.cos(yy / 7.0), 30 + 0 * xx], -1).astype(np.int32)
    # frame i has brightness 100 + i (so the extracted frame can be identified)
    return [np.clip(base + 100 + i, 0, 255).astype(np.uint8) for i in range(n)]


def _write_mp4(path, frames):
    av = pytest.importorskip("av")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "1"}
        for a in frames:
            for pk in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


def _make_raw(root, use_mp4):
    """Tiny raw EgoExo4D: 3 takes (ok / ego video missing / corrupt mask), 61 frames."""
    takepath = root / "takes"
    ego = _raw_frames(61, 64, 64, 0)
    exo = _raw_frames(61, 64, 128, 1)
    m_ego = np.zeros((128, 128), np.uint8, order="F")
    m_ego[20:60, 30:90] = 1
    m_exo = np.zeros((256, 512), np.uint8, order="F")
    m_exo[100:140, 200:300] = 1

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": list(m.shape), "counts": r["counts"].decode()}

    annos, split = {}, []
    for k, name in enumerate(["ok", "novideo", "badmask"]):
        tid = f"take-{name}"
        split.append(tid)
        vdir = takepath / f"T_{name}" / "frame_aligned_videos"
        vdir.mkdir(parents=True)
        cams = {"aria01": ego, "cam01": exo}
        for cam, fr in cams.items():
            if name == "novideo" and cam == "aria01":
                continue
            if use_mp4:
                _write_mp4(vdir / f"{cam}.mp4", fr)
            else:
                (vdir / cam).mkdir()
                for i, a in enumerate(fr):
                    Image.fromarray(a).save(vdir / cam / f"frame_{i}.png")
        enc_ego = E.encode_relation_mask(rle(m_ego))
        if name == "badmask":
            enc_ego = dict(enc_ego, encodedMask="@@@@")
        annos[tid] = {"take_name": f"T_{name}", "object_masks": {"cup_0": {
            "aria01": {"annotation": {"0": enc_ego, "30": E.encode_relation_mask(rle(m_ego))}, "annotated_frames": [0, 30]},
            "cam01": {"annotation": {"30": E.encode_relation_mask(rle(m_exo))}, "annotated_frames": [0, 30, 60]},
        }}}
    (root / "relations_val.json").write_text(json.dumps({"annotations": annos}))
    (root / "split.json").write_text(json.dumps({"val": split, "train": []}))
    return takepath, ego, exo, rle(m_ego), rle(m_exo)


@pytest.mark.parametrize("use_mp4", [False, True], ids=["frame_dirs", "mp4"])
def test_prepare(tmp_path, use_mp4):
    if use_mp4:
        pytest.importorskip("av")
    takepath, ego, exo, r_ego, r_exo = _make_raw(tmp_path, use_mp4)
    out = tmp_path / "out"
    rep = P.prepare_split(str(takepath), str(tmp_path / "relations_val.json"), str(tmp_path / "split.json"), "val",
                          str(out), min_height=32, progress=False)
    assert rep.done == ["take-ok"]
    assert set(rep.failed) == {"take-novideo", "take-badmask"}
    assert "aria01.mp4 does not exist" in rep.failed["take-novideo"]
    assert "encodedMask" in rep.failed["take-badmask"] and "aria01" in rep.failed["take-badmask"]
    ann = json.load(open(out / "take-ok" / "annotation.json"))
    assert ann["subsample_idx"] == [0, 30, 60]
    assert ann["masks"] == {"cup_0": {"aria01": {"0": r_ego, "30": r_ego}, "cam01": {"30": r_exo}}}
    for cam, frames, scale in (("aria01", ego, 2), ("cam01", exo, 4)):
        assert sorted(os.listdir(out / "take-ok" / cam)) == ["0.jpg", "30.jpg", "60.jpg"]
        if use_mp4:  # compare with the frames as decoded from the (lossy) video
            frames = list(P.iter_video_frames(str(takepath), "T_ok", cam))
            assert len(frames) == 61
        for i in (0, 30, 60):
            got = np.asarray(Image.open(out / "take-ok" / cam / f"{i}.jpg")).astype(np.float32)
            h, w = frames[i].shape[:2]
            assert got.shape == (h // scale, w // scale, 3)
            want = P.cv2_resize_linear(frames[i], (w // scale, h // scale)).astype(np.float32)
            assert np.abs(got - want).mean() < 4.0, (cam, i)  # JPEG q95 with 4:2:0 chroma on tiny frames
            assert abs(got.mean() - want.mean()) < 0.5  # the right frame (brightness 100 + index)
    # the processed take reads back
    vids = E.list_videos(str(out), "ego2exo")
    assert [(v.src_cam, v.tgt_cam, v.frames) for v in vids] == [("aria01", "cam01", ("30",))]
    # resumable: the done take is skipped, the failed ones are retried (and fail again)
    rep2 = P.prepare_split(str(takepath), str(tmp_path / "relations_val.json"), str(tmp_path / "split.json"), "val",
                           str(out), min_height=32, progress=False)
    assert rep2.skipped == ["take-ok"] and rep2.done == [] and set(rep2.failed) == set(rep.failed)


def test_prepare_min_height(tmp_path):
    takepath, *_ = _make_raw(tmp_path, use_mp4=False)
    out = tmp_path / "out"
    rep = P.prepare_split(str(takepath), str(tmp_path / "relations_val.json"), str(tmp_path / "split.json"), "val",
                          str(out), takes=["take-ok"], progress=False)  # official 1408 px minimum
    assert rep.done == ["take-ok"]
    assert any("1408" in w for w in rep.warnings["take-ok"])
    assert os.listdir(out / "take-ok" / "aria01") == []  # as the official script: nothing written
    assert json.load(open(out / "take-ok" / "annotation.json"))["subsample_idx"] == [0, 30, 60]


# ----------------------------------------------------------------------------- eval show


def test_eval_show(split, tmp_path):
    from eval.__main__ import main as eval_main

    d, takes = split
    v = max(E.list_videos(d, "ego2exo"), key=lambda r: len(r.frames))
    pred = tmp_path / "pred"
    ann = json.load(open(os.path.join(d, v.take, "annotation.json")))["masks"][v.obj]
    for f in v.frames[:-1]:  # last frame without a prediction
        g = I.resize_mask_nearest(mask_utils.decode(ann[v.tgt_cam][f]), (480, 480))
        r = mask_utils.encode(np.asfortranarray(g.astype(np.uint8)))
        p = pred / v.take / v.pair / v.obj
        p.mkdir(parents=True, exist_ok=True)
        (p / f"{f}.json").write_text(json.dumps({"size": r["size"], "counts": r["counts"].decode()}))
    out = tmp_path / "show"
    rc = eval_main(["show", "--data", d, "--take", v.take, "--object", v.obj, "--direction", "ego2exo",
                    "--pred", str(pred), "--pair", v.pair, "--out", str(out), "--height", "120"])
    assert rc == 0
    pngs = sorted(os.listdir(out / v.pair))
    assert len(pngs) == len(v.frames)
    with Image.open(out / v.pair / pngs[0]) as im:
        assert im.size == (120 + 213 + 8, 142)
    with Image.open(out / f"{v.pair}.gif") as gif:
        assert gif.n_frames == len(v.frames)
