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


# ----------------------------------------------------------------------------- full-resolution masks
#
# The reference (training/dataset/EgoExo_transforms.py with the finetune yaml) keeps the
# annotation's full-resolution masks (2x / 4x the processed JPEGs): RandomHorizontalFlip,
# RandomAffine (F.affine on the mask tensor, nearest, fill 0, about the mask's own centre;
# the frame-0 "vanished" check on that mask), then RandomResizeAPI (F.resize of the uint8
# tensor: float32 antialiased bilinear, torch.round) straight to the square size.


class _Scripted:
    """A numpy Generator stand-in whose first ``random``/``uniform`` draws are given."""

    def __init__(self, values, rest):
        self.values, self.rest = list(values), rest

    def random(self):
        return self.values.pop(0) if self.values else self.rest.random()

    def uniform(self, lo, hi):
        return self.values.pop(0) if self.values else self.rest.uniform(lo, hi)

    def permutation(self, n):
        return self.rest.permutation(n)


def _blob_masks(rng, T, hw, corner=False):
    """[T, h, w] 0/1 ellipses (moving a little frame to frame); ``corner``: a small blob in
    the top-left corner, which a rotation usually pushes out of the image."""
    h, w = hw
    Y, X = np.ogrid[:h, :w]
    out = np.zeros((T, h, w), np.uint8)
    for t in range(T):
        if corner:
            cy, cx, ry, rx = 1.5, 1.5, 2.0, 2.0
        else:
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        out[t] = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 < 1
    return out


def _full_res_clip(seed, T=2, ego_hw=(44, 44), exo_hw=(27, 48), scale=(2, 4), exo_corner=False):
    rng = np.random.default_rng(seed)
    ego = rng.integers(0, 256, (T,) + ego_hw + (3,), dtype=np.uint8)
    exo = rng.integers(0, 256, (T,) + exo_hw + (3,), dtype=np.uint8)
    em = _blob_masks(rng, T, (ego_hw[0] * scale[0], ego_hw[1] * scale[0]))
    xm = _blob_masks(rng, T, (exo_hw[0] * scale[1], exo_hw[1] * scale[1]), corner=exo_corner)
    return dict(ego_frames=ego, ego_masks=em, exo_frames=exo, exo_masks=xm)


def test_resize_mask_matches_torch_interpolate():
    """resize_mask == torchvision's F.resize of a uint8 tensor = float32 F.interpolate(bilinear,
    antialias=True) + torch.round, on the sizes of the data (full-resolution masks -> 480)
    and on random ones (e.g. 141 -> 135, where the tap range needs float32 arithmetic)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    shapes = [((1408, 1408), 480), ((2160, 3840), 480), ((540, 960), 480), ((704, 704), 480), ((70, 141), 135)]
    shapes += [((int(rng.integers(5, 150)), int(rng.integers(5, 150))), int(rng.integers(4, 160))) for _ in range(40)]
    for (h, w), S in shapes:
        m = _blob_masks(rng, 1, (h, w))[0]
        if h * w < 40000:
            m &= (rng.random((h, w)) < 0.8).astype(np.uint8)
        m = A.affine_mask(m, A.AffineParams(float(rng.uniform(-25, 25)), float(rng.uniform(-20, 20))))
        t = torch.from_numpy(m)[None, None].float()
        ref = torch.nn.functional.interpolate(t, (S, S), mode="bilinear", align_corners=False, antialias=True)
        np.testing.assert_array_equal(A.resize_mask(m, S), torch.round(ref)[0, 0].to(torch.uint8).numpy(),
                                      err_msg=f"{h}x{w} -> {S}")
    z = np.zeros((3, 2, 50, 70), np.uint8)  # leading dims, empty masks
    assert A.resize_mask(z, 16).shape == (3, 2, 16, 16) and not A.resize_mask(z, 16).any()


def _affine_mask_full_grid(mask, p):
    """Oracle: torchvision's _gen_affine_grid + grid_sample(nearest, fill 0) over every pixel."""
    h, w = mask.shape[-2:]
    f32 = np.float32
    th = np.asarray(A.inverse_affine_matrix((0.0, 0.0), p.angle, (p.shear_x, p.shear_y)), f32).reshape(2, 3)
    X, Y = np.meshgrid(np.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, dtype=f32),
                       np.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, dtype=f32))
    gx = X * (th[0, 0] / f32(0.5 * w)) + Y * (th[0, 1] / f32(0.5 * w)) + th[0, 2] / f32(0.5 * w)
    gy = X * (th[1, 0] / f32(0.5 * h)) + Y * (th[1, 1] / f32(0.5 * h)) + th[1, 2] / f32(0.5 * h)
    xi = np.rint(((gx + f32(1)) * f32(w) - f32(1)) / f32(2))
    yi = np.rint(((gy + f32(1)) * f32(h) - f32(1)) / f32(2))
    inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    out = mask[..., np.where(inside, yi, 0).astype(int), np.where(inside, xi, 0).astype(int)]
    return np.where(inside, out, 0).astype(mask.dtype)


