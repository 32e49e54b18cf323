"""SAM 2 prompt encoder (sam2.modeling.sam.prompt_encoder.PromptEncoder), NHWC.

Parameter names mirror the torch state dict:
``pe_layer.positional_encoding_gaussian_matrix`` (buffer), ``point_embeddings.{0..3}.weight``,
``not_a_point_embed.weight``, ``mask_downscaling.{0,1,3,4,6}.*``, ``no_mask_embed.weight``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmeec_jax.models.common import Activation, conv2d
from lmeec_jax.models.weights import Buffer


def embedding(num: int, dim: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """torch nn.Embedding(num, dim): ``embedding`` [num, dim] maps to torch ``weight``."""
    return nnx.Embed(num, dim, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier-feature position encoding (sam2 PositionEmbeddingRandom).

    ``positional_encoding_gaussian_matrix``: [2, num_pos_feats] buffer (torch layout).
    The 2-term projection is written as two multiply-adds (no matmul), so it is exact f32
    whatever the backend's default matmul precision.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None, *, rngs: nnx.Rngs):
        if scale is None or scale <= 0.0:
            scale = 1.0
        g = scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        self.positional_encoding_gaussian_matrix = Buffer(g)

    def _pe_encoding(self, coords):
        """coords [..., 2] in [0, 1] (x, y) -> [..., 2 * num_pos_feats] (sin | cos)."""
        g = self.positional_encoding_gaussian_matrix[...]
        coords = 2 * coords - 1
        proj = coords[..., 0:1] * g[0] + coords[..., 1:2] * g[1]
        proj = 2 * np.float32(np.pi) * proj
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

    def __call__(self, size: Tuple[int, int]):
        """Dense grid encoding, [H, W, C] (torch returns C x H x W)."""
        h, w = size
        y = (np.arange(h, dtype=np.float32) + np.float32(0.5)) / np.float32(h)
        x = (np.arange(w, dtype=np.float32) + np.float32(0.5)) / np.float32(w)
        grid = np.stack(np.broadcast_arrays(x[None, :], y[:, None]), axis=-1).astype(np.float32)
        return self._pe_encoding(jnp.asarray(grid))

    def forward_with_coords(self, coords_input, image_size: Tuple[int, int]):
        """Encode pixel coordinates [B, N, 2] (x, y) of an image of size (H, W)."""
        coords_input = coords_input.astype(jnp.float32)
        coords = jnp.stack(
            [coords_input[..., 0] / image_size[1], coords_input[..., 1] / image_size[0]], axis=-1
        )
        return self._pe_encoding(coords)


class PromptEncoder(nnx.Module):
    """Points / boxes / mask prompts -> sparse [B, N, C] and dense [B, H, W, C] embeddings.

    Point labels: 1 positive, 0 negative, 2 / 3 box corners, -1 padding ("not a point").
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Sequence[int],
        input_image_size: Sequence[int],
        mask_in_chans: int,
        activation: str = "gelu",
        *,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        self.num_point_embeddings = 4  # pos/neg point + 2 box corners
        self.point_embeddings = nnx.List(
            [embedding(1, embed_dim, rngs=rngs) for _ in range(self.num_point_embeddings)]
        )
        self.not_a_point_embed = embedding(1, embed_dim, rngs=rngs)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        c4 = mask_in_chans // 4
        self.mask_downscaling = nnx.List(
            [
                conv2d(1, c4, 2, stride=2, rngs=rngs),
                nnx.LayerNorm(c4, epsilon=1e-6, use_fast_variance=False, rngs=rngs),
                Activation(activation),
                conv2d(c4, mask_in_chans, 2, stride=2, rngs=rngs),
                nnx.LayerNorm(mask_in_chans, epsilon=1e-6, use_fast_variance=False, rngs=rngs),
                Activation(activation),
                conv2d(mask_in_chans, embed_dim, 1, rngs=rngs),
            ]
        )
        self.no_mask_embed = embedding(1, embed_dim, rngs=rngs)

    def get_dense_pe(self):
        """Position encoding of the image-embedding grid, [1, H, W, C]."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(self, points, labels, pad: bool):
        points = points.astype(jnp.float32) + 0.5  # shift to pixel centre
        if pad:
            b = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((b, 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        pe = jnp.where(lab == -1, jnp.zeros_like(pe) + self.not_a_point_embed.embedding[...], pe)
        for i in range(self.num_point_embeddings):
            pe = jnp.where(lab == i, pe + self.point_embeddings[i].embedding[...], pe)
        return pe

    def _embed_boxes(self, boxes):
        boxes = boxes.astype(jnp.float32) + 0.5
        coords = boxes.reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner = jnp.concatenate(
            [self.point_embeddings[2].embedding[...], self.point_embeddings[3].embedding[...]], axis=0
        )
        return pe + corner[None]

    def _embed_masks(self, masks):
        x = masks
        for layer in self.mask_downscaling:
            x = layer(x)
        return x

    @staticmethod
    def _get_batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def __call__(self, points=None, boxes=None, masks=None):
        """
        points: optional (coords [B, N, 2] pixel (x, y), labels [B, N] int);
        boxes: optional [B, 4] (x0, y0, x1, y1) pixels; masks: optional [B, 4H, 4W, 1] (NHWC).
        Returns sparse [B, N', C] and dense [B, H, W, C].
        """
        bs = self._get_batch_size(points, boxes, masks)
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        else:
            sparse = jnp.zeros((bs, 0, self.embed_dim), jnp.float32)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(
                self.no_mask_embed.embedding[...].reshape(1, 1, 1, -1), (bs, h, w, self.embed_dim)
            )
        return sparse, dense
