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
    "validate",
    "RECIPE_KEYS",
    "recipe_changes",
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
    """A bad config; ``problems`` holds one line per problem (``str`` joins them with newlines)."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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
    max_skip_rate: float = 0.2  # stop when more than this fraction of the clips read was skipped (bad data)
    skip_min_clips: int = 20  # ... once at least this many clips were read


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
    # More than one process (see lmeec_jax.training.trainer.setup_runtime): jax.distributed.initialize()
    # runs when ``distributed`` is true, when a coordinator / process count > 1 is given here or in
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or when jax detects a cluster of
    # more than one process on its own (SLURM srun, Open MPI, Cloud TPU pod slices, GKE).
    distributed: bool = False  # jax.distributed.initialize() even without a coordinator (auto-detected cluster)
    coordinator_address: Optional[str] = None  # HOST:PORT of process 0 (CLI --coordinator)
    num_processes: Optional[int] = None  # CLI --num-processes
    process_id: Optional[int] = None  # CLI --process-id (0 .. num_processes-1)
    heartbeat_timeout_s: int = 100  # a process silent this long counts as dead (raise on starved CPUs)
    num_devices: Optional[int] = None  # use only the first N devices (default all; N/processes per process)
    compilation_cache: Optional[str] = None  # persistent XLA compilation cache directory
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # TensorBoard event files in <workdir>/tensorboard (process 0)
    tensorboard_images: int = 3  # overlay images written to TensorBoard at each validation


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


def load_config(path=None, overrides=(), *, check_paths: bool = False) -> Config:
    """Read a YAML config (a name or a path; default ``synthetic_tiny``), apply overrides and
    :func:`validate` it (``check_paths``: also that the input paths exist)."""
    path = resolve_config(path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = OmegaConf.to_container(raw)
    raw.setdefault("name", path.stem)
    cfg = _to_object(_resolve(Config, raw, overrides, str(path)), str(path))
    validate(cfg, check_paths=check_paths)
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``save_config`` writes and ``--dry-run`` prints)."""
    return OmegaConf.to_yaml(_schema(cfg))


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(config_yaml(cfg))


# ----------------------------------------------------------------------------- validation


DTYPES = ("float32", "bfloat16")
# what a resumed run must share with the run that wrote the checkpoint (sections, or section.key)
RECIPE_KEYS = ("model", "optim", "loss", "train.batch_size", "train.epochs", "train.steps", "train.seed")


