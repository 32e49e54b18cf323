"""Model configurations, named and sized like the SAM 2.1 yaml files.

``get_config("sam2.1_hiera_b+")`` gives the published SAM 2.1 base-plus at 1024;
``get_config("lmeec_hiera_b+")`` is LM-EEC: base-plus at 480 with the MV_MoE module.
Any field can be changed with ``dataclasses.replace`` or ``get_config(name, **overrides)``
(``image_size=480``, ``trunk={"drop_path_rate": 0.1}``...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HieraConfig:
    """sam2.modeling.backbones.hieradet.Hiera arguments."""

    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (2, 3, 16, 3)
    global_att_blocks: tuple[int, ...] = (12, 16, 20)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    drop_path_rate: float = 0.0
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0

    @property
    def channel_list(self) -> tuple[int, ...]:
        """Output channels of the four stages, deepest first (the FPN's backbone_channel_list)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return tuple(reversed(dims))


@dataclass(frozen=True)
class ModelConfig:
    """SAM 2.1 (and LM-EEC) model configuration; defaults are the SAM 2.1 yaml values."""

    name: str = "sam2.1_hiera_b+"
    trunk: HieraConfig = field(default_factory=HieraConfig)
    image_size: int = 1024
    d_model: int = 256  # hidden_dim of neck / SAM heads / memory attention
    mem_dim: int = 64  # memory encoder out_dim
    num_maskmem: int = 7
    backbone_stride: int = 16
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1
    memory_attention_layers: int = 4
    dim_feedforward: int = 2048
    dropout: float = 0.1
    rope_theta: float = 10000.0
    fuser_layers: int = 2
    max_obj_ptrs_in_encoder: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    # Eval-time single-mask fallback that build_sam2(apply_postprocessing=True) switches on
    # (SAM 2.1 and LM-EEC inference both use it).
    dynamic_multimask_via_stability: bool = True
    # LM-EEC: the Memory-View Mixture-of-Experts module (MV_MoE) on top of SAM 2.1.
    mv_moe: bool = False

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        return self.trunk.channel_list

    @property
    def feat_size(self) -> int:
        """Side of the stride-16 feature map (64 at 1024, 30 at 480)."""
        return self.image_size // self.backbone_stride

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        trunk = d.pop("trunk", {})
        if isinstance(trunk, dict):
            tknown = {f.name for f in dataclasses.fields(HieraConfig)}
            bad = sorted(set(trunk) - tknown)
            if bad:
                raise ValueError(f"unknown trunk config keys: {bad}")
            trunk = HieraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in trunk.items()})
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(trunk=trunk, **d)


_TINY = HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                    window_pos_embed_bkg_spatial_size=(7, 7))
_SMALL = HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                     window_pos_embed_bkg_spatial_size=(7, 7))
_BASE_PLUS = HieraConfig(embed_dim=112, num_heads=2)
_LARGE = HieraConfig(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                     window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8))

CONFIGS: dict[str, ModelConfig] = {
    "sam2.1_hiera_t": ModelConfig(name="sam2.1_hiera_t", trunk=_TINY),
    "sam2.1_hiera_s": ModelConfig(name="sam2.1_hiera_s", trunk=_SMALL),
    "sam2.1_hiera_b+": ModelConfig(name="sam2.1_hiera_b+", trunk=_BASE_PLUS),
    "sam2.1_hiera_l": ModelConfig(name="sam2.1_hiera_l", trunk=_LARGE),
    # LM-EEC: SAM 2.1 base-plus at 480 with MV_MoE.
    # LM-EEC inference builds the predictor with apply_postprocessing=False: no dynamic multimask.
    "lmeec_hiera_b+": ModelConfig(name="lmeec_hiera_b+", trunk=_BASE_PLUS, image_size=480, mv_moe=True,
                                  dynamic_multimask_via_stability=False),
    # A laptop-sized model for the built-in synthetic run and fast tests (not a SAM 2.1 size).
    "lmeec_hiera_nano": ModelConfig(
        name="lmeec_hiera_nano",
        trunk=HieraConfig(embed_dim=24, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                          window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2)),
        image_size=128, d_model=64, mem_dim=32, dim_feedforward=256, mv_moe=True,
        dynamic_multimask_via_stability=False,
    ),
}

ALIASES = {
    "tiny": "sam2.1_hiera_t", "small": "sam2.1_hiera_s", "base_plus": "sam2.1_hiera_b+",
    "large": "sam2.1_hiera_l", "sam2.1_hiera_tiny": "sam2.1_hiera_t", "sam2.1_hiera_small": "sam2.1_hiera_s",
    "sam2.1_hiera_base_plus": "sam2.1_hiera_b+", "sam2.1_hiera_large": "sam2.1_hiera_l", "lmeec": "lmeec_hiera_b+",
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named config (see ``CONFIGS``/``ALIASES``), with optional field overrides."""
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS) + sorted(ALIASES)}")
    cfg = CONFIGS[key]
    trunk_over = overrides.pop("trunk", None)
    if trunk_over:
        cfg = dataclasses.replace(cfg, trunk=dataclasses.replace(cfg.trunk, **trunk_over))
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