def test_affine_mask_bounding_box_is_exact():
    """affine_mask computes only the output pixels that can reach the non-zero bounding box;
    the result equals the computation over every pixel."""
    rng = np.random.default_rng(4)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(5, 120, 2))
        m = np.zeros((2, h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[:, y0:y0 + int(rng.integers(1, h)), x0:x0 + int(rng.integers(1, w))] = 1
        m[1] &= (rng.random((h, w)) < 0.7).astype(np.uint8)
        p = A.AffineParams(float(rng.uniform(-25, 25)), float(rng.uniform(-20, 20)))
        np.testing.assert_array_equal(A.affine_mask(m, p), _affine_mask_full_grid(m, p))


def test_full_resolution_masks_are_transformed_at_their_own_size():
    """Masks larger than their frames: flip, affine at the mask's size, one resize to
    ``size`` (no nearest resize to the frame size first)."""
    clip = _full_res_clip(0)
    cfg = A.AugmentConfig(size=32, **NO_COLOUR)
    ang, sh = 11.0, -7.0
    out = A.augment_clip(clip, _Scripted([0.1, ang, sh], np.random.default_rng(0)), cfg)  # flip, affine
    for v in A.VIEWS:
        m = clip[f"{v}_masks"][..., ::-1]
        want = A.resize_mask(A.affine_mask(m, A.AffineParams(ang, sh)), 32)
        np.testing.assert_array_equal(out[f"{v}_masks"], want)
        assert out[f"{v}_masks"].shape == (2, 32, 32) and out[f"{v}_frames"].shape == (2, 32, 32, 3)
    # the old order (nearest to the frame size first) gives other masks
    old = A.resize_mask(A.affine_mask(np.stack([np.asarray(Image.fromarray(x).resize((48, 27), Image.NEAREST))
                                                for x in clip["exo_masks"][..., ::-1]]), A.AffineParams(ang, sh)), 32)
    assert not np.array_equal(old, out["exo_masks"])


def _reference_transforms():
    """LM-EEC's training/dataset/EgoExo_transforms.py (needs torchvision and the checkout,
    ``LMEEC_REF``), loaded with a stub for its datapoint classes (only used in type hints)."""
    import importlib.util
    import os
    import sys
    import types

    _torchvision()
    root = os.environ.get("LMEEC_REF", "/tmp/ref/juneyeeHu+LM-EEC")
    path = os.path.join(root, "training", "dataset", "EgoExo_transforms.py")
    if not os.path.isfile(path):
        pytest.skip(f"no LM-EEC checkout at {root} (set LMEEC_REF)")
    stub = types.ModuleType("training.utils.data_utils")
    stub.VideoDatapoint = stub.EgoExoVideoDatapoint = object
    saved = {k: sys.modules.get(k) for k in ("training", "training.utils", "training.utils.data_utils")}
    sys.modules.update({"training": types.ModuleType("training"), "training.utils": types.ModuleType("training.utils"),
                        "training.utils.data_utils": stub})
    try:
        spec = importlib.util.spec_from_file_location("_lmeec_ref_egoexo_transforms", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


@pytest.mark.parametrize("seed,exo_corner", [(0, False), (1, False), (2, False), (3, True), (4, False)])
def test_geometry_matches_reference_transforms(seed, exo_corner):
    """Flip + affine + square resize of the reference's ComposeAPI (finetune yaml parameters)
    on PIL frames and full-resolution uint8 tensor masks vs augment_clip with the same draws:
    masks and frames identical (colour steps off here; their parity is tested above)."""
    import random
    from types import SimpleNamespace

    R = _reference_transforms()
    import torch
    import torchvision.transforms as T

    S = 32
    clip = _full_res_clip(seed, exo_corner=exo_corner)
    # the reference's draws: python random (flip), torch (angle, shear)
    random.seed(seed)
    torch.manual_seed(seed)
    u = random.random()
    angle, _, _, shear = T.RandomAffine.get_params([-25.0, 25.0], None, None, [-20.0, 20.0], [44, 44])
    random.seed(seed)
    torch.manual_seed(seed)

    def frames(v):
        return [SimpleNamespace(data=Image.fromarray(f), objects=[SimpleNamespace(segment=torch.from_numpy(m.copy()))])
                for f, m in zip(clip[f"{v}_frames"], clip[f"{v}_masks"])]

    dp = SimpleNamespace(ego_frames=frames("ego"), exo_frames=frames("exo"))
    for t in (R.RandomHorizontalFlip(consistent_transform=True),
              R.RandomAffine(degrees=25, consistent_transform=True, shear=20, image_interpolation="bilinear",
                             log_warning=False),
              R.RandomResizeAPI(sizes=S, consistent_transform=True, square=True)):
        dp = t(dp)

    cfg = A.AugmentConfig(size=S, **NO_COLOUR)
    out = A.augment_clip(clip, _Scripted([u, angle, shear[0]], np.random.default_rng(seed)), cfg)
    for v in A.VIEWS:
        ref_m = np.stack([fr.objects[0].segment.numpy() for fr in getattr(dp, f"{v}_frames")])
        ref_f = A.normalize(np.stack([np.asarray(fr.data) for fr in getattr(dp, f"{v}_frames")]))
        np.testing.assert_array_equal(out[f"{v}_masks"], ref_m, err_msg=v)
        np.testing.assert_array_equal(out[f"{v}_frames"], ref_f, err_msg=v)
    flipped = clip["exo_masks"][..., ::-1] if u < 0.5 else clip["exo_masks"]
    skipped = not A.affine_mask(flipped[0], A.AffineParams(angle, shear[0])).any()
    assert skipped == exo_corner  # the corner case exercises the skip rule (exo left untransformed)
    if skipped:
        np.testing.assert_array_equal(out["exo_masks"], A.resize_mask(flipped, S))


def test_pipeline_augments_full_resolution_masks(tmp_path):
    """ClipSampler hands the annotation's full-resolution masks (here 2x / 4x the JPEGs) to
    augment_clip unchanged: its clip equals augment_clip of (JPEGs, decoded RLE masks)."""
    import json

    from pycocotools import mask as mask_utils

    from lmeec_jax.data.egoexo import list_train_videos
    from lmeec_jax.data.pipeline import ClipSampler, ClipSpec

    rng = np.random.default_rng(8)
    take = tmp_path / "take0"
    cams = {"aria01": ((40, 40), 2), "cam01": ((24, 40), 4)}
    names = ["0", "30", "60"]
    ann, full = {"masks": {"obj": {}}, "subsample_idx": [0, 30, 60]}, {}
    for cam, ((h, w), s) in cams.items():
        (take / cam).mkdir(parents=True)
        ms = _blob_masks(rng, len(names), (h * s, w * s))
        full[cam] = ms
        ann["masks"]["obj"][cam] = {}
        for f, m in zip(names, ms):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(take / cam / f"{f}.jpg")
            rle = mask_utils.encode(np.asfortranarray(m))
            ann["masks"]["obj"][cam][f] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    (take / "annotation.json").write_text(json.dumps(ann))

    recs = list_train_videos(str(tmp_path), num_frames=2)
    spec = ClipSpec(num_frames=2, augment=A.AugmentConfig(size=32))
    sampler = ClipSampler(str(tmp_path), recs, spec, seed=5, multiplier=1, global_batch=1, host_batch=1)
    got = sampler(0)

    r = np.random.default_rng([5, 0])
    rec = recs[sampler.video_of(0)]
    start = sampler._sample_start(rec, r)
    fr = names[start:start + 2]
    clip = {}
    for v, cam in (("ego", rec.src_cam), ("exo", rec.tgt_cam)):
        clip[f"{v}_frames"] = np.stack([np.asarray(Image.open(take / cam / f"{f}.jpg").convert("RGB")) for f in fr])
        clip[f"{v}_masks"] = full[cam][start:start + 2]
    want = A.augment_clip(clip, r, spec.augment)
    np.testing.assert_array_equal(got["src_masks"], want["ego_masks"])
    np.testing.assert_array_equal(got["tgt_masks"], want["exo_masks"])
    np.testing.assert_array_equal(got["src_images"], want["ego_frames"])
    np.testing.assert_array_equal(got["tgt_images"], want["exo_frames"])
