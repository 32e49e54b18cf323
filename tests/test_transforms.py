"""Training augmentations (lmeec_jax.data.transforms): determinism from the seed, the same
geometry on every frame and both views, the first-mask-vanishes affine skip rule, output
format; plus torchvision parity of the single operations when torchvision is importable."""

import numpy as np
import pytest
from PIL import Image

from lmeec_jax.data import transforms as A

NO_COLOUR = dict(jitter=(0.0, 0.0, 0.0), grayscale_p=0.0, jitter_per_frame=(0.0, 0.0, 0.0))


def make_clip(T=3, ego_hw=(24, 24), exo_hw=(18, 32), n_obj=None, seed=0):
    rng = np.random.default_rng(seed)
    ego = rng.integers(0, 256, (T,) + ego_hw + (3,), dtype=np.uint8)
    exo = rng.integers(0, 256, (T,) + exo_hw + (3,), dtype=np.uint8)
    lead = (T,) if n_obj is None else (T, n_obj)
    em = np.zeros(lead + ego_hw, np.uint8)
    xm = np.zeros(lead + exo_hw, np.uint8)
    em[..., 6:16, 5:14] = 1
    xm[..., 4:12, 10:25] = 1
    return dict(ego_frames=ego, ego_masks=em, exo_frames=exo, exo_masks=xm, take="t0")


