"""Pre- and post-processing of the tracker, one owner for inference and training validation
(as SAM 2's ``SAM2Transforms``).

* a frame: PIL ``convert("RGB").resize((S, S))`` (bicubic, aspect ratio ignored), /255,
  ImageNet mean/std (LM-EEC's ``_load_img_as_tensor``);
* a source mask (0/1, any size): antialiased bilinear to S x S, ``>= 0.5``;
* the output: low-res logits upsampled with bilinear (``align_corners=False``) straight to
  the wanted size, then ``> 0`` (SPEC point 8).
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import numpy as np
from PIL import Image

from lmeec_jax.data.images import normalize_uint8, resize_mask_source
from lmeec_jax.models.common import resize_bilinear

__all__ = ["Transforms", "upsample_logits", "logits_to_masks"]


def upsample_logits(low_res_logits, size):
    """Low-res logits [..., h, w] -> bilinear (align_corners=False) to ``size`` [..., H, W]."""
    x = low_res_logits[..., None]
    return resize_bilinear(x, tuple(size), antialias=False)[..., 0]


@functools.partial(jax.jit, static_argnames=("size",))
def logits_to_masks(low_res_logits, size: Tuple[int, int]):
    """Boolean masks at ``size`` from low-res logits (jitted per output size)."""
    return upsample_logits(low_res_logits, size) > 0


class Transforms:
    """The model's input and output conventions at ``image_size``."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def image(self, img) -> np.ndarray:
        """A PIL image or uint8 HxWx3 array -> float32 [S, S, 3] normalised."""
        im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
        im = im.convert("RGB") if im.mode != "RGB" else im
        S = self.image_size
        return normalize_uint8(np.asarray(im.resize((S, S))))

    def source_mask(self, mask) -> np.ndarray:
        """A 0/1 mask at the frame's resolution -> bool [S, S] as the tracker takes it."""
        return resize_mask_source(np.asarray(mask), self.image_size)

    def masks(self, low_res_logits, size) -> np.ndarray:
        """Low-res logits [..., h, w] -> bool masks [..., H, W] at ``size`` = (H, W)."""
        return np.asarray(logits_to_masks(low_res_logits, tuple(int(v) for v in size)))
