"""Fast parameter initialisation with numpy.

Building an NNX model the usual way runs one XLA compilation per parameter shape for the
random initialisers (minutes on a small CPU for SAM 2). ``materialize`` instead takes the
abstract model from ``nnx.eval_shape`` and fills every leaf with numpy, following the
torch defaults SAM 2 relies on: Linear/Conv weights and biases U(±1/√fan_in), LayerNorm
scale 1 / bias 0, embeddings N(0, 1), layer-scale ``gamma`` 1e-6, learned position and
temporal embeddings truncated-normal(0.02). Deterministic from ``seed``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_TRUNC_NORMAL_002 = {
    "pos_embed", "pos_embed_window", "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc",
    "no_obj_ptr", "no_obj_embed_spatial",
}


def _trunc_normal(rng, shape, std=0.02):
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2.0
    while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2.0
    return x * std


def _value(rng, names: list[str], shape, dtype, fan_ins: dict):
    last = names[-1]
    parent = ".".join(names[:-1])
    if last == "kernel":
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        fan_ins[parent] = fan_in
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        return rng.uniform(-bound, bound, shape)
    if last == "scale":
        return np.ones(shape)
    if last == "bias":
        fan_in = fan_ins.get(parent)
        if fan_in is None:  # LayerNorm bias (its kernel sibling never comes) or custom module
            return np.zeros(shape)
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        return rng.uniform(-bound, bound, shape)
    if last == "embedding" or last == "positional_encoding_gaussian_matrix":
        return rng.standard_normal(shape)
    if last == "gamma":
        return np.full(shape, 1e-6)
    if last in _TRUNC_NORMAL_002:
        return _trunc_normal(rng, shape)
    if last == "weight":  # custom torch-layout weights, e.g. ConvTranspose [I, O, kh, kw]
        fan_in = int(shape[1] * np.prod(shape[2:])) if len(shape) > 2 else int(shape[-1])
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        return rng.uniform(-bound, bound, shape)
    return rng.standard_normal(shape) * 0.02


def materialize(abstract: nnx.Module, seed: int = 0, *, params: bool = True) -> nnx.Module:
    """Replace every abstract leaf of ``abstract`` (from ``nnx.eval_shape``) with a concrete
    value, in place, and return it. ``params=False`` fills only the RNG state (dropout
    streams), leaving parameters abstract for a checkpoint to fill."""
    rng = np.random.default_rng(seed)
    base_key = jax.random.key(seed)
    fan_ins: dict[str, int] = {}
    # Visit kernels before biases so a bias can use its layer's fan-in.
    leaves = [(p, v) for p, v in nnx.graph.iter_graph(abstract) if isinstance(v, nnx.Variable)]
    leaves.sort(key=lambda pv: 0 if str(pv[0][-1]) == "kernel" else 1)
    for i, (path, var) in enumerate(leaves):
        names = [str(p) for p in path]
        val = var.get_value()
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base_key, i))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(val.shape, val.dtype))
        elif params and isinstance(val, jax.ShapeDtypeStruct):
            arr = _value(rng, names, tuple(val.shape), val.dtype, fan_ins)
            var.set_value(jnp.asarray(arr, dtype=val.dtype))
    return abstract
