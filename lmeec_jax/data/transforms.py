"""Training augmentations of LM-EEC (``training/dataset/EgoExo_transforms.py`` + finetune yaml).

Numpy + Pillow, meant to run in data-loader workers; every random draw comes from an explicit
``np.random.Generator``, so a clip's augmentation is a pure function of (clip, seed).

The pipeline, in the reference's order (each "consistent" step uses one draw for all frames of
both views):

1. horizontal flip, p 0.5, all frames of both views;
2. random affine: angle ~ U(-25, 25), x-shear ~ U(-20, 20) (y-shear 0, no translation, scale 1),
   each image rotated about its own centre; images bilinear with fill (123, 116, 103), masks
   nearest with fill 0. If a frame-0 mask of a view becomes empty, that view is not transformed
   (see ``affine_skip``);
3. square resize to ``size`` (PIL bilinear for images; masks: torch's antialiased bilinear on
   0/1 float32 values, then rounded half-to-even, as torchvision's ``F.resize`` does on a uint8
   tensor);
4. colour jitter (brightness 0.1, contrast 0.03, saturation 0.03), one draw for everything; the
   order of the three adjustments is a random permutation as in ``T.ColorJitter.get_params``;
5. grayscale with p 0.05 (PIL ``convert("L")`` replicated to 3 channels), all frames, both views;
6. colour jitter (0.1, 0.05, 0.05), a new draw per frame (ego frames, then exo frames);
7. ``/ 255`` and ImageNet mean/std normalisation.

Images go through Pillow exactly as the reference's PIL path does (``Image.transform`` with the
torchvision inverse-affine matrix, ``Image.resize``, ``ImageEnhance``), so given the same random
parameters the pixels are the reference's.

The clip is a flat dict: ``ego_frames``/``exo_frames`` ``[T, H, W, 3]`` uint8 and
``ego_masks``/``exo_masks`` ``[T, h, w]`` or ``[T, N, h, w]`` (N objects) of 0/1 values; the
two views may have different frame sizes, and a view's masks may have another size than its
frames (the reference keeps the annotation's full-resolution masks: flip, affine about the
mask's own centre and the final resize act on them at that size, the frames at theirs; with
the same aspect ratio the geometry agrees). Other keys pass through unchanged. The output has
``*_frames`` float32 ``[T, size, size, 3]`` (channels last) and ``*_masks`` uint8
``[T, (N,) size, size]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageEnhance

from lmeec_jax.data.images import _aa_weights

__all__ = [
    "AugmentConfig",
    "AffineParams",
    "JitterParams",
    "inverse_affine_matrix",
    "hflip_clip",
    "affine_image",
    "affine_mask",
    "random_affine",
    "resize_image",
    "resize_mask",
    "sample_jitter",
    "apply_jitter",
    "to_grayscale",
    "normalize",
    "augment_clip",
]

VIEWS = ("ego", "exo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 480
    hflip_p: float = 0.5
    affine_degrees: float = 25.0
    affine_shear: float = 20.0
    affine_fill: tuple = (123, 116, 103)
    # "reference": the reference checks ego frame 0 first (empty -> nothing is transformed), then
    #   transforms the ego view in place, then checks exo frame 0 (empty -> the exo view stays
    #   untransformed while ego keeps its affine). "both": all-or-nothing over both views.
    affine_skip: str = "reference"
    jitter: tuple = (0.1, 0.03, 0.03)  # consistent (brightness, contrast, saturation)
    grayscale_p: float = 0.05
    jitter_per_frame: tuple = (0.1, 0.05, 0.05)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


# ----------------------------------------------------------------------------- flip


def hflip_clip(clip: dict) -> dict:
    """Flip every frame and mask of both views horizontally (last spatial axis)."""
    out = dict(clip)
    for v in VIEWS:
        out[f"{v}_frames"] = np.ascontiguousarray(clip[f"{v}_frames"][:, :, ::-1])
        out[f"{v}_masks"] = np.ascontiguousarray(clip[f"{v}_masks"][..., ::-1])
    return out


# ----------------------------------------------------------------------------- affine


@dataclass(frozen=True)
class AffineParams:
    angle: float  # degrees
    shear_x: float  # degrees
    shear_y: float = 0.0


def inverse_affine_matrix(center, angle: float, shear, translate=(0.0, 0.0), scale: float = 1.0):
    """torchvision's ``_get_inverse_affine_matrix``: output (x, y) -> input, as 6 numbers."""
    rot = math.radians(angle)
    sx = math.radians(shear[0])
    sy = math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m = [x / scale for x in m]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def affine_image(img: Image.Image, p: AffineParams, fill=(123, 116, 103)) -> Image.Image:
    """torchvision ``F.affine`` on a PIL image (centre = (w/2, h/2)), bilinear."""
    w, h = img.size
    m = inverse_affine_matrix((w * 0.5, h * 0.5), p.angle, (p.shear_x, p.shear_y))
    return img.transform((w, h), Image.AFFINE, m, Image.BILINEAR, fillcolor=tuple(int(f) for f in fill))


