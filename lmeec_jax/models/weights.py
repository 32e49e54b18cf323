"""Map PyTorch state dicts onto NNX modules whose attribute paths mirror the torch names.

The rule is mechanical, so that a name table never has to be written by hand:

* an NNX leaf ``a.b.kernel`` of an ``nnx.Linear`` (2-D) comes from torch ``a.b.weight``
  transposed ``[out, in] -> [in, out]``;
* an NNX leaf ``a.b.kernel`` of an ``nnx.Conv`` (4-D) comes from torch ``a.b.weight``
  permuted ``[O, I, kh, kw] -> [kh, kw, I, O]``;
* ``a.b.scale`` (``nnx.LayerNorm``) and ``a.b.embedding`` (``nnx.Embed``) come from
  ``a.b.weight`` unchanged;
* every other leaf (raw ``nnx.Param`` such as ``pos_embed``, custom modules that keep the
  torch layout, buffers) comes from the torch key of the same name unchanged.

Loading is strict: every torch tensor must be used and every NNX leaf written, with the
same shape, or :class:`StateDictMismatch` lists each offending key. Leaves that were not
written are set to NaN first, so a weight that slipped through cannot hide.

This module does not import torch: state dicts arrive as ``{name: np.ndarray}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "StateDictMismatch",
    "torch_names",
    "load_state_dict",
    "to_state_dict",
    "strip_prefix",
]


class StateDictMismatch(ValueError):
    """Raised when a state dict does not fit a module exactly."""

    def __init__(self, missing=(), unexpected=(), bad_shape=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.bad_shape = list(bad_shape)
        lines = []
        for k in self.missing:
            lines.append(f"missing key (needed by the model, absent from the checkpoint): {k}")
        for k in self.unexpected:
            lines.append(f"unexpected key (in the checkpoint, unknown to the model): {k}")
        for k, src, dst in self.bad_shape:
            lines.append(f"wrong shape for {k}: checkpoint {tuple(src)}, model expects {tuple(dst)}")
        super().__init__(
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.bad_shape)} mis-shaped keys:\n  " + "\n  ".join(lines)
        )


def _identity(x):
    return x


def _linear(x):
    return x.T


def _conv(x):
    return np.transpose(x, (2, 3, 1, 0))


def _inv_conv(x):
    return np.transpose(x, (3, 2, 0, 1))


@dataclass
class _Leaf:
    path: tuple
    var: nnx.Variable
    torch_key: str
    to_jax: Callable = _identity
    to_torch: Callable = _identity
    shape: tuple = field(default=())


def _leaves(module: nnx.Module) -> list[_Leaf]:
    out = []
    for path, var in nnx.graph.iter_graph(module):
        if not isinstance(var, nnx.Variable):
            continue
        if not isinstance(var, (nnx.Param, Buffer)):
            continue
        names = [str(p) for p in path]
        last = names[-1]
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = tuple(value.shape)
        prefix = ".".join(names[:-1])
        tk = (prefix + "." if prefix else "")
        if last == "kernel" and len(shape) == 2:
            out.append(_Leaf(tuple(path), var, tk + "weight", _linear, _linear, shape))
        elif last == "kernel" and len(shape) == 4:
            out.append(_Leaf(tuple(path), var, tk + "weight", _conv, _inv_conv, shape))
        elif last in ("scale", "embedding"):
            out.append(_Leaf(tuple(path), var, tk + "weight", _identity, _identity, shape))
        else:
            out.append(_Leaf(tuple(path), var, tk + last, _identity, _identity, shape))
    return out


class Buffer(nnx.Variable):
    """A non-trainable tensor that lives in the torch state dict (a registered buffer)."""


def torch_names(module: nnx.Module) -> list[str]:
    """The torch state-dict names this module expects, in graph order."""
    return [leaf.torch_key for leaf in _leaves(module)]


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keep only keys under ``prefix`` (e.g. ``"image_encoder."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    dtype=jnp.float32,
) -> list[str]:
    """Write ``state_dict`` (torch names, numpy arrays) into ``module`` in place.

    ``allow_missing``: torch names that may be absent (they keep their initial values);
    used when a new sub-module (e.g. MV_MoE) is initialised fresh on purpose.
    Returns the list of allowed-missing keys that were indeed absent.
    Raises :class:`StateDictMismatch` on any other missing, unexpected or mis-shaped key.
    """
    allow_missing = set(allow_missing)
    leaves = _leaves(module)
    seen = set()
    missing, bad_shape, fresh = [], [], []
    for leaf in leaves:
        if leaf.torch_key not in state_dict:
            if leaf.torch_key in allow_missing:
                fresh.append(leaf.torch_key)
            else:
                missing.append(leaf.torch_key)
                leaf.var.set_value(jnp.full(leaf.shape, jnp.nan, dtype=leaf.var.get_value().dtype))
            continue
        seen.add(leaf.torch_key)
        src = np.asarray(state_dict[leaf.torch_key])
        val = leaf.to_jax(src)
        if tuple(val.shape) != leaf.shape:
            bad_shape.append((leaf.torch_key, src.shape, leaf.to_torch(np.empty(leaf.shape)).shape))
            continue
        leaf.var.set_value(jnp.asarray(val, dtype=dtype if np.issubdtype(src.dtype, np.floating) else None))
    unexpected = [k for k in state_dict if k not in seen]
    if strict and (missing or unexpected or bad_shape):
        raise StateDictMismatch(missing, unexpected, bad_shape)
    return fresh


def to_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: the module's parameters as a torch-named numpy state dict."""
    return {leaf.torch_key: leaf.to_torch(np.asarray(leaf.var.get_value())) for leaf in _leaves(module)}
