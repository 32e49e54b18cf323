"""Official / LM-EEC metrics, the scorer, build-gt and the `score` CLI.

Expected values are computed by hand in the comments (the official scorer itself,
with cv2/skimage/sklearn, was also run against this implementation outside the test
suite and agreed to the last bit on random masks and a random 3-take split).
"""

import json
import math
import os

import numpy as np
import pytest

from lmeec_jax.evaluation import metrics as M
from lmeec_jax.evaluation.gt import build_gt
from lmeec_jax.data.rle import decode_rle, encode_mask

NORM = 480 * math.sqrt(2)  # location-error divisor, whatever the mask shape
EGO, EXO, EXO2 = "aria01_214-1", "cam01", "gp02"


# ----------------------------------------------------------------------------- resize


def test_official_eval_shape():
    assert M.official_eval_shape(2160, 3840) == (270, 480)
    assert M.official_eval_shape(540, 960) == (270, 480)
    assert M.official_eval_shape(1408, 1408) == (480, 480)
    assert M.official_eval_shape(704, 704) == (480, 480)
    assert M.official_eval_shape(3840, 2160) == (480, 270)
    assert M.official_eval_shape(100, 1408) == (34, 480)


def _index_image(h, w):
    return np.arange(h * w, dtype=np.int64).reshape(h, w)


def test_inter_nearest_rows_exo_and_ego():
    # exo 2160x3840 -> 270x480: source index 8*d on both axes
    r = M.reshape_nopad(_index_image(2160, 3840))
    assert r.shape == (270, 480)
    np.testing.assert_array_equal(r[:, 0] // 3840, 8 * np.arange(270))
    np.testing.assert_array_equal(r[0, :] % 3840, 8 * np.arange(480))
    # ego 1408 -> 480: d*1408/480 = d*44/15, floored: 0, 2, 5, ..., row 15 -> 44 exactly,
    # row 16 -> 46 (46.93); half-pixel nearest would take 45 and 48 there.
    r = M.reshape_nopad(_index_image(1408, 1408))
    rows, cols = r[:, 0] // 1408, r[0, :] % 1408
    assert list(rows[:6]) == [0, 2, 5, 8, 11, 14]
    assert rows[15] == 44 and rows[16] == 46 and cols[-1] == 1405
    np.testing.assert_array_equal(rows, cols)
    np.testing.assert_array_equal(rows, (np.arange(480) * 1408) // 480)  # == integer rule for this shape


def test_inter_nearest_float_rule_not_integer_rule():
    # OpenCV computes floor(d * (1 / (D/S))) in doubles. For 100 -> 34 rows, d = 17:
    # 17 * 2.9411764705882355 = 49.99999..., so cv2 (checked with 4.10 and 5.0) takes
    # row 49 where the exact integer rule (17*100)//34 gives 50.
    r = M.resize_nearest_cv2(_index_image(100, 1408), (34, 480))
    rows = r[:, 0] // 1408
    assert rows[17] == 49 and (17 * 100) // 34 == 50
    assert rows[16] == 47 and rows[18] == 52


def test_resize_identity_and_upscale():
    m = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(M.resize_nearest_cv2(m, (3, 4)), m)
    up = M.resize_nearest_cv2(m, (6, 8))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(m, 2, 0), 2, 1))


# ----------------------------------------------------------------------------- IoU


def test_iou_by_hand():
    g = np.zeros((4, 4), np.uint8)
    g[1:3, 1:3] = 1  # 4 px
    p = np.zeros_like(g)
    p[1, 1:4] = 1  # 3 px, 2 shared
    assert M.iou(g, p) == pytest.approx(2 / 5, abs=1e-7)
    assert M.iou(g, p) == 2 / (5 + 1e-7)  # the official epsilon
    z = np.zeros_like(g)
    assert M.iou(z, z) == 1.0  # both empty
    assert M.iou(g, z) == 0.0  # empty prediction
    assert M.iou(z, p) == 0.0  # empty GT
    assert M.iou(g, g) == 4 / (4 + 1e-7)
    with pytest.raises(ValueError, match="shapes differ"):
        M.iou(g, np.zeros((4, 5)))


# ----------------------------------------------------------------------------- boundary


