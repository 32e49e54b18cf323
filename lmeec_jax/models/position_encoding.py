"""Sine position encodings (sam2.modeling.position_encoding.PositionEmbeddingSine)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


class PositionEmbeddingSine:
    """Parameterless 2-D sine encoding; returns [H, W, num_pos_feats] (NHWC without batch).

    Computed with numpy in float32 at trace time (shapes are static), so it is a constant
    inside jitted code, exactly as torch caches it.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True, scale=None):
        if num_pos_feats % 2:
            raise ValueError("PositionEmbeddingSine expects an even model width")
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _dim_t(self):
        d = np.arange(self.num_pos_feats, dtype=np.float32)
        return (np.float32(self.temperature) ** (2 * (d // 2) / np.float32(self.num_pos_feats))).astype(np.float32)

    @staticmethod
    def _interleave(p):
        # stack(sin(even), cos(odd)) then flatten: [s0, c1, s2, c3, ...]
        out = np.stack((np.sin(p[..., 0::2]), np.cos(p[..., 1::2])), axis=-1)
        return out.reshape(p.shape[:-1] + (-1,))

    def encode_hw(self, h: int, w: int) -> np.ndarray:
        y = np.arange(1, h + 1, dtype=np.float32)[:, None].repeat(w, 1)
        x = np.arange(1, w + 1, dtype=np.float32)[None, :].repeat(h, 0)
        if self.normalize:
            eps = np.float32(1e-6)
            y = y / (y[-1:, :] + eps) * np.float32(self.scale)
            x = x / (x[:, -1:] + eps) * np.float32(self.scale)
        dim_t = self._dim_t()
        pos_x = self._interleave(x[..., None] / dim_t)
        pos_y = self._interleave(y[..., None] / dim_t)
        return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)

    def __call__(self, x):
        """Encoding for an NHWC feature map ``x``: [B, H, W, C] float32."""
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
        pe = jnp.asarray(self.encode_hw(h, w))
        return jnp.broadcast_to(pe[None], (b, h, w, pe.shape[-1]))