def test_deterministic_from_seed():
    clip = make_clip()
    cfg = A.AugmentConfig(size=16)
    a = A.augment_clip(clip, np.random.default_rng(7), cfg)
    b = A.augment_clip(clip, np.random.default_rng(7), cfg)
    for k in ("ego_frames", "ego_masks", "exo_frames", "exo_masks"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["take"] == "t0"
    c = A.augment_clip(clip, np.random.default_rng(8), cfg)
    assert not np.array_equal(a["ego_frames"], c["ego_frames"])
    # the input is not modified
    np.testing.assert_array_equal(clip["ego_masks"], make_clip()["ego_masks"])


def test_output_format():
    clip = make_clip(n_obj=2)
    out = A.augment_clip(clip, np.random.default_rng(0), A.AugmentConfig(size=20))
    for v in ("ego", "exo"):
        assert out[f"{v}_frames"].shape == (3, 20, 20, 3) and out[f"{v}_frames"].dtype == np.float32
        assert out[f"{v}_masks"].shape == (3, 2, 20, 20) and out[f"{v}_masks"].dtype == np.uint8
        assert set(np.unique(out[f"{v}_masks"])) <= {0, 1}
    with pytest.raises(ValueError):
        A.augment_clip(dict(clip, ego_frames=clip["ego_frames"].astype(np.float32)), np.random.default_rng(0))


def test_hflip_flips_every_frame_and_both_views():
    clip = make_clip()
    cfg = A.AugmentConfig(size=24, hflip_p=1.0, affine_degrees=0.0, affine_shear=0.0, **NO_COLOUR)
    cfg_exo = A.AugmentConfig(size=24, hflip_p=0.0, affine_degrees=0.0, affine_shear=0.0, **NO_COLOUR)
    out = A.augment_clip(clip, np.random.default_rng(0), cfg)
    # ego is already 24x24: resize is the identity, so the result is exactly the flip
    np.testing.assert_array_equal(out["ego_masks"], clip["ego_masks"][..., ::-1])
    np.testing.assert_allclose(out["ego_frames"], A.normalize(clip["ego_frames"][:, :, ::-1]), atol=1e-6)
    # exo is resized too: compare with resizing the flipped input without flipping
    flipped = A.hflip_clip(clip)
    ref = A.augment_clip(flipped, np.random.default_rng(0), cfg_exo)
    np.testing.assert_array_equal(out["exo_masks"], ref["exo_masks"])
    np.testing.assert_allclose(out["exo_frames"], ref["exo_frames"], atol=1e-6)
    assert not np.array_equal(out["exo_masks"], A.augment_clip(clip, np.random.default_rng(0), cfg_exo)["exo_masks"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_geometry_on_all_frames_and_both_views(seed):
    # identical frames/masks everywhere: any per-frame or per-view geometry would show up
    rng = np.random.default_rng(100)
    frame = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    mask = np.zeros((30, 30), np.uint8)
    mask[8:22, 10:20] = 1
    T = 4
    clip = dict(
        ego_frames=np.stack([frame] * T), ego_masks=np.stack([mask] * T),
        exo_frames=np.stack([frame] * T), exo_masks=np.stack([mask] * T),
    )
    cfg = A.AugmentConfig(size=20, jitter_per_frame=(0.0, 0.0, 0.0))  # consistent jitter/grayscale stay on
    out = A.augment_clip(clip, np.random.default_rng(seed), cfg)
    for v in ("ego", "exo"):
        for t in range(T):
            np.testing.assert_array_equal(out[f"{v}_masks"][t], out["ego_masks"][0])
            np.testing.assert_array_equal(out[f"{v}_frames"][t], out["ego_frames"][0])
    # and the geometry really changed something
    plain = A.augment_clip(clip, np.random.default_rng(seed), A.AugmentConfig(
        size=20, hflip_p=0.0, affine_degrees=0.0, affine_shear=0.0, **NO_COLOUR))
    assert not np.array_equal(out["ego_masks"], plain["ego_masks"])


def test_per_frame_jitter_differs_between_frames_and_views():
    frame = np.full((8, 8, 3), 120, np.uint8)
    frame[:, :4] = 60
    clip = dict(ego_frames=np.stack([frame] * 3), ego_masks=np.ones((3, 8, 8), np.uint8),
                exo_frames=np.stack([frame] * 3), exo_masks=np.ones((3, 8, 8), np.uint8))
    cfg = A.AugmentConfig(size=8, hflip_p=0.0, affine_degrees=0.0, affine_shear=0.0, grayscale_p=0.0)
    out = A.augment_clip(clip, np.random.default_rng(0), cfg)
    frames = [out["ego_frames"][t] for t in range(3)] + [out["exo_frames"][t] for t in range(3)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert not np.array_equal(frames[i], frames[j])


def test_affine_mask_geometry():
    m = np.zeros((9, 9), np.uint8)
    m[4, 4] = 1
    # the centre pixel of an odd image stays under any rotation/shear
    np.testing.assert_array_equal(A.affine_mask(m, A.AffineParams(23.0, -11.0)), m)
    # identity
    r = np.random.default_rng(0).integers(0, 2, (2, 7, 10)).astype(np.uint8)
    np.testing.assert_array_equal(A.affine_mask(r, A.AffineParams(0.0, 0.0)), r)
    # 90 degrees maps the square grid onto itself (a rotation of the array)
    q = np.random.default_rng(1).integers(0, 2, (8, 8)).astype(np.uint8)
    out = A.affine_mask(q, A.AffineParams(90.0, 0.0))
    assert any(np.array_equal(out, np.rot90(q, k)) for k in (1, 3))


def _corner_clip(ego_corner: bool, exo_corner: bool, exo_empty=False):
    clip = make_clip(T=2, ego_hw=(20, 20), exo_hw=(20, 20))
    if ego_corner:
        clip["ego_masks"][:] = 0
        clip["ego_masks"][:, 0, 0] = 1
    if exo_corner:
        clip["exo_masks"][:] = 0
        clip["exo_masks"][:, 0, 0] = 1
    if exo_empty:
        clip["exo_masks"][0] = 0
    return clip


P = A.AffineParams(20.0, 0.0)  # a corner pixel rotates out of the frame


def test_first_mask_vanishing_skips_the_affine():
    cfg = A.AugmentConfig()
    base = _corner_clip(False, False)
    out = A.random_affine(base, P, cfg)
    for v in ("ego", "exo"):
        assert not np.array_equal(out[f"{v}_masks"], base[f"{v}_masks"])
        assert not np.array_equal(out[f"{v}_frames"], base[f"{v}_frames"])

    # ego frame-0 mask vanishes: nothing is transformed (both modes)
    clip = _corner_clip(True, False)
    assert A.affine_mask(clip["ego_masks"][0], P).max() == 0
    for mode in ("reference", "both"):
        out = A.random_affine(clip, P, A.AugmentConfig(affine_skip=mode))
        for v in ("ego", "exo"):
            np.testing.assert_array_equal(out[f"{v}_masks"], clip[f"{v}_masks"])
            np.testing.assert_array_equal(out[f"{v}_frames"], clip[f"{v}_frames"])

    # only the exo frame-0 mask vanishes (here: the exo target is absent on frame 0)
    clip = _corner_clip(False, False, exo_empty=True)
    ref = A.random_affine(clip, P, A.AugmentConfig(affine_skip="reference"))
    # reference: ego keeps its affine, exo is left untouched
    np.testing.assert_array_equal(ref["ego_masks"], out_ego := A.affine_mask(clip["ego_masks"], P))
    assert not np.array_equal(out_ego, clip["ego_masks"])
    np.testing.assert_array_equal(ref["exo_masks"], clip["exo_masks"])
    np.testing.assert_array_equal(ref["exo_frames"], clip["exo_frames"])
    both = A.random_affine(clip, P, A.AugmentConfig(affine_skip="both"))
    for v in ("ego", "exo"):
        np.testing.assert_array_equal(both[f"{v}_masks"], clip[f"{v}_masks"])

    # a vanishing mask on a later frame does not matter
    clip = _corner_clip(False, False)
    clip["ego_masks"][1] = 0
    clip["ego_masks"][1, 0, 0] = 1
    out = A.random_affine(clip, P, cfg)
    assert not np.array_equal(out["ego_masks"][0], clip["ego_masks"][0])
    assert out["ego_masks"][1].max() == 0

    # several objects: any one of them vanishing on frame 0 skips
    clip = make_clip(T=2, ego_hw=(20, 20), exo_hw=(20, 20), n_obj=2)
    clip["ego_masks"][:, 1] = 0
    clip["ego_masks"][:, 1, 0, 0] = 1
    out = A.random_affine(clip, P, cfg)
    np.testing.assert_array_equal(out["ego_masks"], clip["ego_masks"])


def test_resize_mask_rounds_antialiased_bilinear():
    m = np.zeros((4, 4), np.uint8)
    m[:, :2] = 1
    # 4 -> 2: each output pixel averages (triangle filter) a 2-wide window: exact 1 / 0
    np.testing.assert_array_equal(A.resize_mask(m, 2), [[1, 0], [1, 0]])
    # a one-pixel column shrinks away (weight < 0.5), a 3-pixel one survives
    m = np.zeros((8, 8), np.uint8)
    m[:, 0] = 1
    assert A.resize_mask(m, 4).max() == 0
    m[:, :3] = 1
    assert A.resize_mask(m, 4)[:, 0].min() == 1


def test_grayscale_and_normalise():
    img = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8))
    g = np.asarray(A.to_grayscale(img))
    assert g.shape == (1, 2, 3) and np.all(g[..., 0] == g[..., 1]) and np.all(g[..., 1] == g[..., 2])
    assert g[0, 0, 0] == 76 and g[0, 1, 0] == 150  # ITU-R 601: 0.299*255, 0.587*255
    x = A.normalize(np.array([[[0, 128, 255]]], np.uint8))
    np.testing.assert_allclose(x[0, 0], [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6)


def test_jitter_sampling_ranges():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = A.sample_jitter(rng, 0.1, 0.03, 0.03)
        assert sorted(p.order) == [0, 1, 2, 3]
        assert 0.9 <= p.brightness <= 1.1 and 0.97 <= p.contrast <= 1.03 and 0.97 <= p.saturation <= 1.03


def _torchvision():
    try:
        import torch
        import torchvision.transforms as T
        import torchvision.transforms.functional as F
    except Exception as e:  # not a dependency; a mismatched wheel may fail in other ways
        pytest.skip(f"torchvision not usable: {e}")
    return torch, T, F


def test_parity_with_torchvision_ops():
    torch, T, F = _torchvision()
    IM = T.InterpolationMode
    rng = np.random.default_rng(0)
    for H, W in ((37, 53), (54, 96)):
        m = (rng.random((H, W)) < 0.3).astype(np.uint8)
        img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        ang, sh = float(rng.uniform(-25, 25)), float(rng.uniform(-20, 20))
        ref = F.affine(torch.from_numpy(m)[None], ang, [0, 0], 1.0, [sh, 0.0], interpolation=IM.NEAREST, fill=0.0)
        np.testing.assert_array_equal(A.affine_mask(m, A.AffineParams(ang, sh)), ref[0].numpy())
        ref = F.affine(img, ang, [0, 0], 1.0, [sh, 0.0], interpolation=IM.BILINEAR, fill=(123, 116, 103))
        np.testing.assert_array_equal(np.asarray(A.affine_image(img, A.AffineParams(ang, sh))), np.asarray(ref))
        ref = F.resize(torch.from_numpy(m)[None, None], (20, 20)).squeeze().numpy()
        np.testing.assert_array_equal(A.resize_mask(m, 20), ref)
        np.testing.assert_array_equal(np.asarray(A.resize_image(img, 20)), np.asarray(F.resize(img, (20, 20))))
        jp = A.JitterParams((2, 0, 3, 1), 1.07, 0.98, 1.02)
        ref = F.adjust_contrast(F.adjust_brightness(F.adjust_saturation(img, 1.02), 1.07), 0.98)
        np.testing.assert_array_equal(np.asarray(A.apply_jitter(img, jp)), np.asarray(ref))
