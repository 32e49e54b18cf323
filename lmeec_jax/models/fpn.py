"""FPN neck and image encoder of SAM 2.1 (sam2.modeling.backbones.image_encoder), NHWC.

State-dict names: ``neck.convs.{i}.conv.{weight,bias}`` (``convs[0]`` is the lowest
resolution level), ``trunk.*`` as in :mod:`lmeec_jax.models.hiera`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.common import conv2d, resize_bilinear
from lmeec_jax.models.position_encoding import PositionEmbeddingSine

__all__ = ["upsample2x", "FpnNeck", "ImageEncoder"]


def upsample2x(x, mode: str = "nearest"):
    """F.interpolate(x, scale_factor=2.0, mode=mode, align_corners=False, antialias=False) on NHWC."""
    b, h, w, c = x.shape
    if mode == "nearest":
        # torch nearest with an exact factor 2: source index floor(dst / 2)
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    if mode == "bilinear":
        return resize_bilinear(x, (2 * h, 2 * w), antialias=False)
    raise ValueError(f"unsupported fpn_interp_model {mode!r}")


class _ConvSeq(nnx.Module):
    """nn.Sequential with a single child named ``conv`` (keeps the ``convs.{i}.conv`` name)."""

    def __init__(self, conv):
        self.conv = conv

    def __call__(self, x):
        return self.conv(x)


class FpnNeck(nnx.Module):
    """image_encoder.FpnNeck: 1x1 lateral convs, top-down fusion, sine position encodings.

    ``position_encoding``: a :class:`PositionEmbeddingSine` (or a dict of its arguments,
    as in the yaml). Call with the trunk's outputs (high-res first, NHWC); returns
    ``(features, pos)``, two lists in the same order.
    """

    def __init__(
        self,
        position_encoding,
        d_model: int,
        backbone_channel_list: Sequence[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
        fpn_top_down_levels: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if isinstance(position_encoding, dict):
            kw = {k: v for k, v in position_encoding.items() if not k.startswith("_")}
            position_encoding = PositionEmbeddingSine(**kw)
        self.position_encoding = position_encoding
        self.backbone_channel_list = list(backbone_channel_list)
        self.d_model = d_model
        self.convs = nnx.List(
            [_ConvSeq(conv2d(dim, d_model, kernel_size, stride, padding, rngs=rngs)) for dim in backbone_channel_list]
        )
        if fpn_interp_model not in ("nearest", "bilinear"):
            raise ValueError(f"unsupported fpn_interp_model {fpn_interp_model!r}")
        self.fpn_interp_model = fpn_interp_model
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.fuse_type = fuse_type
        if fpn_top_down_levels is None:
            fpn_top_down_levels = range(len(self.convs))
        self.fpn_top_down_levels = list(fpn_top_down_levels)

    def __call__(self, xs):
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"expected {n + 1} feature maps, got {len(xs)}")
        out = [None] * (n + 1)
        pos = [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # low resolution -> high resolution
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = upsample2x(prev.astype(jnp.float32), self.fpn_interp_model)
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
            pos[i] = self.position_encoding(prev).astype(prev.dtype)
        return out, pos


class ImageEncoder(nnx.Module):
    """image_encoder.ImageEncoder: trunk -> neck, dropping the ``scalp`` lowest-res levels.

    Input: images [B, H, W, 3] (normalised). Returns a dict like torch's:
    ``vision_features`` (the lowest-res kept level), ``vision_pos_enc`` (list),
    ``backbone_fpn`` (list), high-res first, all NHWC.
    """

    def __init__(self, trunk, neck, scalp: int = 0, *, rngs: nnx.Rngs | None = None):
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"channel dims of trunk and neck do not match: {trunk.channel_list} vs {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def __call__(self, sample, *, remat_blocks: bool = False):
        features, pos = self.neck(self.trunk(sample, remat_blocks=remat_blocks))
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
