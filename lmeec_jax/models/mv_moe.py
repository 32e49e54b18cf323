"""MV_MoE: LM-EEC's Memory-View Mixture-of-Experts fusion (SPEC "Model", point 5).

Reference: ``sam2/modeling/sam2_base.py`` class ``MV_MoE`` (LM-EEC), instantiated as
``SAM2Base.MV_MoE = MV_MoE(256)``. Two experts are fused:

* ``M`` -- memory expert: memory attention of the target features against the fused past
  memory (source bank | target bank | object pointers);
* ``V`` -- view expert: memory attention of the target features against the current
  frame's source-view memory only.

Computation (C = ``in_channels`` = 256, NHWC here, NCHW in torch)::

    g   = concat(mean_hw(M), mean_hw(V))            # [B, 2C]
    aM  = mlp1(g);  aV = mlp2(g)                    # [B, C], each Linear->ReLU->Linear->Sigmoid
    M1  = M + M * aM;  V1 = V + V * aV              # channel gates, broadcast over (h, w)
    X   = concat(M1, V1)                            # [B, H, W, 2C]  (M first)
    sM  = conv1(X); sV = conv2(X)                   # [B, H, W, 1], Conv3x3(no bias)->ReLU->Conv1x1(no bias)->Sigmoid
    out = (M1 + M1 * sM) + (V1 + V1 * sV)

Torch state-dict names (relative to this module): ``mlp1.{0,2}.{weight,bias}``,
``mlp2.{0,2}.{weight,bias}``, ``conv1.{0,2}.weight``, ``conv2.{0,2}.weight``. The NNX
attributes mirror them: ``mlp1[0].kernel`` etc.; positions 1 and 3 of each ``nnx.List`` hold
parameterless activation modules so that the torch ``nn.Sequential`` indices line up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.common import Activation, Conv2d

__all__ = ["MV_MoE", "mv_moe_or_view"]


class _Sigmoid(nnx.Module):
    """Parameterless ``nn.Sigmoid`` placeholder (keeps Sequential index 3)."""

    def __call__(self, x):
        return jax.nn.sigmoid(x)


def _gate_mlp(c: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.List:
    return nnx.List(
        [
            nnx.Linear(2 * c, c, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            Activation("relu"),
            nnx.Linear(c, c, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            _Sigmoid(),
        ]
    )


def _gate_conv(c: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.List:
    return nnx.List(
        [
            Conv2d(
                2 * c, c, kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            ),
            Activation("relu"),
            Conv2d(
                c, 1, kernel_size=(1, 1), strides=(1, 1), padding=((0, 0), (0, 0)),
                use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            ),
            _Sigmoid(),
        ]
    )


def _run(seq: nnx.List, x):
    for layer in seq:
        x = layer(x)
    return x


class MV_MoE(nnx.Module):  # noqa: N801  (name mirrors the torch attribute ``MV_MoE``)
    """Memory-View MoE fusion. ``__call__(M, V)`` with NHWC ``[B, H, W, C]`` arrays.

    ``dtype``: computation dtype of the Linear/Conv layers (None = from inputs/params,
    i.e. float32 by default); ``param_dtype``: parameter storage dtype.
    """

    def __init__(
        self,
        in_channels: int = 256,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        c = in_channels
        self.in_channels = c
        self.mlp1 = _gate_mlp(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp2 = _gate_mlp(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = _gate_conv(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = _gate_conv(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def channel_gates(self, M, V):
        """``(aM, aV)``, each ``[B, C]``: the sigmoid channel gates of mlp1 / mlp2."""
        g = jnp.concatenate([jnp.mean(M, axis=(1, 2)), jnp.mean(V, axis=(1, 2))], axis=-1)
        return _run(self.mlp1, g), _run(self.mlp2, g)

    def __call__(self, M, V):
        """Fuse memory expert ``M`` and view expert ``V`` (both ``[B, H, W, C]``)."""
        if M.shape != V.shape or M.shape[-1] != self.in_channels:
            raise ValueError(f"MV_MoE expects two [B,H,W,{self.in_channels}] arrays, got {M.shape} and {V.shape}")
        aM, aV = self.channel_gates(M, V)
        M1 = M + M * aM[:, None, None, :]
        V1 = V + V * aV[:, None, None, :]
        X = jnp.concatenate([M1, V1], axis=-1)
        sM = _run(self.conv1, X)  # [B, H, W, 1]
        sV = _run(self.conv2, X)
        return (M1 + M1 * sM) + (V1 + V1 * sV)


def mv_moe_or_view(moe: MV_MoE, M, V, has_memory):
    """The reference's branch (sam2_base.py l.995-1014) for ``lax.scan``: ``moe(M, V)`` where
    ``has_memory`` (a scalar bool, see :func:`lmeec_jax.tracking.memory.has_past_memory`) else ``V``.

    Both branches are computed and ``V`` is selected by value, so a garbage ``M`` (e.g. from
    attention over an all-masked memory) never reaches the output; for gradients ``M`` should
    still be finite (a NaN in the unselected branch turns into NaN gradients).
    """
    return jnp.where(has_memory, moe(M, V), V)
