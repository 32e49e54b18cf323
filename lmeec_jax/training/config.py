"""Training configuration: dataclasses (the schema), YAML files and ``--set key=value`` overrides.

The sections of :class:`Config` (``model``, ``data``, ``optim``, ``loss``, ``train``, ``eval``,
``runtime``) are an OmegaConf structured config (``OmegaConf.structured``); a YAML file is merged
onto it (any key left out keeps its default) and then each ``--set a.b.c=VALUE`` (``VALUE`` is
parsed as YAML: ``1e-4``, ``true``, ``[1, 2]``, ``{image_size: 64}``...; a mapping merges into a
section but replaces a dict field's value, as a list replaces a tuple field's, and an empty VALUE
is the empty string; ``--set model.overrides.image_size=64`` changes one key of a dict field).
Unknown keys at any depth and values of the wrong type raise :class:`ConfigError` (one line,
naming the key). The result is converted back to the frozen dataclasses (``OmegaConf.to_object``;
list values of tuple fields become tuples). The named configs ship in the package
(``lmeec_jax/configs/<name>.yaml``); ``--config`` takes such a name or a path. The resolved config
is written to ``<workdir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

from omegaconf import BooleanNode, DictConfig, ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lmeec_jax.data.synthetic import SynthConfig
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
    "config_names",
    "resolve_config",
    "load_config",
    "config_yaml",
    "save_config",
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # lmeec_jax/configs (package data)
DEFAULT_CONFIG = CONFIG_DIR / "synthetic_tiny.yaml"

_SYNTH = SynthConfig()  # the synthetic scene knobs' defaults (one source: lmeec_jax.data.synthetic)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSection:
    name: str = "lmeec_hiera_nano"  # lmeec_jax.models.config.get_config name
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {image_size: 64, trunk: {...}}
    init_from: Optional[str] = None  # converted SAM 2.1 / LM-EEC model dir (python -m convert); None: random init
    fresh: Tuple[str, ...] = ("MV_MoE.",)  # parameter-name prefixes that may be missing from init_from (made fresh)
    seed: int = 0  # random init (and fresh modules)
    drop_path_rate: Optional[float] = None  # Hiera stochastic depth; None keeps the model config's value
    dtype: str = "float32"  # compute dtype (params stay float32): float32 | bfloat16
    remat_blocks: bool = False  # jax.checkpoint per Hiera block
    remat_frames: bool = False  # jax.checkpoint per frame (image encoding one frame at a time, tracking step)


@dataclass(frozen=True)
class SyntheticSection:
    """Generate a synthetic ego-exo dataset when ``data.train_dir`` is empty (built-in run).

    The scene knobs (``n_frames``, ``object_scale`` ... ``distinct_colours``) default to
    :class:`lmeec_jax.data.synthetic.SynthConfig`'s values."""

    enabled: bool = False
    dir: Optional[str] = None  # default <workdir>/data
    train_takes: int = 32
    val_takes: int = 6
    seed: int = 0
    n_frames: int = _SYNTH.n_frames
    raw_masks: bool = False  # masks at JPEG size (faster to load) instead of the raw 2x/4x (generator default)
    workers: Optional[int] = None
    object_scale: float = _SYNTH.object_scale  # x object sizes
    exo_distance: Tuple[float, float] = _SYNTH.exo_distance  # exocentric camera distance range (m)
    p_lookalike: float = _SYNTH.p_lookalike  # probability of a look-alike distractor per object
    p_small: float = _SYNTH.p_small  # probability of a small object
    patterns: Tuple[str, ...] = _SYNTH.patterns  # object textures
    distinct_colours: bool = _SYNTH.distinct_colours  # no two objects share a main colour


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


# ----------------------------------------------------------------------------- OmegaConf <-> dataclass


def _where(key: str, source: Optional[str]) -> str:
    return f"{key} ({source})" if source else key


def _yaml_problem(e: Exception) -> str:
    return getattr(e, "problem", None) or " ".join(str(e).split())


def _one_line(e: OmegaConfBaseException, source: Optional[str] = None) -> ConfigError:
    """OmegaConf's multi-line message -> a one-line ConfigError naming the key."""
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):  # struct mode: a key not in the schema
        return ConfigError(f"unknown config key {_where(key, source)}")
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()
    return ConfigError(f"{_where(key or '(top level)', source)}: {msg[0] if msg else type(e).__name__}")


def _unfreeze(node) -> None:
    """Frozen dataclasses give read-only nodes; clear that so that files and overrides merge."""
    OmegaConf.set_readonly(node, None)
    if isinstance(node, DictConfig):
        children = (node._get_node(k) for k in node.keys())
    elif isinstance(node, ListConfig):
        children = (node._get_node(i) for i in range(len(node)))
    else:
        return
    for child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            _unfreeze(child)


def _schema(cls_or_obj) -> DictConfig:
    try:
        node = OmegaConf.structured(cls_or_obj)
    except OmegaConfBaseException as e:
        raise _one_line(e) from None
    _unfreeze(node)
    return node


def _is_section(node) -> bool:
    return isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))


