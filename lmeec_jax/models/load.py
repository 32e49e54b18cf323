"""Building a model from a spec string, the one place that does it for every command.

``DIR`` is a model directory written by ``python -m convert`` (or ``save_model``);
``random:<config-name>`` builds that config with random weights (``seed``).
"""

from __future__ import annotations

import os

from lmeec_jax.models.config import ModelConfig, get_config

__all__ = ["RANDOM_PREFIX", "load", "MissingMVMoE", "require_lmeec"]

RANDOM_PREFIX = "random:"


def load(spec: str | os.PathLike, *, seed: int = 0, **config_overrides):
    """``(model, cfg)`` for a model directory or ``random:<config-name>``."""
    spec = os.fspath(spec)
    if spec.startswith(RANDOM_PREFIX):
        from lmeec_jax.models.sam2 import build_model

        cfg = get_config(spec[len(RANDOM_PREFIX):])
        if config_overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **config_overrides})
        return build_model(cfg, seed=seed), cfg
    from lmeec_jax.models.checkpoint import load_model

    return load_model(spec, seed=seed, **config_overrides)


class MissingMVMoE(ValueError):
    """A plain SAM 2.1 model given to the two-view LM-EEC tracker."""


def require_lmeec(cfg: ModelConfig, spec: str = "") -> None:
    """Raise :class:`MissingMVMoE` (one line, with the command that makes the LM-EEC start
    point) unless ``cfg`` has the MV_MoE module."""
    if cfg.mv_moe:
        return
    where = f"{spec}: " if spec else ""
    raise MissingMVMoE(
        f"{where}model {cfg.name!r} has no MV_MoE weights (a plain SAM 2.1 model, not LM-EEC); make the LM-EEC "
        "start point with `python -m convert --src sam2.1_hiera_base_plus.pt --out DIR --model lmeec_hiera_b+` "
        "(MV_MoE initialised fresh, to be trained) or convert an LM-EEC checkpoint")
