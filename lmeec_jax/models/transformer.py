"""Two-way transformer of the SAM mask decoder (sam2.modeling.sam.transformer), NHWC.

Parameter names mirror torch: ``layers.{i}.{self_attn,cross_attn_token_to_image,
cross_attn_image_to_token}.{q,k,v,out}_proj``, ``layers.{i}.norm{1..4}``, ``layers.{i}.mlp.layers.{0,1}``,
``final_attn_token_to_image``, ``norm_final_attn``.
"""

from __future__ import annotations

from flax import nnx

from lmeec_jax.models.attention import Attention
from lmeec_jax.models.common import MLP


def _layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch nn.LayerNorm(dim): eps 1e-5, two-pass variance."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image cross-attention, MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: str = "relu",
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.self_attn = Attention(embedding_dim, num_heads, rngs=rngs)
        self.norm1 = _layer_norm(embedding_dim, rngs=rngs)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm2 = _layer_norm(embedding_dim, rngs=rngs)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation, rngs=rngs)
        self.norm3 = _layer_norm(embedding_dim, rngs=rngs)
        self.norm4 = _layer_norm(embedding_dim, rngs=rngs)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries, keys, query_pe, key_pe):
        """queries [B, Nq, C], keys [B, Nk, C] (flattened image), same-shaped PEs."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """``depth`` two-way blocks then a final token->image attention and LayerNorm."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: str = "relu",
        attention_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
    ):
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    embedding_dim,
                    num_heads,
                    mlp_dim=mlp_dim,
                    activation=activation,
                    attention_downsample_rate=attention_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm_final_attn = _layer_norm(embedding_dim, rngs=rngs)

    def __call__(self, image_embedding, image_pe, point_embedding):
        """
        image_embedding, image_pe: [B, H, W, C] (NHWC); point_embedding: [B, N, C].
        Returns (queries [B, N, C], keys [B, H*W, C]) like torch (keys row-major over H, W).
        """
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
