"""Hiera trunk of the SAM 2.1 image encoder (sam2.modeling.backbones.hieradet), NHWC.

Attribute paths mirror the torch state dict: ``patch_embed.proj``, ``pos_embed``,
``pos_embed_window`` (both kept in torch layout [1, C, h, w]), ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``,
``blocks.{i}.mlp.layers.{0,1}`` and ``blocks.{i}.proj`` at stage transitions.

Numerics follow the reference: LayerNorm eps 1e-6, exact GELU, zero padding of
windows *before* the qkv projection (padded tokens are attended to, as in torch),
q max-pooling inside each window at stage transitions, and torch bicubic (a = -0.75,
no antialias) interpolation of the background position embedding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmeec_jax.models.common import MLP, Identity, conv2d

__all__ = [
    "window_partition",
    "window_unpartition",
    "max_pool2d",
    "MaxPool2d",
    "PatchEmbed",
    "DropPath",
    "MultiScaleAttention",
    "MultiScaleBlock",
    "Hiera",
]


# --------------------------------------------------------------------------- windows


def _pad_to_multiple(x, window_size: int):
    """Zero-pad H and W of [B, H, W, C] at the bottom/right to a multiple of window_size."""
    _, h, w, _ = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x, (h + pad_h, w + pad_w)


def window_partition(x, window_size: int):
    """[B, H, W, C] -> ([B * nWin, ws, ws, C], (Hp, Wp)), zero padding like torch."""
    x, (hp, wp) = _pad_to_multiple(x, window_size)
    b, c = x.shape[0], x.shape[-1]
    nh, nw = hp // window_size, wp // window_size
    x = x.reshape(b, nh, window_size, nw, window_size, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window_size, window_size, c), (hp, wp)


def window_unpartition(windows, window_size: int, pad_hw, hw):
    """Inverse of :func:`window_partition`; crops the padding."""
    hp, wp = pad_hw
    h, w = hw
    nh, nw = hp // window_size, wp // window_size
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, window_size, window_size, -1).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x


def max_pool2d(x, kernel: Sequence[int], stride: Sequence[int]):
    """torch MaxPool2d(kernel, stride, ceil_mode=False, padding=0) on [B, H, W, C]."""
    kh, kw = kernel
    sh, sw = stride
    _, h, w, c = x.shape
    if (kh, kw) == (sh, sw):
        oh, ow = h // kh, w // kw
        x = x[:, : oh * kh, : ow * kw, :]
        return x.reshape(x.shape[0], oh, kh, ow, kw, c).max(axis=(2, 4))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kh, kw, 1), (1, sh, sw, 1), "VALID"
    )


class MaxPool2d(nnx.Module):
    """Parameterless nn.MaxPool2d(kernel_size, stride, ceil_mode=False) on NHWC."""

    def __init__(self, kernel_size, stride=None):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        s = k if stride is None else ((stride, stride) if isinstance(stride, int) else tuple(stride))
        self.kernel_size, self.stride = k, s

    def __call__(self, x):
        return max_pool2d(x, self.kernel_size, self.stride)


# --------------------------------------------------------------------------- layers


class PatchEmbed(nnx.Module):
    """backbones.utils.PatchEmbed: Conv2d(in_chans, embed_dim, 7, stride 4, pad 3); NHWC in/out."""

    def __init__(
        self,
        kernel_size=(7, 7),
        stride=(4, 4),
        padding=(3, 3),
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        rngs: nnx.Rngs,
    ):
        self.proj = conv2d(in_chans, embed_dim, kernel_size, stride, padding, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class DropPath(nnx.Module):
    """Stochastic depth (sam2_utils.DropPath, scale_by_keep=True): drops whole samples.

    Starts deterministic (eval); ``model.train()`` switches it on (nnx sets
    ``deterministic=False``), ``model.eval()`` back off. Random bits come from the
    ``dropout`` stream of the ``rngs`` given at construction (or ``rngs=`` at call).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, *, rngs: nnx.Rngs | None = None,
                 deterministic: bool = True):
        if not scale_by_keep:
            raise NotImplementedError("only scale_by_keep=True (the SAM 2 default) is implemented")
        self.drop_prob = float(drop_prob)
        self.deterministic = deterministic
        # Dropout with every non-batch dim broadcast == per-sample drop path.
        self.dropout = nnx.Dropout(self.drop_prob, broadcast_dims=(1, 2, 3), deterministic=deterministic,
                                   rngs=rngs)

    def __call__(self, x, *, deterministic: bool | None = None, rngs=None):
        det = self.deterministic if deterministic is None else deterministic
        if det or self.drop_prob == 0.0:
            return x
        return self.dropout(x, deterministic=False, rngs=rngs)


