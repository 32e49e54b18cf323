"""Mixed precision as CUDA autocast does it, for training with ``model.dtype: bfloat16``.

The reference trains under ``torch.autocast("cuda", dtype=torch.bfloat16)``: parameters stay
float32; matmul-like ops (``linear``, ``conv*``, ``matmul``/``bmm``, SDPA) cast their inputs
to bf16 and return bf16; ``layer_norm``/``softmax``/losses run in float32; every other op
follows type promotion (bf16 + a float32 tensor -> float32). Here, one policy:

* **master parameters float32** - nothing casts the parameter tree; gradients are float32;
* **bf16 matmuls/convs** - every ``nnx.Linear``/``nnx.Conv`` (incl.
  :class:`~lmeec_jax.models.common.Conv2d`), ``nnx.ConvTranspose``/``nnx.LinearGeneral``/
  ``nnx.Einsum`` and the mask decoder's :class:`~lmeec_jax.models.mask_decoder.ConvTranspose2x2`
  get ``dtype=bfloat16``: inputs, kernel and bias are cast to bf16 inside the layer (XLA
  accumulates in float32), the output is bf16. The attention products take the bf16
  projections; their softmax is float32 (as before, in ``attention.py`` / ``hiera.py`` /
  ``memory_attention.py``);
* **float32 norms** - ``nnx.LayerNorm`` (incl. LayerNorm2d) / ``GroupNorm`` / ``RMSNorm``
  compute statistics and output in float32 (``dtype=float32``, float32 scale and bias);
* **float32 positional tables** - Hiera's ``pos_embed``, the sine tables, RoPE (applied in
  float32, cast back to the q/k dtype as torch), ``maskmem_tpos_enc``, the object-pointer
  temporal encoding and the prompt encoder's random Fourier features are float32 parameters,
  buffers or numpy tables, used by promotion (the FPN / memory-encoder sine tables are cast to
  their feature's dtype, ``.to(x.dtype)`` as in the reference);
* **float32 mask logits and losses** - the mask decoder's final product accumulates in and
  returns float32 (``MaskDecoder.logits_dtype``); the frame step returns float32 logits,
  IoUs and object scores, and the losses compute in float32.

The policy lives in the module graph (static ``dtype`` attributes), so it is applied to a
graphdef (:func:`autocast_graphdef`) or a module (:func:`apply_autocast`); for float32 both
are the identity, so the float32 paths are unchanged.

Remaining differences from torch autocast (kept for memory): the training forward stores
the image features, the memory window (features and positions, ``maskmem_tpos_enc`` added in
the window's dtype) and the experts' outputs in the compute dtype
(:mod:`lmeec_jax.training.forward`, :mod:`lmeec_jax.tracking`), where torch would
promote some of them to float32.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from lmeec_jax.models.mask_decoder import ConvTranspose2x2, MaskDecoder

__all__ = ["MATMUL_LAYERS", "NORM_LAYERS", "is_mixed", "apply_autocast", "autocast_graphdef"]

MATMUL_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose, ConvTranspose2x2)
NORM_LAYERS = (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)


def is_mixed(dtype: Any) -> bool:
    """True for a compute dtype other than float32 (the policy applies)."""
    return jnp.dtype(dtype) != jnp.float32


def apply_autocast(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Set the policy on ``model`` in place (matmul/conv layers in ``dtype``, norms and the mask
    logits in float32) and return it; float32: nothing changes. Parameters are not touched."""
    dtype = jnp.dtype(dtype)
    if not is_mixed(dtype):
        return model
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute dtype must be floating, got {dtype}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MATMUL_LAYERS):
            node.dtype = dtype
        elif isinstance(node, NORM_LAYERS):
            node.dtype = jnp.float32
        if isinstance(node, MaskDecoder):
            node.logits_dtype = jnp.float32
    return model


def autocast_graphdef(graphdef, *states, dtype: Any):
    """The graphdef of ``nnx.merge(graphdef, *states)`` with :func:`apply_autocast`; the states
    (any split of the module's state, e.g. params, RNG streams, the rest) are unchanged and
    merge with it as before. float32: ``graphdef`` itself."""
    if not is_mixed(dtype):
        return graphdef
    model = apply_autocast(nnx.merge(graphdef, *states), dtype)
    return nnx.graphdef(model)
