"""Frame and mask I/O for the processed EgoExo4D layout.

What LM-EEC does (``sam2/utils/misc.py::_load_img_as_tensor`` and
``sam2_correspondence_predictor.py::_run_single_frame_inference``):

* a frame is read with PIL, ``.convert("RGB").resize((480, 480))`` (PIL's default
  resampling, bicubic; the aspect ratio is ignored), divided by 255 (in float64),
  stored as float32 and then normalised in float32 with the ImageNet mean/std;
* a source mask (0/1, full resolution) is resized to 480x480 with torch's
  antialiased bilinear interpolation (``align_corners=False``) and thresholded
  ``>= 0.5``.

All arrays here are HWC / NHWC numpy arrays. Errors on bad input are raised as
:class:`lmeec_jax.data.errors.DataError`, which names the file and, when known, take /
camera / frame.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import DataError  # noqa: F401  (re-exported: open_rgb raises it)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_SIZE = 480


# ----------------------------------------------------------------------------- frames


def open_rgb(path, **ctx) -> Image.Image:
    """Open an image file fully decoded as a PIL RGB image, or raise DataError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("frame file missing", path=path, **ctx)
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode: truncated / corrupt data fails here
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises OSError / UnidentifiedImageError
        raise DataError(f"corrupt or unreadable image ({type(e).__name__}: {e})", path=path, **ctx) from e


def read_rgb(path, **ctx) -> np.ndarray:
    """uint8 HxWx3 array of an image at its own resolution."""
    return np.asarray(open_rgb(path, **ctx))


def normalize_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC, /255 (float64, as numpy/torch do), then ImageNet mean/std in float32."""
    x = (np.asarray(img, dtype=np.uint8) / 255.0).astype(np.float32)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize_uint8` back to uint8 (for visualisation)."""
    y = np.asarray(x, np.float32) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


def load_frame(path, image_size: int = IMAGE_SIZE, **ctx) -> np.ndarray:
    """A frame as the model sees it: float32 (image_size, image_size, 3), normalised.

    PIL ``.convert("RGB").resize((S, S))`` with PIL's default filter (bicubic), exactly
    as LM-EEC's ``_load_img_as_tensor``.
    """
    im = open_rgb(path, **ctx)
    im = im.resize((image_size, image_size))
    return normalize_uint8(np.asarray(im))


def load_frames(paths, image_size: int = IMAGE_SIZE, contexts=None) -> np.ndarray:
    """Stack of :func:`load_frame` results, NHWC float32."""
    out = np.empty((len(paths), image_size, image_size, 3), np.float32)
    for i, p in enumerate(paths):
        ctx = contexts[i] if contexts is not None else {}
        out[i] = load_frame(p, image_size, **ctx)
    return out


# ----------------------------------------------------------------------------- masks