def test_seg2bmap_by_hand():
    s = np.zeros((4, 4), np.uint8)
    s[1:3, 1:3] = 1
    # a pixel is boundary if it differs from its right, lower or lower-right neighbour
    expect = [[1, 1, 1, 0],
              [1, 0, 1, 0],
              [1, 1, 1, 0],
              [0, 0, 0, 0]]
    np.testing.assert_array_equal(M.seg2bmap(s).astype(int), expect)


def test_seg2bmap_border_touching():
    # block touching the bottom and right borders: the last column only compares with
    # the pixel below, the last row only with the pixel to the right
    s = np.zeros((6, 6), np.uint8)
    s[2:, 3:] = 1
    expect = [[0, 0, 0, 0, 0, 0],
              [0, 0, 1, 1, 1, 1],
              [0, 0, 1, 0, 0, 0],
              [0, 0, 1, 0, 0, 0],
              [0, 0, 1, 0, 0, 0],
              [0, 0, 1, 0, 0, 0]]
    np.testing.assert_array_equal(M.seg2bmap(s).astype(int), expect)
    # a full mask has no boundary at all
    assert not M.seg2bmap(np.ones((270, 480))).any()


def test_disk_and_dilation_brute_force():
    for r in range(0, 7):
        d = M.disk(r)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        np.testing.assert_array_equal(d, (yy ** 2 + xx ** 2 <= r * r).astype(np.uint8))
    assert M.disk(5).sum() == 81 and M.disk(6).sum() == 113
    rng = np.random.default_rng(0)
    for r in (0, 1, 3, 5, 6):
        b = rng.random((23, 31)) < 0.03
        b[0, 0] = b[-1, -1] = b[0, -1] = True
        ref = np.zeros_like(b)
        for dy, dx in zip(*np.nonzero(M.disk(r))):
            dy, dx = dy - r, dx - r
            sh = np.zeros_like(b)
            ys = slice(max(dy, 0), b.shape[0] + min(dy, 0))
            xs = slice(max(dx, 0), b.shape[1] + min(dx, 0))
            yd = slice(max(-dy, 0), b.shape[0] + min(-dy, 0))
            xd = slice(max(-dx, 0), b.shape[1] + min(-dx, 0))
            sh[yd, xd] = b[ys, xs]
            ref |= sh
        np.testing.assert_array_equal(M.dilate_disk(b, r), ref)


def test_boundary_radius():
    assert M.boundary_radius((270, 480)) == 5  # ceil(0.008 * 550.7) = ceil(4.41)
    assert M.boundary_radius((480, 480)) == 6  # ceil(0.008 * 678.8) = ceil(5.43)


def test_boundary_f_edge_cases():
    z = np.zeros((270, 480), np.uint8)
    g = z.copy()
    g[50:100, 50:150] = 1
    assert M.boundary_f(g, g) == 1.0
    assert M.boundary_f(z, z) == 1.0  # no boundaries: precision = recall = 1
    assert M.boundary_f(g, z) == 0.0  # empty prediction: precision 1, recall 0
    assert M.boundary_f(z, g) == 0.0  # empty GT: precision 0, recall 1
    # an all-ones mask has no seg2bmap boundary, so an empty prediction scores CA 1 (and IoU 0)
    full = np.ones_like(z)
    assert M.boundary_f(full, z) == 1.0 and M.iou(full, z) == 0.0


def _square(shape, y0, x0, n=100):
    m = np.zeros(shape, np.uint8)
    m[y0:y0 + n, x0:x0 + n] = 1
    return m


@pytest.mark.parametrize("shape, r", [((480, 480), 6), ((270, 480), 5)])
def test_shifted_square_by_hand(shape, r):
    # 100x100 squares, prediction shifted right by 20 px. Each seg2bmap boundary is the
    # 4*100 = 400 px ring of the 101x101 square one pixel up-left. A predicted boundary
    # pixel matches if a GT boundary pixel lies within the disk of radius r:
    # top and bottom rows (101 px, columns X1+20..X2+20 with X2 = X1+100): those up to r past
    # the GT's right edge X2 -> (X2 + r) - (X1 + 20) + 1 = 81 + r each,
    # left column (99 px without corners): the r rows next to each GT edge -> 2r,
    # right column: 20 px from anything -> 0. Symmetric for recall.
    g = _square(shape, 60, 100)
    p = _square(shape, 60, 120)
    matched = 2 * (81 + r) + 2 * r
    assert M.boundary_f(g, p) == pytest.approx(matched / 400, abs=1e-12)
    assert M.iou(g, p) == pytest.approx(8000 / 12000, abs=1e-9)
    assert M.location_error(g, p) == pytest.approx(20 / NORM, abs=1e-15)
    # within the disk radius a shift costs nothing in CA
    p3 = _square(shape, 60, 103)
    assert M.boundary_f(g, p3) == 1.0
    assert M.iou(g, p3) == pytest.approx(97 / 103, abs=1e-9)


