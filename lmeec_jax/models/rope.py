"""Axial rotary position encoding of SAM 2 (sam2.modeling.position_encoding.compute_axial_cis
and apply_rotary_enc), for the memory attention.

Conventions, as torch does them:

* frequencies are float32: ``1 / theta ** (arange(0, dim, 4)[:dim // 4] / dim)`` for x and
  the same for y; token ``t`` of a row-major ``end_y × end_x`` grid has ``x = t % end_x``,
  ``y = t // end_x``; the per-token angles are ``[x * freqs, y * freqs]`` (dim / 2 of them);
* a head vector of ``dim`` reals is viewed as ``dim / 2`` complex numbers made of
  *interleaved* pairs ``(x[2i], x[2i+1]) = (real, imag)`` and multiplied by ``exp(i·angle)``;
* queries use the grid once; keys (``repeat_freqs_k``) use it repeated per memory frame,
  i.e. key ``j`` gets the angles of grid position ``j % (end_x·end_y)``;
* the last ``num_k_exclude_rope`` keys (object-pointer tokens) are not rotated.

Because a key's rotation only depends on its position inside its frame, memory frames may
be held in a fixed number of slots with a validity mask: an invalid slot (always a whole
frame of ``N`` tokens, or an object-pointer token among the excluded tail) does not change
the rotation of any other key, and the attention gives it zero weight via ``key_mask``.

The angle tables are computed with numpy at trace time (shapes are static), so they are
constants inside jitted code.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["compute_axial_cis", "freqs_for_length", "rotate", "apply_rotary_enc"]


def compute_axial_cis(dim: int, end_x: int, end_y: int, theta: float = 10000.0):
    """(cos, sin) tables, float32 [end_x * end_y, dim // 2], of torch's ``compute_axial_cis``.

    torch returns ``polar(1, angle)`` as complex64; we return its real and imaginary parts.
    Each float32 operation of torch (pow, reciprocal, outer product) is reproduced in float32;
    cos / sin are taken in float64 of the float32 angle and rounded (≤ 1 ulp from torch).
    """
    if dim % 4:
        raise ValueError(f"axial RoPE needs a head dim divisible by 4, got {dim}")
    end_x, end_y = int(end_x), int(end_y)
    idx = np.arange(0, dim, 4)[: dim // 4].astype(np.float32) / np.float32(dim)
    # torch: theta ** idx (float32 pow), then 1 / (...) in float32. Rounding the float64
    # result once to float32 gives the correctly rounded value, as torch's f32 pow does.
    freqs = (np.float32(1.0) / (np.float64(theta) ** idx.astype(np.float64)).astype(np.float32)).astype(np.float32)
    t = np.arange(end_x * end_y, dtype=np.float32)
    t_x = (t % np.float32(end_x)).astype(np.float32)
    t_y = np.floor(t / np.float32(end_x)).astype(np.float32)
    ang = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1).astype(np.float32)
    ang64 = ang.astype(np.float64)
    return np.cos(ang64).astype(np.float32), np.sin(ang64).astype(np.float32)


def freqs_for_length(dim: int, n: int, feat_sizes: Sequence[int] = (64, 64), theta: float = 10000.0):
    """The angle table sam2==1.1.0's RoPEAttention uses for a query sequence of length ``n``.

    torch builds the table for ``feat_sizes = [w, h]`` at construction and, whenever the
    query length differs from ``w * h``, rebuilds it for ``w = h = sqrt(n)`` (a square
    map). So at image size 480 the stride-16 map 30×30 gets a 30×30 grid although the yaml
    says [64, 64]. (torch caches the rebuilt table on the module; for square ``feat_sizes``,
    the only ones in the SAM 2.1 configs, that cache never changes a result.)
    """
    fx, fy = int(feat_sizes[0]), int(feat_sizes[1])
    if n == fx * fy:
        return compute_axial_cis(dim, fx, fy, theta)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"RoPE needs a square feature map, got a sequence of {n} tokens")
    return compute_axial_cis(dim, side, side, theta)


def rotate(x, cos, sin):
    """Rotate interleaved pairs of ``x`` [..., L, D] by angles with cos/sin [L, D/2].

    ``L`` may be a multiple ``r·n`` of the table length ``n``: the table is then repeated
    per block of ``n`` tokens (torch's ``repeat_freqs_k``), without materialising it.
    The maths is done in float32 (torch: ``xk.float()``) and cast back to ``x.dtype``.
    """
    n, half = cos.shape
    length, d = x.shape[-2], x.shape[-1]
    if d != 2 * half:
        raise ValueError(f"head dim {d} does not match the RoPE table ({2 * half})")
    if length % n:
        raise ValueError(f"{length} tokens are not a whole number of {n}-token frames")
    r = length // n
    xf = x.astype(jnp.float32).reshape(x.shape[:-2] + (r, n, half, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = jnp.asarray(cos), jnp.asarray(sin)
    out = jnp.stack([a * c - b * s, a * s + b * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def apply_rotary_enc(q, k, cos, sin, *, repeat_freqs_k: bool = False, num_k_exclude_rope: int = 0):
    """RoPE of queries [B, H, Nq, D] and keys [B, H, Nk, D] as torch's RoPEAttention does.

    The first ``Nk - num_k_exclude_rope`` keys are rotated (with the table repeated per
    frame when ``repeat_freqs_k``), the rest pass unchanged. ``num_k_exclude_rope`` must be
    a Python int (static).
    """
    nq = q.shape[-2]
    if cos.shape[0] != nq:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions, queries {nq}")
    q = rotate(q, cos, sin)
    nk = k.shape[-2]
    num_k_rope = nk - int(num_k_exclude_rope)
    if num_k_rope < 0:
        raise ValueError(f"num_k_exclude_rope={num_k_exclude_rope} exceeds the {nk} keys")
    if num_k_rope == 0:
        return q, k
    if num_k_rope != nq and not repeat_freqs_k:
        raise ValueError("keys and queries differ in length; rope_k_repeat is needed")
    if repeat_freqs_k and num_k_rope % nq:
        # torch: r = Nk // Nq, then a shape mismatch; refuse explicitly.
        raise ValueError(f"{num_k_rope} RoPE keys are not a whole number of {nq}-token frames")
    k_rot = rotate(k[..., :num_k_rope, :], cos, sin)
    if num_k_rope == nk:
        return q, k_rot
    return q, jnp.concatenate([k_rot, k[..., num_k_rope:, :]], axis=-2)
