"""SAM 2.1 memory encoder (sam2.modeling.memory_encoder), NHWC.

State-dict names (tiny..large, SAM 2.1 yaml):
``mask_downsampler.encoder.{0,3,6,9}`` convs (k3 s2 p1), ``{1,4,7,10}`` LayerNorm2d,
``{2,5,8,11}`` GELU (no params), ``12`` the final 1×1 conv; ``pix_feat_proj``;
``fuser.layers.{0,1}.{dwconv,norm,pwconv1,pwconv2,gamma}``; ``out_proj`` (1×1 conv to 64).

The masks are *not* resized here: like torch, the mask downsampler expects masks at the
image size (total stride 16), so its output matches the stride-16 ``pix_feat``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.common import Activation, Identity, conv2d, layer_norm_2d
from lmeec_jax.models.position_encoding import PositionEmbeddingSine

__all__ = ["MaskDownSampler", "CXBlock", "Fuser", "MemoryEncoder"]


def _activation_name(activation) -> str:
    if activation is None:
        return "gelu"
    if isinstance(activation, str):
        return activation.lower()
    # torch-style class (nn.GELU) given by a config: accept its name
    name = getattr(activation, "__name__", str(activation)).lower()
    return "gelu" if "gelu" in name else "relu" if "relu" in name else name


class MaskDownSampler(nnx.Module):
    """``encoder``: [conv(k, stride, pad) → LayerNorm2d → GELU] × log_stride(total_stride),
    then a 1×1 conv to ``embed_dim``. Channels grow by ``stride**2`` per step (1 → 4 → 16 …)."""

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        activation="gelu",
        *,
        rngs: nnx.Rngs,
    ):
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError("total_stride must be a power of stride")
        act = _activation_name(activation)
        layers = []
        cin = cout = 1
        for _ in range(num_layers):
            cout = cin * stride**2
            layers.append(conv2d(cin, cout, kernel_size, stride, padding, rngs=rngs))
            layers.append(layer_norm_2d(cout, rngs=rngs))
            layers.append(Activation(act))
            cin = cout
        layers.append(conv2d(cout, embed_dim, 1, rngs=rngs))
        self.encoder = nnx.List(layers)

    def __call__(self, x):
        """x: [B, H, W, 1] → [B, H / total_stride, W / total_stride, embed_dim]."""
        for layer in self.encoder:
            x = layer(x)
        return x


class CXBlock(nnx.Module):
    """ConvNeXt block: depthwise k×k conv → LayerNorm (eps 1e-6) → Linear(4C) → GELU →
    Linear(C) → × ``gamma`` → residual. ``drop_path`` is accepted; > 0 is not implemented
    (SAM 2.1 configs use 0)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        if drop_path > 0.0:
            raise NotImplementedError("CXBlock drop_path > 0 is not implemented (SAM 2.1 uses 0)")
        self.dwconv = conv2d(dim, dim, kernel_size, 1, padding, groups=dim if use_dwconv else 1, rngs=rngs)
        self.norm = layer_norm_2d(dim, eps=1e-6, rngs=rngs)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.act = Activation("gelu")
        self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        if layer_scale_init_value > 0:
            self.gamma = nnx.Param(jnp.full((dim,), layer_scale_init_value, jnp.float32))
        else:
            self.gamma = None

    def __call__(self, x):
        y = self.dwconv(x)
        y = self.norm(y)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma[...] * y
        return x + y


def _make_layers(layer, num_layers: int, rngs: nnx.Rngs) -> list:
    """torch ``get_clones``: ``layer`` is an NNX module (deep-copied ``num_layers`` times,
    as torch does) or a factory ``layer(rngs=...)`` (fresh init per copy)."""
    if isinstance(layer, nnx.Module):
        return [nnx.clone(layer) for _ in range(num_layers)]
    if callable(layer):
        return [layer(rngs=rngs) for _ in range(num_layers)]
    raise TypeError(f"layer must be an nnx.Module or a factory, got {type(layer)}")


class Fuser(nnx.Module):
    """``proj`` (1×1 conv if ``input_projection``, else identity) then ``layers`` (CXBlocks)."""

    def __init__(self, layer, num_layers: int, dim: int | None = None, input_projection: bool = False, *, rngs: nnx.Rngs):
        if input_projection:
            if dim is None:
                raise ValueError("input_projection needs dim")
            self.proj = conv2d(dim, dim, 1, rngs=rngs)
        else:
            self.proj = Identity()
        self.layers = nnx.List(_make_layers(layer, num_layers, rngs))

    def __call__(self, x):
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nnx.Module):
    """Fuses the stride-16 image features with the downsampled mask into the memory.

    Constructor as torch: ``MemoryEncoder(out_dim, mask_downsampler, fuser,
    position_encoding, in_dim=256, *, rngs)`` where the three sub-modules are instances
    (``MaskDownSampler``, ``Fuser``, ``PositionEmbeddingSine``).
    """

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: MaskDownSampler,
        fuser: Fuser,
        position_encoding: PositionEmbeddingSine,
        in_dim: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = conv2d(in_dim, in_dim, 1, rngs=rngs)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj = conv2d(in_dim, out_dim, 1, rngs=rngs) if out_dim != in_dim else Identity()

    def __call__(self, pix_feat, masks, skip_mask_sigmoid: bool = False):
        """pix_feat: [B, h, w, in_dim]; masks: [B, H, W, 1] or [B, H, W] at the image size
        (H = 16·h), logits unless ``skip_mask_sigmoid`` (then used as given, e.g. the
        already scaled ``sigmoid(m)·20 − 10``).

        Returns ``{"vision_features": [B, h, w, out_dim], "vision_pos_enc": [pos]}`` with
        ``pos`` the sine encoding [B, h, w, out_dim] (a one-element list, as torch).
        """
        if masks.ndim == 3:
            masks = masks[..., None]
        if not skip_mask_sigmoid:
            masks = jax.nn.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat)
        x = x + masks
        x = self.fuser(x)
        x = self.out_proj(x)
        pos = self.position_encoding(x).astype(x.dtype)
        return {"vision_features": x, "vision_pos_enc": [pos]}
