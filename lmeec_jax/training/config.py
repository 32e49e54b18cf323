"""Training configuration: dataclasses, YAML files and ``--set key=value`` overrides.

A config is a YAML mapping with the sections of :class:`Config` (``model``, ``data``,
``optim``, ``loss``, ``train``, ``eval``, ``runtime``); any key left out keeps its
default. ``--set a.b.c=VALUE`` changes one key after the file is read (``VALUE`` is parsed
as YAML: ``1e-4``, ``true``, ``[1, 2]``, ``{image_size: 64}``...). Unknown keys are errors.
The resolved config is written to ``<workdir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lmeec_jax.data.synthetic import PATTERNS
from lmeec_jax.training.losses import LossConfig
from lmeec_jax.training.optim import OptimConfig

__all__ = [
    "ModelSection",
    "SyntheticSection",
    "DataSection",
    "TrainSection",
    "EvalSection",
    "RuntimeSection",
    "Config",
    "ConfigError",
    "from_dict",
    "to_dict",
    "parse_override",
    "apply_overrides",
    "load_config",
    "save_config",
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "synthetic_tiny.yaml"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSection:
    name: str = "lmeec_hiera_nano"  # lmeec_jax.models.config.get_config name
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {image_size: 64, trunk: {...}}
    init_from: Optional[str] = None  # converted SAM 2.1 / LM-EEC model dir (python -m convert); None: random init
    fresh: tuple = ("MV_MoE.",)  # parameter-name prefixes allowed to be missing from init_from (initialised fresh)
    seed: int = 0  # random init (and fresh modules)
    drop_path_rate: Optional[float] = None  # Hiera stochastic depth; None keeps the model config's value
    dtype: str = "float32"  # compute dtype (params stay float32): float32 | bfloat16
    remat_blocks: bool = False  # jax.checkpoint per Hiera block
    remat_frames: bool = False  # jax.checkpoint per frame (image encoding one frame at a time, tracking step)


@dataclass(frozen=True)
class SyntheticSection:
    """Generate a synthetic ego-exo dataset when ``data.train_dir`` is empty (built-in run)."""

    enabled: bool = False
    dir: Optional[str] = None  # default <workdir>/data
    train_takes: int = 32
    val_takes: int = 6
    seed: int = 0
    n_frames: int = 16
    raw_masks: bool = False  # masks at JPEG size (faster to load) instead of the raw 2x/4x
    workers: Optional[int] = None
    object_scale: float = 1.0  # x object sizes
    exo_distance: tuple = (1.7, 2.5)  # exocentric camera distance range (m)
    p_lookalike: float = 0.3  # probability of a look-alike distractor per object
    p_small: float = 0.25  # probability of a small object
    patterns: tuple = PATTERNS  # object textures
    distinct_colours: bool = False  # no two objects share a main colour


@dataclass(frozen=True)
class DataSection:
    train_dir: Optional[str] = None  # processed split (<take>/annotation.json, <take>/<cam>/<frame>.jpg)
    val_dir: Optional[str] = None
    takes_file: Optional[str] = None  # optional take list (txt, or split json) restricting train_dir
    num_frames: int = 8
    multiplier: int = 2  # each video is visited `multiplier` times per epoch (RepeatFactorWrapper)
    workers: int = 0  # grain worker processes (0: in the main process)
    worker_buffer: int = 2  # per-worker prefetch (clips)
    threads: int = 2  # grain read threads in each process
    prefetch: int = 4  # grain read-ahead buffer (clips)
    preresize: Optional[int] = None  # shrink frames to this long side before augmenting (speed; None: as stored)
    augment: dict = field(default_factory=dict)  # AugmentConfig overrides (size = model image size)
    max_videos: Optional[int] = None  # use only the first N training videos (debugging)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 8  # clips per device
    epochs: int = 60
    steps: Optional[int] = None  # total optimiser steps; None: epochs * steps_per_epoch
    seed: int = 123  # data order, augmentation and dropout
    log_every: int = 10
    ckpt_every: int = 500
    keep: int = 3
    async_checkpointing: bool = True
    log_data: bool = False  # write each step's clip ids to metrics.jsonl
    fail_on_nonfinite: bool = True  # stop at a NaN/inf loss (keeping the last good checkpoint)
    debug_nan_step: Optional[int] = None  # testing: feed NaN images at this step (0-based)


@dataclass(frozen=True)
class EvalSection:
    every: int = 0  # validate every N steps (0: only at the end)
    final: bool = True  # evaluate at the end and write eval_final.json
    initial: bool = False  # also evaluate the model before training (recorded in eval_final.json)
    baseline: bool = True  # also score the "paste the source mask" baseline
    max_videos: Optional[int] = None
    chunk: int = 8  # frames per scan_chunk call
    overlays: int = 4  # overlay PNGs written at the final evaluation


@dataclass(frozen=True)
class RuntimeSection:
    distributed: bool = False  # jax.distributed.initialize() (multi-host; also on JAX_COORDINATOR_ADDRESS)
    num_devices: Optional[int] = None  # use only the first N devices (default all)
    compilation_cache: Optional[str] = None  # persistent XLA compilation cache directory
    progress: bool = True  # tqdm progress bar


@dataclass(frozen=True)
class Config:
    name: str = "synthetic_tiny"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


# ----------------------------------------------------------------------------- dict <-> dataclass


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from a (partial) nested dict; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kw[f.name] = _convert(hints[f.name], d[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kw)


def to_dict(obj) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], yaml-parsed VALUE)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), value


def _known_path(cls, path: list[str]):
    """Check that ``path`` names a field (dict-typed fields accept any sub-key)."""
    tp = cls
    for i, p in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            return  # inside a free-form dict field
        hints = typing.get_type_hints(tp)
        if p not in hints:
            raise ConfigError(f"unknown config key {'.'.join(path[: i + 1])}")
        tp = hints[p]
        if typing.get_origin(tp) is typing.Union:
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp


def apply_overrides(d: dict, overrides, cls=None) -> dict:
    """Apply ``KEY=VALUE`` strings to the nested dict ``d`` (a copy is returned)."""
    import copy

    d = copy.deepcopy(d)
    for text in overrides or ():
        path, value = parse_override(text)
        if cls is not None:
            _known_path(cls, path)
        node = d
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return d


def load_config(path=None, overrides=()) -> Config:
    """Read a YAML config (default: the built-in ``configs/synthetic_tiny.yaml``), apply overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides, Config)
    return from_dict(Config, raw)


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
