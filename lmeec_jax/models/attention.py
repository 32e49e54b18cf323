"""Multi-head attention of SAM 2 (sam2.modeling.sam.transformer.Attention).

Kept in its own file because the mask decoder's two-way transformer and the memory
attention (RoPE variant) both build on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def scaled_dot_product_attention(q, k, v, key_mask=None):
    """softmax(q kᵀ/√d) v with the softmax in float32.

    q: [B, Hd, Nq, D], k/v: [B, Hd, Nk, D]; key_mask: optional bool [B, Nk] (False = key
    gets zero weight). A row whose keys are all masked returns zeros.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
    if key_mask is not None:
        m = key_mask[:, None, None, :]
        logits = jnp.where(m, logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=-1)
        w = jnp.where(m, w, 0.0)
        w = jnp.nan_to_num(w)
    else:
        w = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v)


class Attention(nnx.Module):
    """q/k/v/out projections with optional internal downsampling and kv_in_dim."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nnx.Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.k_proj = nnx.Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.v_proj = nnx.Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.out_proj = nnx.Linear(self.internal_dim, embedding_dim, rngs=rngs)
        self.dropout_p = dropout  # attention dropout; SAM 2.1 configs use 0.1 in memory attention

    def separate_heads(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    @staticmethod
    def recombine_heads(x):
        b, h, n, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)

    def __call__(self, q, k, v, key_mask=None):
        q = self.separate_heads(self.q_proj(q))
        k = self.separate_heads(self.k_proj(k))
        v = self.separate_heads(self.v_proj(v))
        out = scaled_dot_product_attention(q, k, v, key_mask)
        return self.out_proj(self.recombine_heads(out))