def _check_types(node, value, key: str, source: Optional[str]) -> None:
    """What OmegaConf would coerce but is a mistake: ``3`` for a bool (-> True), a number for a
    string (-> "3"), a scalar for a section. Everything else is OmegaConf's validation."""
    if value is None or (isinstance(value, str) and "${" in value):  # None: Optional check by OmegaConf
        return
    if _is_section(node):
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, source)}: expected a mapping, got {value!r}")
        for k, v in value.items():
            if k in node:
                _check_types(node._get_node(k), v, f"{key}.{k}" if key else str(k), source)
    elif isinstance(node, BooleanNode) and not isinstance(value, bool):
        raise ConfigError(f"{_where(key, source)}: expected true/false, got {value!r}")
    elif isinstance(node, StringNode) and not isinstance(value, str):
        raise ConfigError(f"{_where(key, source)}: expected a string, got {value!r}")


def _node_at(cfg: DictConfig, path: list[str]):
    node = cfg
    for p in path:
        if not _is_section(node) or p not in node:
            return None  # unknown (OmegaConf reports it) or inside a free-form dict field
        node = node._get_node(p)
    return node


def _merge(cfg: DictConfig, data: dict, source: Optional[str] = None) -> DictConfig:
    _check_types(cfg, data, "", source)
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        raise _one_line(e, source) from None


def _update(cfg: DictConfig, text: str) -> None:
    """Apply one ``KEY=VALUE`` override in place: sections merge, other values are replaced."""
    path, value = parse_override(text)
    key = ".".join(path)
    node = _node_at(cfg, path)
    if node is not None:
        _check_types(node, value, key, f"--set {text}")
    try:
        OmegaConf.update(cfg, key, value, merge=_is_section(node))
    except OmegaConfBaseException as e:
        raise _one_line(e, f"--set {text}") from None


def _resolve(cls, data: dict, overrides=(), source: Optional[str] = None) -> DictConfig:
    """The schema of ``cls``, ``data`` merged onto it, then the ``KEY=VALUE`` overrides."""
    cfg = _merge(_schema(cls), data, source)
    for text in overrides or ():
        _update(cfg, text)
    return cfg


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _restore_tuples(obj):
    """``OmegaConf.to_object`` gives lists; tuple-typed fields get tuples back (hashable configs)."""
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(v):
            changes[f.name] = _restore_tuples(v)
        elif isinstance(v, list) and (tp is tuple or typing.get_origin(tp) is tuple):
            changes[f.name] = _tuples(v)
    return dataclasses.replace(obj, **changes) if changes else obj


def _to_object(cfg: DictConfig, source: Optional[str] = None):
    try:  # interpolations (${a.b}) are resolved here
        return _restore_tuples(OmegaConf.to_object(cfg))
    except OmegaConfBaseException as e:
        raise _one_line(e, source) from None


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from a (partial) nested dict; unknown keys / wrong types raise ConfigError."""
    return _to_object(_resolve(cls, d, (), where or None), where or None)


def to_dict(obj) -> Any:
    """Plain YAML-able data of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return OmegaConf.to_container(_schema(obj), resolve=True)
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], VALUE parsed as YAML by OmegaConf's loader)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key")
    if not raw.strip():
        return key.split("."), ""
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except Exception as e:  # yaml errors
        raise ConfigError(f"override {text!r}: cannot parse value: {_yaml_problem(e)}") from None
    return key.split("."), value


def apply_overrides(d: dict, overrides, cls=None) -> dict:
    """Apply ``KEY=VALUE`` strings to the nested dict ``d`` (a new dict is returned; with ``cls``
    the keys and types are checked against that dataclass and its defaults are filled in)."""
    if cls is not None:
        return OmegaConf.to_container(_resolve(cls, d, overrides))
    cfg = OmegaConf.create(d)
    for text in overrides or ():
        _update(cfg, text)
    return OmegaConf.to_container(cfg)


# ----------------------------------------------------------------------------- files


def config_names() -> list[str]:
    """The named configs shipped in the package (``lmeec_jax/configs/<name>.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path=None) -> Path:
    """A config name (``synthetic_tiny``, with or without ``.yaml``) or a path -> the YAML file.

    A bare name of a shipped config wins over a file of that name in the working directory
    (write ``./NAME.yaml`` for the file). ``None``: the default, ``synthetic_tiny``."""
    if name_or_path is None:
        return DEFAULT_CONFIG
    text = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and text and os.path.basename(text) == text:
        named = CONFIG_DIR / f"{text[:-5] if text.endswith('.yaml') else text}.yaml"
        if named.is_file():
            return named
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise ConfigError(f"unknown config {text!r}: neither a YAML file nor a named config "
                      f"(available: {', '.join(config_names())})")


def load_config(path=None, overrides=()) -> Config:
    """Read a YAML config (a name or a path; default ``synthetic_tiny``) and apply overrides."""
    path = resolve_config(path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = OmegaConf.to_container(raw)
    raw.setdefault("name", path.stem)
    return _to_object(_resolve(Config, raw, overrides, str(path)), str(path))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``save_config`` writes and ``--dry-run`` prints)."""
    return OmegaConf.to_yaml(_schema(cfg))


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(config_yaml(cfg))
