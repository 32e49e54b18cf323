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


def conv2d(in_ch, out_ch, kernel_size, stride=1, padding=0, *, rngs, groups=1, use_bias=True):
    """torch.nn.Conv2d equivalent with explicit symmetric padding (never "SAME")."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return nnx.Conv(
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