def test_eroded_square_by_hand():
    g = _square((480, 480), 60, 100)
    p = _square((480, 480), 61, 101, n=98)  # eroded by one pixel
    assert M.iou(g, p) == pytest.approx(98 * 98 / 100 ** 2, abs=1e-9)
    assert M.boundary_f(g, p) == 1.0  # rings one pixel apart
    assert M.location_error(g, p) == 0.0  # box centres (100+199)//2 = (101+198)//2 = 149


# ----------------------------------------------------------------------------- location error


def test_location_error_floor_division():
    g = np.zeros((10, 10), np.uint8)
    g[2, 0:4] = 1  # box columns 0..3: centre (0+3)//2 = 1
    p = np.zeros_like(g)
    p[2, 0:3] = 1  # box columns 0..2: centre 1
    assert M.location_error(g, p) == 0.0
    p2 = np.zeros_like(g)
    p2[5, 0:4] = 1  # 3 rows down
    assert M.location_error(g, p2) == pytest.approx(3 / NORM, abs=1e-15)


def test_location_error_empty_masks():
    # 480x480, padded by 480 -> 1440x1440; an empty mask sits at (720, 720).
    # GT pixel at (y=10, x=20) -> padded (x=500, y=490).
    g = np.zeros((480, 480), np.uint8)
    g[10, 20] = 1
    z = np.zeros_like(g)
    assert M.location_error(g, z) == pytest.approx(math.hypot(720 - 500, 720 - 490) / NORM, abs=1e-15)
    assert M.location_error(z, z) == 0.0
    # 270x480, padded by 270 -> 810x1020; the empty centre is returned swapped:
    # (x, y) = (810//2, 1020//2) = (405, 510). GT pixel -> (x=290, y=280).
    g = np.zeros((270, 480), np.uint8)
    g[10, 20] = 1
    z = np.zeros_like(g)
    assert M.location_error(g, z) == pytest.approx(math.hypot(405 - 290, 510 - 280) / NORM, abs=1e-15)
    assert M.location_error(z, g) == M.location_error(g, z)


# ----------------------------------------------------------------------------- balanced accuracy