def _aa_weights(in_size: int, out_size: int, f32_tap_range: bool = False):
    """Index/weight table of torch's antialiased bilinear resize along one axis.

    Mirrors ATen's ``_compute_weights_aa`` (align_corners=False, bilinear triangle
    filter) in float32: ``scale = in/out``; ``support = scale`` when downsampling,
    1 otherwise; taps ``[xmin, xmin + xsize)`` with ``xmin = trunc(center - support + .5)``
    clamped at 0, weights ``tri((j + xmin - center + .5) / max(scale, 1))`` normalised.
    Returns ``idx`` (out, K) int64 and ``w`` (out, K) float32 (unused taps: weight 0).

    ``f32_tap_range``: the tap range subtracts/adds ``support`` in float32 before adding the
    (double) 0.5, as the C++ does (e.g. 141 -> 135 px differ otherwise by one tap of weight 3e-6;
    checked against ``torch.nn.functional.interpolate`` in tests/test_transforms.py). The
    training masks use it; the inference source masks keep the double range, which equals
    torch at the data's sizes (and keeps ``eval predict``'s outputs as they were).
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    k = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, k), np.int64)
    w = np.zeros((out_size, k), np.float32)
    for i in range(out_size):
        # C++ promotion: float * double -> double, stored back into a float
        center = f32(float(scale) * (i + 0.5))
        if f32_tap_range:
            lo, hi = float(f32(center - support)), float(f32(center + support))
        else:
            lo, hi = float(center) - float(support), float(center) + float(support)
        xmin = max(int(lo + 0.5), 0)  # int() truncates like C
        xmax = min(int(hi + 0.5), in_size)
        xsize = xmax - xmin
        js = np.arange(xsize)
        # (int64 - float) -> float; + 0.5 and * invscale in double; cast to float for the filter
        d = ((js + xmin).astype(np.float32) - center).astype(np.float64)
        x = ((d + 0.5) * float(invscale)).astype(np.float32)
        ww = np.maximum(f32(1.0) - np.abs(x), f32(0.0)).astype(np.float32)
        total = np.float32(0.0)
        for v in ww:  # sequential float32 sum, like the C loop
            total = np.float32(total + v)
        if total != 0:
            ww = (ww / total).astype(np.float32)
        idx[i, :xsize] = js + xmin
        idx[i, xsize:] = min(xmin, in_size - 1)
        w[i, :xsize] = ww
    return idx, w


_AA_CACHE: dict = {}


def _aa_table(in_size, out_size):
    key = (in_size, out_size)
    if key not in _AA_CACHE:
        _AA_CACHE[key] = _aa_weights(in_size, out_size)
    return _AA_CACHE[key]


def _aa_pass(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    idx, w = _aa_table(x.shape[axis], out_size)
    xm = np.moveaxis(x, axis, -1)
    acc = xm[..., idx[:, 0]] * w[:, 0]
    for j in range(1, idx.shape[1]):
        acc = acc + xm[..., idx[:, j]] * w[:, j]
    return np.moveaxis(acc.astype(np.float32), -1, axis)


def resize_bilinear_aa(x: np.ndarray, size) -> np.ndarray:
    """torch ``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)``
    for a 2-D float array (width pass first, then height, as ATen does)."""
    oh, ow = size
    y = np.asarray(x, np.float32)
    if y.shape[1] != ow:
        y = _aa_pass(y, ow, axis=1)
    if y.shape[0] != oh:
        y = _aa_pass(y, oh, axis=0)
    return y


def _resize_sparse_aa(m: np.ndarray, size) -> np.ndarray:
    """:func:`resize_bilinear_aa` of a 0/1 mask, skipping all-zero input rows in the
    width pass (a zero row gives a zero row, so the result is identical)."""
    oh, ow = size
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return np.zeros((oh, ow), np.float32)
    if m.shape[1] == ow:
        return resize_bilinear_aa(m, size)
    r0, r1 = rows[0], rows[-1] + 1
    tmp = np.zeros((m.shape[0], ow), np.float32)
    tmp[r0:r1] = _aa_pass(m[r0:r1].astype(np.float32), ow, axis=1)
    if m.shape[0] != oh:
        tmp = _aa_pass(tmp, oh, axis=0)
    return tmp


def resize_mask_source(mask: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Source-view GT mask as LM-EEC feeds it: antialiased bilinear to SxS, ``>= 0.5`` (bool).

    Like the reference, a mask already at SxS is used as is (no resize).
    """
    m = np.asarray(mask)
    if m.shape == (image_size, image_size):
        return m.astype(bool)
    return _resize_sparse_aa(m.astype(np.float32), (image_size, image_size)) >= 0.5


def resize_mask_nearest(mask: np.ndarray, size) -> np.ndarray:
    """PIL nearest resize of a 0/1 mask to (H, W) = size (LM-EEC's ``Resize(NEAREST)`` on PIL)."""
    m = np.asarray(mask)
    h, w = size
    if m.shape == (h, w):
        return m.astype(bool)
    im = Image.fromarray(m.astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.NEAREST)) > 127