# Global attention at 1024 px has 4096 keys: an unchunked [B, h, 4096, 4096] logits tensor
# (512 MB per image for base_plus) makes XLA:CPU memory-bound (jax.nn.dot_product_attention
# measured 3-6x slower than torch's CPU flash kernel). On CPU, attention with at least this
# many logits per head is computed one head and ``_Q_CHUNK`` queries at a time (sequential
# lax.map over cache-sized blocks; ~1.2-1.4x torch's time). Other backends take the plain path.
_CHUNK_MIN_LOGITS = 1 << 22
_Q_CHUNK = 512


def _attend_hm(q, k, v):
    """Head-major core: q [..., Nq, d] (pre-scaled), k/v [..., Nk, d] -> [..., Nq, d].

    Softmax in float32 with the normalisation applied after the PV product (one pass
    fewer over the [Nq, Nk] matrix than softmax-then-matmul).
    """
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / denom).astype(v.dtype)


def _attention(q, k, v):
    """softmax(q kᵀ/√d) v (torch SDPA); q [B, Nq, h, d], k/v [B, Nk, h, d] -> [B, Nq, h, d]."""
    b, nq, nh, d = q.shape
    nk = k.shape[1]
    q = (q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    chunk = _Q_CHUNK
    if jax.default_backend() == "cpu" and nq * nk >= _CHUNK_MIN_LOGITS:
        nqp = -(-nq // chunk) * chunk  # pad queries to whole chunks (padded rows are dropped)
        if nqp != nq:
            q = jnp.pad(q, ((0, 0), (0, 0), (0, nqp - nq), (0, 0)))
        qs = q.reshape(b * nh, nqp // chunk, chunk, d)
        ks, vs = k.reshape(b * nh, nk, d), v.reshape(b * nh, nk, d)
        # zero-pad V's head dim to a multiple of 16 (56 -> 64 for base_plus): the PV
        # product then fills whole SIMD registers (~15% faster); padded columns are cut off
        dv = -(-d // 16) * 16
        if dv != d:
            vs = jnp.pad(vs, ((0, 0), (0, 0), (0, dv - d)))

        def one_head(args):
            qh, kh, vh = args
            return jax.lax.map(lambda qc: _attend_hm(qc, kh, vh), qh)

        o = jax.lax.map(one_head, (qs, ks, vs)).reshape(b, nh, nqp, dv)[:, :, :nq, :d]
    else:
        o = _attend_hm(q, k, v)
    return o.transpose(0, 2, 1, 3)


class MultiScaleAttention(nnx.Module):
    """hieradet.MultiScaleAttention: qkv Linear, optional q pooling, SDPA, proj Linear.

    ``q_pool``: a pooling callable on [B, H, W, C] (e.g. :class:`MaxPool2d`) or None.
    Input/output [B, H, W, C] (B counts windows for windowed blocks).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool=None, *, rngs: nnx.Rngs):
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nnx.Linear(dim, dim_out * 3, rngs=rngs)
        self.proj = nnx.Linear(dim_out, dim_out, rngs=rngs)

    def __call__(self, x):
        b, h, w, _ = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_pool is not None:
            q = self.q_pool(q.reshape(b, h, w, -1))
            h, w = q.shape[1], q.shape[2]
            q = q.reshape(b, h * w, nh, -1)
        x = _attention(q, k, v)
        return self.proj(x.reshape(b, h, w, -1))


class MultiScaleBlock(nnx.Module):
    """hieradet.MultiScaleBlock (norm_layer LayerNorm eps 1e-6, act GELU exact)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: str = "LayerNorm",
        q_stride=None,
        act_layer: str = "gelu",
        window_size: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        if norm_layer != "LayerNorm":
            raise NotImplementedError(f"norm_layer {norm_layer!r}")
        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size
        self.q_stride = tuple(q_stride) if q_stride else None
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.pool = MaxPool2d(self.q_stride, self.q_stride) if self.q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0.0 else Identity()
        self.norm2 = nnx.LayerNorm(dim_out, epsilon=1e-6, rngs=rngs)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer, rngs=rngs)
        if dim != dim_out:
            self.proj = nnx.Linear(dim, dim_out, rngs=rngs)

    def __call__(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = self.pool(shortcut)

        ws = self.window_size
        if ws > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, ws)

        x = self.attn(x)

        if ws > 0:
            if self.q_stride:
                # q pooling shrank every window
                ws = ws // self.q_stride[0]
                h, w = shortcut.shape[1], shortcut.shape[2]
                pad_hw = (h + (ws - h % ws) % ws, w + (ws - w % ws) % ws)
            x = window_unpartition(x, ws, pad_hw, (h, w))

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Hiera(nnx.Module):
    """hieradet.Hiera. Input [B, H, W, 3]; returns the stage outputs (NHWC), high-res first."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride=(2, 2),
        stages=(2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size=(14, 14),
        window_spec=(8, 4, 14, 7),
        global_att_blocks=(12, 16, 20),
        weights_path=None,
        return_interm_layers: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        if weights_path is not None:
            raise ValueError("load weights with lmeec_jax.models.weights.load_state_dict, not weights_path")
        if len(stages) != len(window_spec):
            raise ValueError("stages and window_spec must have the same length")
        self.window_spec = tuple(window_spec)
        depth = sum(stages)
        self.q_stride = tuple(q_stride)
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
        if not 0 <= q_pool <= len(self.stage_ends[:-1]):
            raise ValueError("q_pool out of range")
        self.q_pool_blocks = [x + 1 for x in self.stage_ends[:-1]][:q_pool]
        self.return_interm_layers = return_interm_layers
        self.global_att_blocks = tuple(global_att_blocks) if global_att_blocks is not None else None

        self.patch_embed = PatchEmbed(embed_dim=embed_dim, rngs=rngs)
        self.window_pos_embed_bkg_spatial_size = tuple(window_pos_embed_bkg_spatial_size)
        # torch layout [1, C, h, w]; torch initialises them to zeros
        self.pos_embed = nnx.Param(jnp.zeros((1, embed_dim, *self.window_pos_embed_bkg_spatial_size), jnp.float32))
        self.pos_embed_window = nnx.Param(
            jnp.zeros((1, embed_dim, self.window_spec[0], self.window_spec[0]), jnp.float32)
        )

        dpr = np.linspace(0.0, drop_path_rate, depth, dtype=np.float32)  # torch.linspace decay rule
        cur_stage = 1
        blocks = []
        for i in range(depth):
            dim_out = embed_dim
            # the window size lags by a block: a stage's first block keeps the previous one's
            window_size = self.window_spec[cur_stage - 1]
            if self.global_att_blocks is not None and i in self.global_att_blocks:
                window_size = 0
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                cur_stage += 1
            blocks.append(
                MultiScaleBlock(
                    dim=embed_dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=float(dpr[i]),
                    q_stride=self.q_stride if i in self.q_pool_blocks else None,
                    window_size=window_size,
                    rngs=rngs,
                )
            )
            embed_dim = dim_out
        self.blocks = nnx.List(blocks)
        self.channel_list = (
            [self.blocks[i].dim_out for i in self.stage_ends[::-1]]
            if return_interm_layers
            else [self.blocks[-1].dim_out]
        )

    def _get_pos_embed(self, hw):
        """Background embedding bicubic-resized to hw plus the tiled window embedding: [1, h, w, C]."""
        h, w = hw
        pe = jnp.transpose(self.pos_embed[...], (0, 2, 3, 1))
        win = jnp.transpose(self.pos_embed_window[...], (0, 2, 3, 1))
        if pe.shape[1:3] != (h, w):
            pe = jax.image.resize(pe, (1, h, w, pe.shape[-1]), method="bicubic-pytorch", antialias=False)
        wh, ww = win.shape[1], win.shape[2]
        if h % wh or w % ww:
            raise ValueError(f"feature size {(h, w)} is not a multiple of the window embedding {(wh, ww)}")
        return pe + jnp.tile(win, (1, h // wh, w // ww, 1))

    def __call__(self, x, *, remat_blocks: bool = False):
        """``remat_blocks``: each block under ``jax.checkpoint`` (recomputed in the backward pass)."""
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3])  # float32 table: promotes as torch (autocast) does
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = _remat_block(blk, x) if remat_blocks else blk(x)
            if i == self.stage_ends[-1] or (i in self.stage_ends and self.return_interm_layers):
                outputs.append(x)
        return outputs

    def get_layer_id(self, layer_name: str) -> int:
        """Layer id for layer-wise lr decay, on torch names (as hieradet.Hiera.get_layer_id)."""
        num_layers = len(self.blocks)
        if "rel_pos" in layer_name:
            return num_layers + 1
        if "pos_embed" in layer_name or "patch_embed" in layer_name:
            return 0
        if "blocks" in layer_name:
            return int(layer_name.split("blocks")[1].split(".")[1]) + 1
        return num_layers + 1

    def get_num_layers(self) -> int:
        return len(self.blocks)


def _remat_block(blk, x):
    """``blk(x)`` under ``jax.checkpoint``; the block's RNG streams (drop path) are carried out
    functionally and written back, so that the stream counters advance as without remat."""
    g, st = nnx.split(blk)

    def f(st, x):
        b = nnx.merge(g, st)
        return b(x), nnx.state(b, nnx.RngState)

    y, rs = jax.checkpoint(f)(st, x)
    nnx.update(blk, rs)
    return y
