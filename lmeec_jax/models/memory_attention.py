"""SAM 2.1 memory attention (sam2.modeling.memory_attention + RoPEAttention), batch-first.

State-dict names: ``layers.{i}.self_attn.{q,k,v,out}_proj``, ``layers.{i}.cross_attn_image.
{q,k,v,out}_proj`` (k/v from kv_in_dim 64), ``layers.{i}.linear{1,2}``, ``layers.{i}.norm{1,2,3}``,
``norm``. No buffers (torch keeps the RoPE table as a plain attribute).

Padded memory: the memory may hold a fixed number of frame slots (``S·N`` spatial tokens,
``N = h·w``) followed by a fixed number of object-pointer tokens, with ``memory_mask``
[B, S·N + P] marking the valid keys. Invalid keys get exactly zero attention weight, and
since a key's RoPE only depends on its position inside its frame, they change nothing
else: the output equals that of the memory with the invalid slots removed.

Dropout (configured 0.1: attention weights, the three residual branches and the MLP) is
off by default (inference). ``module.train()`` turns it on (``module.eval()`` off again),
or pass ``deterministic=False`` to the call; it draws from the ``dropout`` stream of the
``rngs`` given at construction.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.attention import Attention
from lmeec_jax.models.rope import apply_rotary_enc, freqs_for_length

__all__ = ["RoPEAttention", "MemoryAttentionLayer", "MemoryAttention"]


def _attend(q, k, v, key_mask, dropout: nnx.Dropout, deterministic):
    """softmax(q kᵀ/√d) v (softmax in float32) with an optional key mask [B, Nk] and
    dropout on the attention weights (torch F.scaled_dot_product_attention(dropout_p))."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
    if key_mask is not None:
        m = key_mask[:, None, None, :]
        w = jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=-1)
        w = jnp.nan_to_num(jnp.where(m, w, 0.0))  # all-masked rows → zeros
    else:
        w = jax.nn.softmax(logits, axis=-1)
    w = dropout(w, deterministic=deterministic)
    return jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v)


