"""Recognise which model a state dict belongs to from its tensor names and shapes (no torch)."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from lmeec_jax.models.config import CONFIGS, ModelConfig, get_config

MV_MOE_PREFIX = "MV_MoE."
# The 12 tensors LM-EEC adds on top of SAM 2.1.
MV_MOE_KEYS = tuple(
    f"MV_MoE.{m}.{i}.{p}" for m in ("mlp1", "mlp2") for i in (0, 2) for p in ("weight", "bias")
) + tuple(f"MV_MoE.{m}.{i}.weight" for m in ("conv1", "conv2") for i in (0, 2))


def _num_blocks(keys) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_model_name(shapes: Mapping[str, Sequence[int]]) -> str:
    """The SAM 2.1 size of a state dict: ``sam2.1_hiera_{t,s,b+,l}`` (or ``lmeec_hiera_b+``
    when MV_MoE tensors are present). Raises ValueError when nothing fits."""
    key = "image_encoder.trunk.patch_embed.proj.weight"
    if key not in shapes:
        raise ValueError(f"not a SAM 2.1 state dict: no {key!r}")
    embed_dim = int(shapes[key][0])
    n_blocks = _num_blocks(shapes)
    for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"):
        t = CONFIGS[name].trunk
        if t.embed_dim == embed_dim and sum(t.stages) == n_blocks:
            if any(k.startswith(MV_MOE_PREFIX) for k in shapes):
                if name != "sam2.1_hiera_b+":
                    raise ValueError(f"MV_MoE tensors on a {name} trunk: LM-EEC is defined for base_plus only")
                return "lmeec_hiera_b+"
            return name
    raise ValueError(f"no SAM 2.1 size has a trunk with embed_dim={embed_dim} and {n_blocks} blocks")


def resolve_config(shapes: Mapping[str, Sequence[int]], model: str | None, image_size: int | None) -> ModelConfig:
    name = model or infer_model_name(shapes)
    cfg = get_config(name)
    if image_size:
        cfg = get_config(name, image_size=image_size)
    return cfg