def _unknown_keys(given: dict, cls, prefix: str, problems: list) -> None:
    """Keys of the free-form dict ``given`` that are not fields of dataclass ``cls`` (nested
    dataclass fields are checked in turn)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k, v in given.items():
        key = f"{prefix}.{k}"
        if k not in fields:
            problems.append(f"unknown config key {key} (not a {cls.__name__} field; known: {', '.join(fields)})")
        elif dataclasses.is_dataclass(hints[k]):
            if isinstance(v, dict):
                _unknown_keys(v, hints[k], key, problems)
            else:
                problems.append(f"{key}: expected a mapping of {hints[k].__name__} fields, got {v!r}")


def validate(cfg: Config, *, check_paths: bool = False) -> Config:
    """Check every value's range and the keys of the free-form dict fields; raises one
    :class:`ConfigError` listing all problems (one line each). ``check_paths``: the paths that
    must exist do (``model.init_from``, ``data.*`` when the synthetic data are off)."""
    from lmeec_jax.data.transforms import AugmentConfig
    from lmeec_jax.models.config import ALIASES, CONFIGS, ModelConfig

    problems: list[str] = []

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = cfg
            for p in key.split("."):
                value = getattr(value, p)
            problems.append(f"{key}: {value!r} is invalid ({rule})")

    def at_least(key: str, low, optional: bool = False) -> None:
        value = cfg
        for p in key.split("."):
            value = getattr(value, p)
        if value is None and optional:
            return
        need(value is not None and value >= low, key, f"must be >= {low}" + (" or null" if optional else ""))

    def unit(key: str, optional: bool = False) -> None:
        value = cfg
        for p in key.split("."):
            value = getattr(value, p)
        if value is None and optional:
            return
        need(value is not None and 0.0 <= value <= 1.0, key, "a probability: must be in [0, 1]")

    m, d, sc, o, lo = cfg.model, cfg.data, cfg.data.synthetic, cfg.optim, cfg.loss
    # model
    need(m.name in CONFIGS or m.name in ALIASES, "model.name", f"one of {', '.join(sorted(CONFIGS) + sorted(ALIASES))}")
    need(m.dtype in DTYPES, "model.dtype", f"one of {', '.join(DTYPES)}")
    unit("model.drop_path_rate", optional=True)
    _unknown_keys(m.overrides, ModelConfig, "model.overrides", problems)
    if "image_size" in m.overrides and not (isinstance(m.overrides["image_size"], int) and m.overrides["image_size"] >= 16):
        problems.append(f"model.overrides.image_size: {m.overrides['image_size']!r} is invalid (an integer >= 16)")
    # data
    at_least("data.num_frames", 2)
    at_least("data.multiplier", 1)
    at_least("data.workers", 0)
    at_least("data.worker_buffer", 1)
    at_least("data.threads", 1)
    at_least("data.prefetch", 1)
    at_least("data.preresize", 1, optional=True)
    at_least("data.max_videos", 1, optional=True)
    _unknown_keys(d.augment, AugmentConfig, "data.augment", problems)
    for k in ("hflip_p", "grayscale_p"):
        v = d.augment.get(k)
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            problems.append(f"data.augment.{k}: {v!r} is invalid (a probability: must be in [0, 1])")
    at_least("data.synthetic.train_takes", 1)
    at_least("data.synthetic.val_takes", 0)
    at_least("data.synthetic.n_frames", 1)
    at_least("data.synthetic.workers", 1, optional=True)
    unit("data.synthetic.p_lookalike")
    unit("data.synthetic.p_small")
    need(sc.object_scale > 0, "data.synthetic.object_scale", "must be > 0")
    need(len(sc.exo_distance) == 2 and 0 < sc.exo_distance[0] <= sc.exo_distance[1], "data.synthetic.exo_distance",
         "[near, far] with 0 < near <= far")
    # optimiser and loss
    for k in ("base_lr", "vision_lr", "weight_decay"):
        at_least(f"optim.{k}", 0.0)
    for k in ("base_lr_end", "vision_lr_end", "layer_decay_min"):
        at_least(f"optim.{k}", 0.0, optional=True)
    need(o.layer_decay is None or 0.0 < o.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1] or null")
    need(0.0 <= o.b1 < 1.0, "optim.b1", "must be in [0, 1)")
    need(0.0 <= o.b2 < 1.0, "optim.b2", "must be in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be > 0")
    need(o.clip_max_norm is None or o.clip_max_norm > 0, "optim.clip_max_norm", "must be > 0 or null")
    for k in ("weight_mask", "weight_dice", "weight_iou", "weight_class", "focal_gamma", "focal_gamma_obj_score"):
        at_least(f"loss.{k}", 0.0)
    for k in ("focal_alpha", "focal_alpha_obj_score"):  # a negative alpha switches the weighting off
        v = getattr(lo, k)
        need(v < 0 or v <= 1.0, f"loss.{k}", "must be in [0, 1] (or negative: no alpha weighting)")
    # train, eval, runtime
    at_least("train.batch_size", 1)
    at_least("train.epochs", 1)
    at_least("train.steps", 1, optional=True)
    at_least("train.log_every", 1)
    at_least("train.ckpt_every", 0)
    at_least("train.keep", 1)
    at_least("train.debug_nan_step", 0, optional=True)
    unit("train.max_skip_rate")
    at_least("train.skip_min_clips", 1)
    at_least("eval.every", 0)
    at_least("eval.max_videos", 1, optional=True)
    at_least("eval.chunk", 1)
    at_least("eval.overlays", 0)
    at_least("runtime.num_devices", 1, optional=True)
    at_least("runtime.num_processes", 1, optional=True)
    at_least("runtime.process_id", 0, optional=True)
    at_least("runtime.tensorboard_images", 0)
    at_least("runtime.heartbeat_timeout_s", 1)
    r = cfg.runtime
    if r.num_processes is not None and r.process_id is not None:
        need(r.process_id < r.num_processes, "runtime.process_id", f"must be < runtime.num_processes ({r.num_processes})")
    if r.coordinator_address is not None:
        host, _, port = r.coordinator_address.rpartition(":")
        need(bool(host) and port.isdigit() and 0 < int(port) < 65536, "runtime.coordinator_address",
             f"{r.coordinator_address!r} is not HOST:PORT")
    if check_paths:
        if m.init_from and not Path(m.init_from).expanduser().is_dir():
            problems.append(f"model.init_from: {m.init_from}: no such model directory")
        if d.train_dir is None and not sc.enabled:
            problems.append("data.train_dir: not set (set it, or enable data.synthetic)")
        for k in ("train_dir", "val_dir"):
            v = getattr(d, k)
            if v and not Path(v).expanduser().is_dir():
                problems.append(f"data.{k}: {v}: no such directory")
        if d.takes_file and not Path(d.takes_file).expanduser().is_file():
            problems.append(f"data.takes_file: {d.takes_file}: no such file")
        if sc.enabled and sc.dir and Path(sc.dir).exists() and not Path(sc.dir).is_dir():
            problems.append(f"data.synthetic.dir: {sc.dir}: not a directory")
    if problems:
        raise ConfigError(*problems)
    return cfg


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    if not d and prefix:
        out[prefix] = {}
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every :data:`RECIPE_KEYS` value that differs between two
    config dicts (``to_dict`` form, e.g. a saved ``config.yaml`` and a new run's config)."""
    a, b = _flat(old), _flat(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if not any(key == r or key.startswith(r + ".") for r in RECIPE_KEYS):
            continue
        va, vb = a.get(key, "(unset)"), b.get(key, "(unset)")
        if va != vb:
            changes.append(f"{key}: {va!r} -> {vb!r}")
    return changes