def affine_mask(mask: np.ndarray, p: AffineParams) -> np.ndarray:
    """torchvision ``F.affine`` on a tensor mask, nearest, fill 0 (grid_sample semantics).

    ``mask``: ``[..., H, W]``; the same transform is applied to every leading index, about
    the mask's own centre. Only the output pixels that can land on the non-zero pixels'
    bounding box are computed (the rest are 0, as in the full computation, whose per-pixel
    float32 arithmetic is the same): full-resolution masks are mostly background.
    """
    h, w = mask.shape[-2:]
    out = np.zeros(mask.shape, mask.dtype)
    flat = mask.reshape((-1, h, w))
    rows, cols = np.flatnonzero(flat.any(axis=(0, 2))), np.flatnonzero(flat.any(axis=(0, 1)))
    if rows.size == 0:
        return out
    m = inverse_affine_matrix((0.0, 0.0), p.angle, (p.shear_x, p.shear_y))
    th = np.asarray(m, np.float64).reshape(2, 3)
    # output pixels (centred coordinates) whose source can be in the box, 1 px of slack
    # on the input side (nearest rounding) and 2 on the output side
    cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
    corners = np.array([[x - cx, y - cy] for x in (cols[0] - 1.0, cols[-1] + 1.0)
                        for y in (rows[0] - 1.0, rows[-1] + 1.0)])
    fwd = corners @ np.linalg.inv(th[:, :2]).T  # input -> output (no translation)
    x0 = max(int(np.floor(fwd[:, 0].min() + cx)) - 2, 0)
    x1 = min(int(np.ceil(fwd[:, 0].max() + cx)) + 2, w - 1)
    y0 = max(int(np.floor(fwd[:, 1].min() + cy)) - 2, 0)
    y1 = min(int(np.ceil(fwd[:, 1].max() + cy)) + 2, h - 1)
    if x0 > x1 or y0 > y1:
        return out
    # torchvision's _gen_affine_grid + grid_sample(align_corners=False), in float32 as torch
    f32 = np.float32
    xc = np.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, dtype=f32)[x0:x1 + 1]  # output pixel centres
    yc = np.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, dtype=f32)[y0:y1 + 1]
    X, Y = np.meshgrid(xc, yc)
    th = np.asarray(m, f32).reshape(2, 3)
    hw, hh = f32(0.5 * w), f32(0.5 * h)
    gx = X * (th[0, 0] / hw) + Y * (th[0, 1] / hw) + th[0, 2] / hw  # normalised input coords
    gy = X * (th[1, 0] / hh) + Y * (th[1, 1] / hh) + th[1, 2] / hh
    xi = np.rint(((gx + f32(1)) * f32(w) - f32(1)) / f32(2))  # input index coordinates
    yi = np.rint(((gy + f32(1)) * f32(h) - f32(1)) / f32(2))
    inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    src = np.where(inside, yi * w + xi, 0).astype(np.int64).ravel()
    vals = np.take(flat.reshape(flat.shape[0], h * w), src, axis=1).reshape((flat.shape[0],) + X.shape)
    vals[:, ~inside] = 0
    out.reshape((-1, h, w))[:, y0:y1 + 1, x0:x1 + 1] = vals
    return out


def _affine_view(frames, masks, p: AffineParams, fill):
    imgs = [np.asarray(affine_image(Image.fromarray(f), p, fill)) for f in frames]
    return np.stack(imgs), affine_mask(masks, p)


def _first_masks_survive(masks, p: AffineParams) -> bool:
    """Every object's frame-0 mask is non-empty after the affine."""
    m0 = affine_mask(masks[0], p)
    if m0.ndim == 2:
        return bool(m0.max() != 0)
    return all(bool(m0[i].max() != 0) for i in range(m0.shape[0]))


