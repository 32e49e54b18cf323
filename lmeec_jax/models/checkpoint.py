"""Saving and loading model weights: an orbax checkpoint of the parameters plus config.json.

Layout of a model directory (what ``python -m convert`` writes)::

    DIR/config.json   the ModelConfig (name, sizes, image_size, mv_moe)
    DIR/params/       orbax checkpoint of {torch-style name: array}

Parameters are stored under their torch state-dict names (the same names the converter
reads), so a directory can be inspected or exported back without the NNX graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmeec_jax.models.config import ModelConfig
from lmeec_jax.models.weights import load_state_dict, to_state_dict

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: nnx.Module, cfg: ModelConfig, out_dir: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``model``'s parameters and ``cfg`` to ``out_dir`` (created if needed)."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: np.asarray(v) for k, v in to_state_dict(model).items()}
    ckptr = ocp.StandardCheckpointer()
    target = out / PARAMS_DIR
    ckptr.save(target, sd, force=overwrite)
    ckptr.wait_until_finished()
    # config last: its presence marks a complete directory.
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(cfg.to_json())
    tmp.replace(out / CONFIG_FILE)
    return out


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model directory written by `python -m convert`?)")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed model config: {e}") from None


def load_state(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The stored parameters as a torch-named numpy state dict."""
    path = Path(model_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing parameter checkpoint")
    restored = ocp.StandardCheckpointer().restore(path)
    return {k: np.asarray(v) for k, v in restored.items()}


def load_model(model_dir: str | os.PathLike, *, seed: int = 0, **config_overrides):
    """Build the model described by ``DIR/config.json`` and load its parameters (strict).

    ``config_overrides`` may change fields that do not affect parameter shapes
    (e.g. ``image_size=480``).
    """
    from lmeec_jax.models.sam2 import build_model  # local: keeps this module light

    cfg = load_config(model_dir)
    if config_overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **config_overrides})
    model = build_model(cfg, seed=seed, abstract=True)
    load_state_dict(model, load_state(model_dir))
    return model, cfg
