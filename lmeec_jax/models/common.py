"""Small building blocks shared by several SAM 2 modules (NHWC layout throughout)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU() by default."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "gelu": gelu}


class MLP(nnx.Module):
    """sam2_utils.MLP: ``layers.{i}`` linears, activation between them, optional sigmoid."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: str = "relu",
        sigmoid_output: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nnx.List(
            [nnx.Linear(n, k, rngs=rngs) for n, k in zip([input_dim] + h, h + [output_dim])]
        )
        self.num_layers = num_layers
        self.act = ACTIVATIONS[activation]
        self.sigmoid_output = sigmoid_output

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        if self.sigmoid_output:
            x = jax.nn.sigmoid(x)
        return x


def layer_norm_2d(num_channels: int, *, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    """sam2_utils.LayerNorm2d: a channel LayerNorm (eps 1e-6); in NHWC it is a plain LayerNorm.

    Two-pass variance as torch: flax's default fast variance (E[x²] − E[x]²) loses precision
    when the mean is large against the spread (memory encoder: 1.6e-5 -> 5.7e-6 vs torch).
    """
    return nnx.LayerNorm(num_channels, epsilon=eps, use_fast_variance=False, rngs=rngs)


def conv2d_apply(x, kernel, bias=None, strides=(1, 1), padding=((0, 0), (0, 0)), groups: int = 1, dtype=None):
    """2-D convolution (NHWC, kernel HWIO) written as shifted slices + one matmul.

    Same maths as ``lax.conv_general_dilated``; the point is the backward pass: XLA:CPU
    lowers the weight gradient of a strided or depthwise convolution to a slow naive
    loop (the memory encoder's stride-2 mask convs and 7x7 depthwise conv took ~60 % of a
    training step of the small model), while here every gradient is a matmul, a pad or
    an elementwise product. Grouped convolutions other than depthwise use the lax path.
    ``dtype``: the compute dtype (inputs, kernel and bias cast to it; mixed precision, see
    :mod:`lmeec_jax.models.precision`); None: the promoted dtype of ``x`` and ``kernel``.
    """
    kh, kw, cin_g, cout = kernel.shape
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    n, H, W, cin = x.shape
    dtype = jnp.result_type(x.dtype, kernel.dtype) if dtype is None else jnp.dtype(dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    (p0, p1), (q0, q1) = padding
    sh, sw = strides
    if groups not in (1, cin) or (groups != 1 and (cin_g != 1 or cout != cin)):
        y = jax.lax.conv_general_dilated(x, kernel, (sh, sw), ((p0, p1), (q0, q1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    else:
        if p0 or p1 or q0 or q1:
            x = jnp.pad(x, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
        oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1

        def tap(i, j):
            return x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]

        if groups != 1 and cin != 1:  # depthwise: one multiply-add per tap
            y = sum(tap(i, j) * kernel[i, j, 0] for i in range(kh) for j in range(kw))
        elif kh == kw == 1:
            y = jnp.einsum("nhwc,co->nhwo", tap(0, 0), kernel[0, 0])
        else:
            patches = jnp.concatenate([tap(i, j) for i in range(kh) for j in range(kw)], axis=-1)
            y = jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(kh * kw * cin_g, cout))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.reshape(lead + y.shape[1:])


class Conv2d(nnx.Conv):
    """``nnx.Conv`` (same parameters ``kernel``/``bias``, same names) computed by
    :func:`conv2d_apply` (in ``self.dtype`` when set, as ``nnx.Conv``)."""

    def __call__(self, inputs):
        pad = self.padding
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        bias = self.bias[...] if self.bias is not None else None
        return conv2d_apply(inputs, self.kernel[...], bias, strides, tuple(tuple(p) for p in pad),
                            self.feature_group_count, dtype=self.dtype)


def conv2d(in_ch, out_ch, kernel_size, stride=1, padding=0, *, rngs, groups=1, use_bias=True):
    """torch.nn.Conv2d equivalent with explicit symmetric padding (never "SAME")."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return Conv2d(
        in_ch,
        out_ch,
        kernel_size=k,
        strides=s,
        padding=((p[0], p[0]), (p[1], p[1])),
        feature_group_count=groups,
        use_bias=use_bias,
        rngs=rngs,
    )


def resize_bilinear(x, size, *, antialias: bool = False):
    """torch F.interpolate(mode="bilinear", align_corners=False) on NHWC (or HW / NHW + C).

    ``antialias`` mirrors the torch flag (torch default False; jax default True).
    Resizes the two axes before the last one.
    """
    h, w = size
    shape = x.shape[:-3] + (h, w, x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=antialias)


class Identity(nnx.Module):
    """Parameterless placeholder keeping torch Sequential indices aligned."""

    def __call__(self, x):
        return x


class Activation(nnx.Module):
    """Parameterless activation as a module (keeps nn.Sequential indices aligned)."""

    def __init__(self, name: str):
        self.fn = ACTIVATIONS[name]

    def __call__(self, x):
        return self.fn(x)