def test_balanced_accuracy_by_hand():
    # class 1: 2 of 3 right; class 0: 1 of 2 right -> (2/3 + 1/2) / 2
    assert M.balanced_accuracy([1, 1, 1, 0, 0], [1, 0, 1, 0, 1]) == pytest.approx(7 / 12)
    # only class 1 in the GT: sklearn averages over the GT classes only
    assert M.balanced_accuracy([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(1 / 4)
    assert M.balanced_accuracy([0, 1], [0, 1]) == 1.0
    assert M.balanced_accuracy([0, 1], [1, 0]) == 0.0
    assert math.isnan(M.balanced_accuracy([], []))


# ----------------------------------------------------------------------------- scorer fixtures

EGO_RAW, EXO_RAW = (704, 704), (540, 960)  # raw GT sizes -> eval 480x480 and 270x480


def _blank(cam):
    return np.zeros(EGO_RAW if "aria" in cam else EXO_RAW, np.uint8)


def _raw_square(cam, y0, x0, n):
    m = _blank(cam)
    m[y0:y0 + n, x0:x0 + n] = 1
    return m


def _write_split(root, takes):
    """takes: {take: {"masks": {obj: {cam: {frame: mask}}}, "annotated_frames": ...}}."""
    for take, t in takes.items():
        os.makedirs(os.path.join(root, take), exist_ok=True)
        ann = {"masks": {o: {c: {f: encode_mask(m) for f, m in fr.items()} for c, fr in cams.items()}
                         for o, cams in t["masks"].items()},
               "subsample_idx": [0, 30, 60]}
        if "annotated_frames" in t:
            ann["annotated_frames"] = t["annotated_frames"]
        with open(os.path.join(root, take, "annotation.json"), "w") as f:
            json.dump(ann, f)


def _small_split():
    """One take, two objects. obj_a: ego + two exo cameras; obj_b: ego + one exo."""
    sq = _raw_square
    masks = {
        "obj_a": {
            EGO: {"0": sq(EGO, 100, 100, 150), "30": sq(EGO, 200, 300, 90), "60": _blank(EGO)},
            EXO: {"0": sq(EXO, 100, 200, 200), "30": _blank(EXO)},  # "30": key with an empty mask
            EXO2: {"60": sq(EXO2, 10, 10, 100)},
        },
        "obj_b": {
            EGO: {"0": sq(EGO, 0, 0, 704)},  # whole frame (touches every border)
            EXO: {"0": sq(EXO, 440, 860, 100), "30": sq(EXO, 0, 0, 50)},  # bottom-right corner
        },
    }
    annotated = {o: {c: [0, 30, 60] for c in cams} for o, cams in masks.items()}
    return {"take1": {"masks": masks, "annotated_frames": annotated}}


def _perfect_predictions(gt, direction):
    """Predictions equal to the GT at evaluation size, confidence = GT key exists."""
    key = M.TASK_KEYS[direction]
    res = {}
    for take, t in gt["annotations"].items():
        res[take] = {"masks": {}, "subsample_idx": t["subsample_idx"]}
        for obj, cams in t["masks"].items():
            res[take]["masks"][obj] = {}
            egos = [c for c in cams if "aria" in c]
            for exo in [c for c in cams if "aria" not in c]:
                src, tgt = (egos[0], exo) if direction == "ego2exo" else (exo, egos[0])
                shape = M.official_eval_shape(*next(iter(cams[tgt].values()))["size"])
                d = {}
                for f in cams[src]:
                    if f in cams[tgt]:
                        m = M.reshape_nopad(decode_rle(cams[tgt][f]))
                        d[f] = {"pred_mask": encode_mask(m), "confidence": 1.0}
                    else:
                        d[f] = {"pred_mask": encode_mask(np.zeros(shape, np.uint8)), "confidence": 0.0}
                res[take]["masks"][obj][f"{src}_{tgt}"] = d
    return {key: {"version": "xx", "challenge": "xx", "results": res}}


@pytest.fixture(scope="module")
def small_gt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("split"))
    _write_split(root, _small_split())
    return build_gt(root)


# ----------------------------------------------------------------------------- build-gt


def test_build_gt_layout(small_gt, tmp_path):
    ann = small_gt["annotations"]
    assert list(ann) == ["take1"]
    t = ann["take1"]
    assert set(t) >= {"masks", "subsample_idx", "annotated_frames"}
    assert t["annotated_frames"]["obj_a"][EXO] == [0, 30, 60]  # taken from annotation.json
    assert small_gt["annotated_frames_from"] == ["annotation.json"]
    # without annotated_frames: fallback = union of the object's frame keys, with a warning
    root = str(tmp_path / "s")
    sp = _small_split()
    del sp["take1"]["annotated_frames"]
    _write_split(root, sp)
    warnings = []
    gt = build_gt(root, warnings=warnings)
    assert gt["annotations"]["take1"]["annotated_frames"]["obj_b"][EGO] == [0, 30]
    assert gt["annotations"]["take1"]["annotated_frames"]["obj_a"][EXO2] == [0, 30, 60]
    assert any("fallback" in w for w in warnings)
    # from a raw relations file (official)
    rel = {"annotations": {"take1": {"object_masks": {
        o: {c: {"annotated_frames": [30]} for c in cams} for o, cams in sp["take1"]["masks"].items()}}}}
    gt = build_gt(root, relations=rel)
    assert gt["annotations"]["take1"]["annotated_frames"]["obj_a"][EGO] == [30]
    assert gt["annotated_frames_from"] == ["relations"]


def test_build_gt_split_selection_and_errors(tmp_path):
    from lmeec_jax.evaluation.gt import GTBuildError

    root = str(tmp_path / "data")
    sp = _small_split()
    _write_split(root, {"take1": sp["take1"], "take2": sp["take1"]})
    with open(os.path.join(root, "split_checking.json"), "w") as f:
        json.dump({"val": ["take2"], "test": ["take1", "missing"]}, f)
    assert list(build_gt(root)["annotations"]) == ["take1", "take2"]
    assert list(build_gt(root, split="val")["annotations"]) == ["take2"]
    warnings = []
    assert list(build_gt(root, split="test", warnings=warnings)["annotations"]) == ["take1"]
    assert any("take=missing" in w for w in warnings)
    _write_split(str(tmp_path / "data" / "train"), {"take9": sp["take1"]})  # <root>/<split>/<take> layout
    assert list(build_gt(root, split="train")["annotations"]) == ["take9"]
    with pytest.raises(GTBuildError, match="split 'nope'"):
        build_gt(root, split="nope")
    # a broken GT mask is reported with its location
    path = os.path.join(root, "take1", "annotation.json")
    with open(path) as f:
        ann = json.load(f)
    ann["masks"]["obj_b"][EXO]["30"]["counts"] = "0"
    with open(path, "w") as f:
        json.dump(ann, f)
    with pytest.raises(GTBuildError, match=f"object=obj_b camera={EXO} frame=30: RLE runs cover 0 pixels"):
        build_gt(root)


# ----------------------------------------------------------------------------- official protocol


@pytest.mark.parametrize("direction", ["ego2exo", "exo2ego"])
def test_gt_against_itself_is_perfect(small_gt, direction):
    rep = M.score_official(small_gt, _perfect_predictions(small_gt, direction), direction)
    assert rep.valid, [str(i) for i in rep.issues]
    m = rep.metrics
    assert m["iou"] == pytest.approx(1.0, abs=1e-9)
    assert m["contour_accuracy"] == 1.0
    assert m["location_error"] == 0.0
    assert m["balanced_accuracy"] == 1.0
    if direction == "ego2exo":
        # source = ego frames; pairs (a: EXO, EXO2; b: EXO): a/EXO 3 samples (GT keys 0, 30),
        # a/EXO2 3 (GT key 60), b/EXO 1 (ego has only frame 0) -> 7 samples, 4 with GT
        assert (m["n_samples"], m["n_gt_visible"]) == (7, 4)
    else:
        # sources = exo frames, target ego, once per exo camera:
        # a/EXO 0,30 -> both in ego; a/EXO2 60 -> in ego (empty mask, still "exists"); b/EXO 0 (yes), 30 (no)
        assert (m["n_samples"], m["n_gt_visible"]) == (5, 4)


def _single_frame_gt(gt_raw_exo, ego_mask=None, annotated=(0,)):
    ego = ego_mask if ego_mask is not None else _raw_square(EGO, 10, 10, 50)
    return {"version": "xx", "challenge": "xx", "annotations": {"t": {
        "masks": {"o": {EGO: {"0": encode_mask(ego)}, EXO: {"0": encode_mask(gt_raw_exo)}}},
        "subsample_idx": [0],
        "annotated_frames": {"o": {EGO: list(annotated), EXO: list(annotated)}}}}}


def _single_frame_pred(mask, conf=0.9, direction="ego2exo"):
    pair = f"{EGO}_{EXO}" if direction == "ego2exo" else f"{EXO}_{EGO}"
    return {M.TASK_KEYS[direction]: {"results": {"t": {"subsample_idx": [0], "masks": {"o": {
        pair: {"0": {"pred_mask": encode_mask(mask), "confidence": conf}}}}}}}}


def test_official_shifted_exo_prediction_by_hand():
    # GT exo square 200x200 raw at (120, 200) -> 100x100 at (60, 100) at 270x480;
    # prediction shifted 20 px right: IoU 2/3, CA (2*(81+5)+2*5)/400 (radius 5), LE 20/NORM
    gt = _single_frame_gt(_raw_square(EXO, 120, 200, 200))
    pred = _single_frame_pred(_square((270, 480), 60, 120))
    rep = M.score_official(gt, pred, "ego2exo")
    assert rep.valid
    assert rep.metrics["iou"] == pytest.approx(2 / 3, abs=1e-9)
    assert rep.metrics["contour_accuracy"] == pytest.approx(182 / 400, abs=1e-12)
    assert rep.metrics["location_error"] == pytest.approx(20 / NORM, abs=1e-15)
    assert rep.metrics["balanced_accuracy"] == 1.0
    # confidence 0.5 is not > 0.5: predicted invisible -> BA over class 1 only = 0
    rep = M.score_official(gt, _single_frame_pred(_square((270, 480), 60, 120), conf=0.5), "ego2exo")
    assert rep.metrics["balanced_accuracy"] == 0.0
    assert rep.metrics["iou"] == pytest.approx(2 / 3, abs=1e-9)  # IoU ignores the confidence


def test_official_frames_outside_annotated_frames_are_skipped():
    gt = _single_frame_gt(_raw_square(EXO, 120, 200, 200), annotated=(30,))
    rep = M.score_official(gt, _single_frame_pred(np.zeros((270, 480), np.uint8)), "ego2exo")
    assert rep.valid and rep.metrics["n_samples"] == 0 and math.isnan(rep.metrics["iou"])


def test_official_empty_gt_key_counts_as_visible():
    gt = _single_frame_gt(_blank(EXO))
    rep = M.score_official(gt, _single_frame_pred(np.zeros((270, 480), np.uint8), conf=0.0), "ego2exo")
    m = rep.metrics
    # GT key exists (empty mask): scored; empty vs empty -> IoU 1, CA 1, LE 0; visible but predicted not
    assert (m["n_samples"], m["n_gt_visible"]) == (1, 1)
    assert (m["iou"], m["contour_accuracy"], m["location_error"], m["balanced_accuracy"]) == (1.0, 1.0, 0.0, 0.0)


def test_official_ego_target_480_and_full_mask():
    # exo->ego with a full-frame ego GT: an empty prediction gets IoU 0, CA 1 (no boundary at all)
    # and LE from the swapped empty centre: GT box centre (239+480, 239+480), empty (720, 720)
    gt = _single_frame_gt(_raw_square(EXO, 0, 0, 50), ego_mask=np.ones(EGO_RAW, np.uint8))
    rep = M.score_official(gt, _single_frame_pred(np.zeros((480, 480), np.uint8), conf=0.1, direction="exo2ego"), "exo2ego")
    m = rep.metrics
    assert m["iou"] == 0.0 and m["contour_accuracy"] == 1.0
    assert m["location_error"] == pytest.approx(math.hypot(1, 1) / NORM, abs=1e-15)


def _issues(rep, level="error"):
    return [i for i in rep.issues if i.level == level]


def test_official_invalid_predictions_are_located(small_gt):
    good = _perfect_predictions(small_gt, "ego2exo")
    res = good["ego-exo"]["results"]["take1"]["masks"]
    pair_a = f"{EGO}_{EXO}"
    del res["obj_a"][pair_a]["30"]  # missing frame
    res["obj_a"][f"{EGO}_{EXO2}"]["0"]["pred_mask"] = {"size": [270, 480], "counts": "bad~"}  # bad RLE
    res["obj_a"][f"{EGO}_{EXO2}"]["30"]["pred_mask"] = encode_mask(np.zeros((480, 480), np.uint8))  # wrong size, no GT
    res["obj_a"][f"{EGO}_{EXO2}"]["60"]["pred_mask"] = encode_mask(np.zeros((480, 480), np.uint8))  # wrong size vs GT
    res["obj_a"][pair_a]["0"]["confidence"] = "high"
    del res["obj_b"][f"{EGO}_{EXO}"]  # missing pair
    rep = M.score_official(small_gt, good, "ego2exo")
    assert not rep.valid and rep.metrics is None
    errs = {(i.obj, i.pair, i.frame): i.message for i in _issues(rep)}
    assert "frame missing" in errs[("obj_a", pair_a, "30")]
    assert "invalid character" in errs[("obj_a", f"{EGO}_{EXO2}", "0")]
    assert "480x480" in errs[("obj_a", f"{EGO}_{EXO2}", "60")] and "270x480" in errs[("obj_a", f"{EGO}_{EXO2}", "60")]
    assert "confidence" in errs[("obj_a", pair_a, "0")]
    assert "camera pair missing" in errs[("obj_b", f"{EGO}_{EXO}", None)]
    assert all(i.take == "take1" for i in _issues(rep))
    warns = {(i.obj, i.pair, i.frame) for i in _issues(rep, "warning")}
    assert ("obj_a", f"{EGO}_{EXO2}", "30") in warns  # wrong size on a frame without GT: not fatal officially
    s = str(_issues(rep)[0])
    assert s.startswith("error: pred take=take1 object=obj_a")


def test_official_missing_take_object_and_direction(small_gt):
    rep = M.score_official(small_gt, _perfect_predictions(small_gt, "exo2ego"), "ego2exo")
    assert not rep.valid and 'no "ego-exo" entry' in rep.errors[0].message
    p = _perfect_predictions(small_gt, "ego2exo")
    del p["ego-exo"]["results"]["take1"]["masks"]["obj_b"]
    rep = M.score_official(small_gt, p, "ego2exo")
    assert any(i.obj == "obj_b" and "object missing" in i.message for i in rep.errors)
    assert any("1 objects, GT has 2" in i.message for i in rep.errors)
    p["ego-exo"]["results"] = {"other": {"masks": {}, "subsample_idx": []}}
    rep = M.score_official(small_gt, p, "ego2exo")
    msgs = {(i.take, i.message) for i in rep.errors}
    assert ("take1", "take missing from the predictions") in msgs and ("other", "take is not in the GT") in msgs
    rep = M.score_official(small_gt, {"ego-exo": {"results": {}}}, "ego2exo", subset=True)
    assert rep.valid and rep.metrics["n_samples"] == 0


# ----------------------------------------------------------------------------- LM-EEC protocol


def _write_frame_preds(root, take, src, tgt, obj, frames):
    d = os.path.join(root, take, f"{src}__{tgt}", obj)
    os.makedirs(d, exist_ok=True)
    for f, m in frames.items():
        with open(os.path.join(d, f"{f}.json"), "w") as fh:
            json.dump(encode_mask(m), fh)


def test_lmeec_protocol_directory(small_gt, tmp_path):
    pred = str(tmp_path / "pred")
    # obj_a, EGO->EXO: GT "0" = raw 200x200 square at (100, 200) of 540x960 -> squashed 480x480:
    # rows 100..299 -> 89..266 (178 rows: d*540//480 in [100, 300)), cols 200..399 -> 100..199 (100)
    gt0 = M.resize_nearest_cv2(decode_rle(small_gt["annotations"]["take1"]["masks"]["obj_a"][EXO]["0"]), (480, 480))
    assert gt0.sum() == 178 * 100
    small = np.zeros((480, 480), np.uint8)
    small[0, :230] = 1  # 230 px <= 0.001*480*480 = 230.4 -> confidence 0
    _write_frame_preds(pred, "take1", EGO, EXO, "obj_a", {"0": gt0, "30": small, "60": np.zeros((480, 480), np.uint8)})
    rep = M.score_lmeec(small_gt, pred, "ego2exo")
    assert rep.valid, [str(i) for i in rep.errors]
    m = rep.metrics
    # frame 0: GT visible, predicted visible, perfect; frame 30: GT key but empty mask -> NOT visible
    # in LM-EEC's protocol; prediction 230 px -> conf 0; frame 60: no GT key, empty prediction
    assert (m["n_samples"], m["n_gt_visible"], m["n_pred_visible"]) == (3, 1, 1)
    assert m["iou"] == pytest.approx(1.0, abs=1e-9) and m["contour_accuracy"] == 1.0 and m["location_error"] == 0.0
    assert m["balanced_accuracy"] == 1.0
    # pairs without predictions are not scored, but reported
    assert any("have no predictions" in i.message for i in rep.warnings)
    # 231 px crosses the area threshold -> predicted visible on a GT-invisible frame
    small[0, 230] = 1
    _write_frame_preds(pred, "take1", EGO, EXO, "obj_a", {"30": small})
    m = M.score_lmeec(small_gt, pred, "ego2exo").metrics
    assert m["n_pred_visible"] == 2 and m["balanced_accuracy"] == pytest.approx((1 + 1 / 2) / 2)


def test_lmeec_protocol_merged_file_and_errors(small_gt, tmp_path):
    pred = str(tmp_path / "pred")
    gt0 = M.resize_nearest_cv2(decode_rle(small_gt["annotations"]["take1"]["masks"]["obj_b"][EXO]["0"]), (480, 480))
    # merge_pred.py layout: <take>/annotations.json with "<src>__<tgt>" keys
    os.makedirs(os.path.join(pred, "take1"))
    with open(os.path.join(pred, "take1", "annotations.json"), "w") as f:
        json.dump({"masks": {"obj_b": {f"{EGO}__{EXO}": {"0": encode_mask(np.roll(gt0, 10, axis=1))}}}}, f)
    m = M.score_lmeec(small_gt, pred, "ego2exo").metrics
    # GT: raw rows 440..539 -> squashed 392..479 (88 rows), cols 860..959 -> 430..479 (50 cols), touching
    # the corner; rolled 10 px right wraps 10 columns to the left edge: overlap 40 of 88 cols... in px:
    inter, union = 88 * 40, 88 * 60
    assert m["iou"] == pytest.approx(inter / union, abs=1e-9)
    # a 270x480 mask where LM-EEC compares 480x480 -> error with its location
    _write_frame_preds(pred, "take1", EGO, EXO, "obj_b", {"0": np.zeros((270, 480), np.uint8)})
    rep = M.score_lmeec(small_gt, pred, "ego2exo")
    (err,) = rep.errors
    assert (err.take, err.obj, err.pair, err.frame) == ("take1", "obj_b", f"{EGO}_{EXO}", "0")
    assert "270x480" in err.message and err.source.endswith("0.json")
    # a merged results JSON (merge_results.py layout) is read too
    merged = {"ego-exo": {"version": "xx", "challenge": "xx", "results": {"take1": {"subsample_idx": [], "masks": {
        "obj_b": {f"{EGO}_{EXO}": {"0": {"pred_mask": encode_mask(gt0), "confidence": 1}}}}}}}}
    path = str(tmp_path / "merged.json")
    with open(path, "w") as f:
        json.dump(merged, f)
    rep = M.score_lmeec(small_gt, path, "ego2exo")
    assert rep.valid and rep.metrics["n_samples"] == 1 and rep.metrics["contour_accuracy"] == 1.0


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, capsys):
    from eval.__main__ import main

    split = str(tmp_path / "split")
    _write_split(split, _small_split())
    gt_path = str(tmp_path / "gt.json")
    assert main(["build-gt", "--data", split, "--out", gt_path]) == 0
    with open(gt_path) as f:
        gt = json.load(f)
    assert gt["annotations"]["take1"]["annotated_frames"]["obj_a"][EGO] == [0, 30, 60]

    pred_path = str(tmp_path / "pred.json")
    with open(pred_path, "w") as f:
        json.dump(_perfect_predictions(gt, "exo2ego"), f)
    out = str(tmp_path / "out" / "scores.json")
    capsys.readouterr()
    assert main(["score", "--gt", gt_path, "--pred", pred_path, "--direction", "exo2ego",
                 "--protocol", "official", "--json", out]) == 0
    text = capsys.readouterr().out
    assert "IoU" in text and "100.00" in text
    with open(out) as f:
        s = json.load(f)
    assert s["iou"] == pytest.approx(1.0, abs=1e-9) and s["balanced_accuracy"] == 1.0
    assert s["contour_accuracy"] == 1.0 and s["location_error"] == 0.0 and s["valid"] is True
    assert s["counts"]["takes"] == 1 and s["n_samples"] == 5

    # invalid predictions: exit 1, located messages on stderr, no traceback
    bad = _perfect_predictions(gt, "exo2ego")
    del bad["exo-ego"]["results"]["take1"]["masks"]["obj_a"][f"{EXO}_{EGO}"]["0"]
    with open(pred_path, "w") as f:
        json.dump(bad, f)
    assert main(["score", "--gt", gt_path, "--pred", pred_path, "--direction", "exo2ego", "--json", out]) == 1
    err = capsys.readouterr().err
    assert f"take=take1 object=obj_a pair={EXO}_{EGO} frame=0: frame missing" in err and "INVALID" in err
    with open(out) as f:
        s = json.load(f)
    assert s["valid"] is False and "iou" not in s and s["issues"][0]["frame"] == "0"

    # wrong direction key, and a missing file: clean errors
    assert main(["score", "--gt", gt_path, "--pred", pred_path, "--direction", "ego2exo"]) == 1
    assert main(["score", "--gt", gt_path, "--pred", str(tmp_path / "nope.json"), "--direction", "ego2exo"]) == 1
    assert "not found" in capsys.readouterr().err

    # LM-EEC protocol on a prediction directory
    pred_dir = str(tmp_path / "pred_dir")
    gt0 = M.resize_nearest_cv2(decode_rle(gt["annotations"]["take1"]["masks"]["obj_a"][EXO]["0"]), (480, 480))
    _write_frame_preds(pred_dir, "take1", EGO, EXO, "obj_a", {"0": gt0})
    assert main(["score", "--gt", gt_path, "--pred", pred_dir, "--direction", "ego2exo", "--protocol", "lmeec",
                 "--json", out]) == 0
    with open(out) as f:
        s = json.load(f)
    assert s["protocol"] == "lmeec" and s["n_samples"] == 1 and s["iou"] == pytest.approx(1.0, abs=1e-9)
    # the official protocol refuses a directory
    assert main(["score", "--gt", gt_path, "--pred", pred_dir, "--direction", "ego2exo"]) == 1
