"""Masks drawn over frames for visual checks (``python -m eval show``, validation overlays).

A mask is either filled (blended into the image with weight ``alpha``) or outlined
(a 2-pixel contour in a solid colour), or both; GT is green, predictions magenta.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["GT_COLOUR", "PRED_COLOUR", "mask_contour", "overlay"]

GT_COLOUR = (40, 220, 60)
PRED_COLOUR = (235, 40, 220)


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Boundary of a mask (pixels with a background 4-neighbour), thickened to 2 px (bool)."""
    m = np.asarray(mask).astype(bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    out = edge.copy()
    out[1:] |= edge[:-1]
    out[:, 1:] |= edge[:, :-1]
    return out


def overlay(img: np.ndarray, fill: Optional[np.ndarray], fill_colour, contour: Optional[np.ndarray] = None,
            contour_colour=None, *, alpha: float = 0.45) -> np.ndarray:
    """``img`` (uint8 HxWx3) with ``fill`` blended in ``fill_colour`` (``(1 - alpha) * img +
    alpha * colour``) and then the contour of ``contour`` drawn in ``contour_colour``
    (default ``fill_colour``); either mask may be None. Returns a new uint8 image."""
    x = img.astype(np.float32)
    if fill is not None:
        f = np.asarray(fill).astype(bool)
        x[f] = (1 - alpha) * x[f] + alpha * np.asarray(fill_colour, np.float32)
    if contour is not None:
        colour = fill_colour if contour_colour is None else contour_colour
        x[mask_contour(contour)] = np.asarray(colour, np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)
