"""``conv2d_apply`` (slices + matmul, the CPU-friendly convolution) equals XLA's convolution,
values and gradients, for every kind of conv the model uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmeec_jax.models.common import conv2d_apply


def _lax(x, k, b, strides, padding, groups):
    y = jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups, precision="highest")
    return y + b


@pytest.mark.parametrize(
    "shape,kernel,strides,padding,groups",
    [
        ((2, 17, 16, 1), (3, 3, 1, 4), (2, 2), ((1, 1), (1, 1)), 1),  # mask downsampler layer 1
        ((2, 8, 8, 16), (3, 3, 16, 64), (2, 2), ((1, 1), (1, 1)), 1),  # later layers (even size)
        ((3, 9, 7, 12), (7, 7, 1, 12), (1, 1), ((3, 3), (3, 3)), 12),  # CXBlock depthwise 7x7
        ((2, 6, 6, 8), (1, 1, 8, 5), (1, 1), ((0, 0), (0, 0)), 1),  # 1x1 projections
        ((1, 19, 19, 3), (7, 7, 3, 6), (4, 4), ((3, 3), (3, 3)), 1),  # Hiera patch embed
        ((2, 16, 16, 1), (4, 4, 1, 1), (4, 4), ((0, 0), (0, 0)), 1),  # mask_downsample (stride = kernel)
        ((2, 6, 6, 8), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 2),  # other grouped: lax fallback
    ],
)
def test_conv2d_apply_matches_lax(shape, kernel, strides, padding, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
    b = jnp.asarray(rng.standard_normal(kernel[-1]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        y = conv2d_apply(x, k, b, strides, padding, groups)
        ref = _lax(x, k, b, strides, padding, groups)
        assert y.shape == ref.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=2e-5, rtol=1e-5)
        w = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
        g = jax.grad(lambda *a: jnp.sum(conv2d_apply(*a, strides, padding, groups) * w), argnums=(0, 1, 2))(x, k, b)
        gr = jax.grad(lambda *a: jnp.sum(_lax(*a, strides, padding, groups) * w), argnums=(0, 1, 2))(x, k, b)
    for a, r in zip(g, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=1e-5)


def test_conv2d_apply_extra_batch_dims_and_bf16():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 4)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.bfloat16)
    y = conv2d_apply(x, k, None, (1, 1), ((1, 1), (1, 1)))
    assert y.shape == (2, 3, 8, 8, 5) and y.dtype == jnp.bfloat16
    ref = _lax(x.reshape(6, 8, 8, 4).astype(jnp.float32), k.astype(jnp.float32), 0.0, (1, 1), ((1, 1), (1, 1)), 1)
    np.testing.assert_allclose(np.asarray(y, np.float32).reshape(6, 8, 8, 5), np.asarray(ref), atol=0.3, rtol=0.05)