def random_affine(clip: dict, p: AffineParams, cfg: AugmentConfig) -> dict:
    """Apply ``p`` to both views with the reference's skip rule (``cfg.affine_skip``)."""
    out = dict(clip)
    if cfg.affine_skip == "both":
        if not all(_first_masks_survive(clip[f"{v}_masks"], p) for v in VIEWS):
            return out
        for v in VIEWS:
            out[f"{v}_frames"], out[f"{v}_masks"] = _affine_view(
                clip[f"{v}_frames"], clip[f"{v}_masks"], p, cfg.affine_fill
            )
        return out
    if cfg.affine_skip != "reference":
        raise ValueError(f"affine_skip must be 'reference' or 'both', not {cfg.affine_skip!r}")
    for v in VIEWS:  # ego first, as the reference
        if not _first_masks_survive(clip[f"{v}_masks"], p):
            return out  # views already transformed keep their transform
        out[f"{v}_frames"], out[f"{v}_masks"] = _affine_view(
            clip[f"{v}_frames"], clip[f"{v}_masks"], p, cfg.affine_fill
        )
    return out


# ----------------------------------------------------------------------------- resize


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``F.resize(pil, (size, size))``: PIL bilinear (antialiased when shrinking)."""
    return img.resize((size, size), Image.BILINEAR)


_AA_TABLES: dict = {}


def _aa_table(in_size: int, out_size: int):
    key = (in_size, out_size)
    if key not in _AA_TABLES:
        _AA_TABLES[key] = _aa_weights(in_size, out_size, f32_tap_range=True)
    return _AA_TABLES[key]


def _aa_pass_sparse(x: np.ndarray, out_size: int, axis: int, lo: int, hi: int) -> np.ndarray:
    """One pass of torch's antialiased bilinear resize of ``x`` along ``axis`` (taps summed in
    order in float32), computing only the outputs whose taps reach input indices ``[lo, hi]``
    (the non-zero span; the other outputs are sums of zeros, i.e. 0)."""
    idx, wt = _aa_table(x.shape[axis], out_size)
    sel = np.flatnonzero(((idx >= lo) & (idx <= hi)).any(axis=1))
    xm = np.moveaxis(x, axis, -1)
    out = np.zeros(xm.shape[:-1] + (out_size,), np.float32)
    if sel.size:
        i, ww = idx[sel], wt[sel]
        acc = xm[..., i[:, 0]] * ww[:, 0]
        for j in range(1, i.shape[1]):  # tap order as ATen
            acc = acc + xm[..., i[:, j]] * ww[:, j]
        out[..., sel] = acc
    return np.moveaxis(out, -1, axis)


def _resize_aa_2d(m: np.ndarray, size) -> np.ndarray:
    """torch ``F.interpolate(m[None, None].float(), size, mode="bilinear", antialias=True)``
    of one 2-D mask (width pass, then height pass, as ATen), restricted to the support of
    the non-zero pixels.

    The weights are ATen's exactly; the sums can differ from ATen's by an ULP (its compiled
    kernel fuses multiply-adds for some tap counts), which changes a rounded pixel only when
    the value is within an ULP of 0.5 (none in tests/test_transforms.py's samples)."""
    oh, ow = size
    m = np.asarray(m)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return np.zeros((oh, ow), np.float32)
    if m.shape[1] != ow:
        r0, r1 = rows[0], rows[-1] + 1
        y = np.zeros((m.shape[0], ow), np.float32)
        y[r0:r1] = _aa_pass_sparse(m[r0:r1].astype(np.float32), ow, 1, cols[0], cols[-1])
    else:
        y = m.astype(np.float32)
    if y.shape[0] != oh:
        c = np.flatnonzero(y.any(axis=0))
        if c.size == 0:
            return np.zeros((oh, ow), np.float32)
        c0, c1 = c[0], c[-1] + 1
        out = np.zeros((oh, ow), np.float32)
        out[:, c0:c1] = _aa_pass_sparse(y[:, c0:c1], oh, 0, rows[0], rows[-1])
        y = out
    return y


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``F.resize(mask[None, None], (size, size))`` of a uint8 0/1 tensor mask
    (``[..., h, w]``, any ``h, w``): cast to float32, torch's antialiased bilinear
    (``F.interpolate(..., antialias=True)`` in ATen's float32 arithmetic), ``torch.round``
    (half-to-even), back to the mask's dtype. A mask already ``size x size`` is returned as is."""
    lead = mask.shape[:-2]
    if mask.shape[-2:] == (size, size):
        return np.array(mask)
    flat = mask.reshape((-1,) + mask.shape[-2:])
    out = np.empty((flat.shape[0], size, size), np.float32)
    for i, m in enumerate(flat):
        out[i] = _resize_aa_2d(m, (size, size))
    out = np.clip(np.round(out), 0, 255).astype(mask.dtype)
    return out.reshape(lead + (size, size))


# ----------------------------------------------------------------------------- colour


@dataclass(frozen=True)
class JitterParams:
    order: tuple  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    brightness: Optional[float]
    contrast: Optional[float]
    saturation: Optional[float]


def _range(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return (float(x[0]), float(x[1]))
    return (max(0.0, 1.0 - x), 1.0 + x)


def sample_jitter(rng: np.random.Generator, brightness, contrast, saturation) -> JitterParams:
    """``T.ColorJitter.get_params`` (hue None): a permutation, then one factor per adjustment."""
    order = tuple(int(i) for i in rng.permutation(4))
    facs = []
    for r in (_range(brightness), _range(contrast), _range(saturation)):
        facs.append(None if r is None else float(rng.uniform(r[0], r[1])))
    return JitterParams(order, *facs)


def apply_jitter(img: Image.Image, p: JitterParams) -> Image.Image:
    """torchvision's PIL ``adjust_brightness/contrast/saturation`` in ``p.order``."""
    for fn in p.order:
        if fn == 0 and p.brightness is not None:
            img = ImageEnhance.Brightness(img).enhance(p.brightness)
        elif fn == 1 and p.contrast is not None:
            img = ImageEnhance.Contrast(img).enhance(p.contrast)
        elif fn == 2 and p.saturation is not None:
            img = ImageEnhance.Color(img).enhance(p.saturation)
    return img


def to_grayscale(img: Image.Image) -> Image.Image:
    """``T.Grayscale(3)`` on PIL: ITU-R 601 luma, replicated to three channels."""
    return img.convert("L").convert("RGB")


def normalize(frames: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std``."""
    x = np.asarray(frames, np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- pipeline


def _check_clip(clip):
    for v in VIEWS:
        f, m = clip[f"{v}_frames"], clip[f"{v}_masks"]
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"{v}_frames must be uint8 [T, H, W, 3], got {f.dtype} {f.shape}")
        if m.ndim not in (3, 4) or m.shape[0] != f.shape[0]:
            raise ValueError(f"{v}_masks must be [T, (N,) h, w] with the frames' T, got {m.shape}")


def augment_clip(clip: dict, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """The full LM-EEC training augmentation of one ego/exo clip (see the module docstring).

    Random draws, in order: flip (1 uniform), affine (angle, shear), consistent jitter
    (permutation + 3 factors), grayscale (1 uniform), per-frame jitter for every ego frame then
    every exo frame.
    """
    _check_clip(clip)
    out = dict(clip)

    if rng.random() < cfg.hflip_p:
        out = hflip_clip(out)

    deg, sh = cfg.affine_degrees, cfg.affine_shear
    angle = float(rng.uniform(-deg, deg))
    shear_x = float(rng.uniform(-sh, sh)) if sh else 0.0
    out = random_affine(out, AffineParams(angle, shear_x), cfg)

    imgs = {}
    for v in VIEWS:
        imgs[v] = [resize_image(Image.fromarray(f), cfg.size) for f in out[f"{v}_frames"]]
        out[f"{v}_masks"] = resize_mask(out[f"{v}_masks"], cfg.size)

    jp = sample_jitter(rng, *cfg.jitter)
    for v in VIEWS:
        imgs[v] = [apply_jitter(im, jp) for im in imgs[v]]

    if rng.random() < cfg.grayscale_p:
        for v in VIEWS:
            imgs[v] = [to_grayscale(im) for im in imgs[v]]

    for v in VIEWS:
        imgs[v] = [apply_jitter(im, sample_jitter(rng, *cfg.jitter_per_frame)) for im in imgs[v]]

    for v in VIEWS:
        out[f"{v}_frames"] = normalize(np.stack([np.asarray(im) for im in imgs[v]]), cfg.mean, cfg.std)
    return out