class RoPEAttention(Attention):
    """Attention with axial RoPE on q and k (after projection, per head).

    ``feat_sizes`` = [w, h] of the map the table is built for; as in sam2==1.1.0, a query
    length other than w·h uses a square sqrt(N)×sqrt(N) grid instead (30×30 at 480).
    ``rope_k_repeat``: keys longer than the queries are whole frames of N tokens, each
    rotated with the same table (cross-attention to memories).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        *,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: Sequence[int] = (64, 64),
        rngs: nnx.Rngs,
    ):
        super().__init__(embedding_dim, num_heads, downsample_rate, dropout, kv_in_dim, rngs=rngs)
        self.rope_theta = float(rope_theta)
        self.rope_k_repeat = bool(rope_k_repeat)
        self.feat_sizes = tuple(int(s) for s in feat_sizes)
        self.head_dim = self.internal_dim // num_heads
        self.attn_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def __call__(self, q, k, v, num_k_exclude_rope: int = 0, key_mask=None, deterministic: bool | None = None):
        """q [B, Nq, C], k/v [B, Nk, kv_in_dim]; key_mask optional bool [B, Nk].
        ``num_k_exclude_rope`` (static int): the last keys that are not rotated."""
        q = self.separate_heads(self.q_proj(q))
        k = self.separate_heads(self.k_proj(k))
        v = self.separate_heads(self.v_proj(v))
        cos, sin = freqs_for_length(self.head_dim, q.shape[-2], self.feat_sizes, self.rope_theta)
        if q.shape[-2] != k.shape[-2] and not self.rope_k_repeat:
            raise ValueError("query and key lengths differ but rope_k_repeat is False")
        q, k = apply_rotary_enc(q, k, cos, sin, repeat_freqs_k=self.rope_k_repeat, num_k_exclude_rope=num_k_exclude_rope)
        out = _attend(q, k, v, key_mask, self.attn_dropout, deterministic)
        return self.out_proj(self.recombine_heads(out))


_ACT = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class MemoryAttentionLayer(nnx.Module):
    """Pre-norm layer: self-attention (RoPE) → cross-attention to memory (RoPE on the
    spatial keys) → MLP (``linear1`` → activation → ``linear2``), each with a residual."""

    def __init__(
        self,
        activation: str,
        cross_attention: nnx.Module,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        pos_enc_at_attn: bool,
        pos_enc_at_cross_attn_keys: bool,
        pos_enc_at_cross_attn_queries: bool,
        self_attention: nnx.Module,
        *,
        rngs: nnx.Rngs,
    ):
        if activation not in _ACT:
            raise ValueError(f"activation should be relu/gelu, not {activation}")
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.dropout_value = dropout
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nnx.Linear(d_model, dim_feedforward, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.linear2 = nnx.Linear(dim_feedforward, d_model, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.norm3 = nnx.LayerNorm(d_model, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.dropout1 = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.dropout3 = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.activation_str = activation
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    @staticmethod
    def _call_attn(attn, q, k, v, num_k_exclude_rope, key_mask, deterministic):
        if isinstance(attn, RoPEAttention):
            return attn(q, k, v, num_k_exclude_rope=num_k_exclude_rope, key_mask=key_mask, deterministic=deterministic)
        if num_k_exclude_rope > 0:
            raise ValueError("num_k_exclude_rope needs a RoPEAttention")
        return attn(q, k, v, key_mask=key_mask)

    def __call__(self, tgt, memory, pos=None, query_pos=None, num_k_exclude_rope: int = 0,
                 memory_mask=None, deterministic: bool | None = None):
        # self-attention
        t2 = self.norm1(tgt)
        qk = t2 + query_pos if self.pos_enc_at_attn else t2
        t2 = self._call_attn(self.self_attn, qk, qk, t2, 0, None, deterministic)
        tgt = tgt + self.dropout1(t2, deterministic=deterministic)
        # cross-attention to the memory
        t2 = self.norm2(tgt)
        t2 = self._call_attn(
            self.cross_attn_image,
            t2 + query_pos if self.pos_enc_at_cross_attn_queries else t2,
            memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            memory,
            num_k_exclude_rope,
            memory_mask,
            deterministic,
        )
        tgt = tgt + self.dropout2(t2, deterministic=deterministic)
        # MLP
        t2 = self.norm3(tgt)
        t2 = self.linear2(self.dropout(_ACT[self.activation_str](self.linear1(t2)), deterministic=deterministic))
        return tgt + self.dropout3(t2, deterministic=deterministic)


def _clone_layers(layer, num_layers: int, rngs: nnx.Rngs) -> list:
    """torch ``get_clones`` (deep copies: identical initial weights). Each copy's dropout
    modules get a fresh stream so that they do not draw identical masks. ``layer`` may
    also be a factory ``layer(rngs=...)``."""
    if isinstance(layer, nnx.Module):
        out = []
        for _ in range(num_layers):
            c = nnx.clone(layer)
            for _, m in nnx.iter_modules(c):
                if isinstance(m, nnx.Dropout):
                    m.rngs = rngs["dropout"].fork()
            out.append(c)
        return out
    if callable(layer):
        return [layer(rngs=rngs) for _ in range(num_layers)]
    raise TypeError(f"layer must be an nnx.Module or a factory, got {type(layer)}")


class MemoryAttention(nnx.Module):
    """``layers`` (clones of ``layer``) then the final LayerNorm ``norm``.

    Unlike torch, inputs and output are batch-first [B, N, C] whatever ``batch_first``
    (torch takes sequence-first tensors and transposes them when ``batch_first``; the
    flag is kept for config compatibility only).
    """

    def __init__(self, d_model: int, pos_enc_at_input: bool, layer, num_layers: int,
                 batch_first: bool = True, *, rngs: nnx.Rngs):
        self.d_model = d_model
        self.layers = nnx.List(_clone_layers(layer, num_layers, rngs))
        self.num_layers = num_layers
        self.norm = nnx.LayerNorm(d_model, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def __call__(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int = 0,
                 memory_mask=None, deterministic: bool | None = None):
        """curr / curr_pos [B, N, C] (N = h·w tokens of the current frame, row-major);
        memory / memory_pos [B, M, Cmem] = frames of N tokens each, then
        ``num_obj_ptr_tokens`` (static int) object-pointer tokens excluded from RoPE;
        memory_mask: optional bool [B, M], False = padded key (zero weight). → [B, N, C]."""
        if isinstance(curr, (list, tuple)):
            if len(curr) != 1 or len(curr_pos) != 1:
                raise ValueError("curr / curr_pos lists must have one element")
            curr, curr_pos = curr[0], curr_pos[0]
        if curr.shape[0] != memory.shape[0]:
            raise ValueError("batch size must be the same for curr and memory")
        out = curr
        if self.pos_enc_at_input and curr_pos is not None:
            out = out + 0.1 * curr_pos
        for layer in self.layers:
            n_ex = num_obj_ptr_tokens if isinstance(layer.cross_attn_image, RoPEAttention) else 0
            out = layer(out, memory, pos=memory_pos, query_pos=curr_pos, num_k_exclude_rope=n_ex,
                        memory_mask=memory_mask, deterministic=deterministic)
        return self.norm(out)
