"""The training loop: state, the jitted data-parallel train step, checkpoints, validation.

State (one pytree, replicated over the ``data`` mesh axis, donated to the step):
``{"step", "params", "opt_state", "rest"}`` — float32 parameters, the optax state of
:func:`lmeec_jax.training.optim.make_optimizer`, and the model's non-trainable buffers. Dropout and
drop-path keys are not state: step ``s`` reseeds every stream from ``(seed, s)``, so a
resumed run draws the same masks as an uninterrupted one.

The global batch (``batch_size`` clips per device) is split over the ``data`` axis; the loss
is computed once over the global batch (``num_objects`` = global clip count), which gives
the reference's DDP gradients.

Faults end training with one-line exceptions (the CLI maps them to exit statuses):
:class:`ConfigChanged` (resuming a workdir whose ``config.yaml`` has another model or recipe,
unless ``resume_changed``), :class:`~lmeec_jax.training.checkpointing.CheckpointError` (a save
that failed, also in the background, or no readable checkpoint), :class:`DataFault` (the
training data: too many clips skipped for bad data, or none loadable), :class:`Interrupted`
(SIGINT/SIGTERM, through :class:`StopRequest`: the loop saves a checkpoint of the current step
between two steps and stops) and :class:`NonFiniteLoss`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmeec_jax.models import checkpoint as model_ckpt
from lmeec_jax.training.checkpointing import CheckpointError, Checkpointer, error_line, abstract_like
from lmeec_jax.models.config import get_config
from lmeec_jax.data import egoexo
from lmeec_jax.data.pipeline import ClipSpec, make_iterator, make_train_dataset, steps_per_epoch
from lmeec_jax.data.transforms import AugmentConfig
from lmeec_jax.io import read_json, write_json_atomic
from lmeec_jax.training.losses import multistep_multimask_loss
from lmeec_jax.training import forward as LT
from lmeec_jax.models.sam2 import build_model
from lmeec_jax.training.optim import cosine_schedule, make_optimizer, param_names
from lmeec_jax.training.config import Config, config_yaml, recipe_changes, to_dict
from lmeec_jax.models.weights import load_state_dict

__all__ = ["Trainer", "NonFiniteLoss", "ConfigChanged", "DataFault", "Interrupted", "StopRequest", "setup_runtime",
           "make_mesh", "make_train_step", "build_train_model",
           "prepare_synthetic", "local_copy"]

BATCH_KEYS = ("src_images", "tgt_images", "src_masks", "tgt_masks")


class NonFiniteLoss(RuntimeError):
    pass


class ConfigChanged(ValueError):
    """Resuming a workdir whose saved config has another model or recipe."""


class DataFault(RuntimeError):
    """The training data cannot feed the run (too many bad clips, or none loadable)."""


class Interrupted(RuntimeError):
    """SIGINT / SIGTERM: training stopped (message: the checkpoint saved, or why none)."""


class StopRequest:
    """SIGINT / SIGTERM handlers that only set a flag, which the training loop checks between
    steps (so a signal that arrives during a compiled call or in a garbage-collector callback
    is never lost or swallowed). A second signal exits at once (status 130)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    @property
    def name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"error: second {signal.Signals(signum).name}: exiting without waiting for the checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.signum = signum

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()


def local_copy(tree):
    """A replicated pytree as single-device arrays of this host (works multi-host, where
    ``jax.device_get`` refuses arrays that are not fully addressable)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


# ----------------------------------------------------------------------------- runtime


_RUNTIME_DONE = False


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


_AUTO_CLUSTERS = ("SlurmCluster", "OmpiCluster", "GkeTpuCluster", "GceTpuCluster")


def detected_process_count() -> Optional[int]:
    """The process count of a cluster that ``jax.distributed.initialize()`` recognises on its own
    (SLURM ``srun``, Open MPI ``mpirun``, Cloud TPU VMs / pod slices, GKE TPU), or None when
    there is none. Uses jax's own cluster detection; a failure there counts as none."""
    try:
        from jax._src import clusters
    except Exception:  # noqa: BLE001 - private API moved: fall back to the environment
        clusters = None
    if clusters is not None:
        try:
            for env in clusters.ClusterEnv._cluster_types:
                if env.__name__ not in _AUTO_CLUSTERS or getattr(env, "opt_in_only_method", False):
                    continue  # Kubernetes (an API query) / mpi4py: only with --distributed
                if env.is_env_present():
                    if env.__name__ == "SlurmCluster":  # the tasks srun launched (not the allocation's)
                        n = os.environ.get("SLURM_STEP_NUM_TASKS", "")
                        return int(n) if n.isdigit() else None
                    return int(env.get_process_count())
            return None
        except Exception:  # noqa: BLE001
            pass
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        n = os.environ.get(var, "")
        if n.isdigit():
            return int(n)
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    return len(hosts.split(",")) if hosts else None


def distributed_args(rcfg) -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments of this run, or None for a single process.

    Explicit settings win: ``runtime.coordinator_address`` / ``num_processes`` / ``process_id``
    (CLI ``--coordinator`` / ``--num-processes`` / ``--process-id``), else the environment
    variables ``JAX_COORDINATOR_ADDRESS`` (read by jax itself), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Whatever is left unset, jax detects (SLURM, Open MPI, TPU pods). Without
    any of them, ``runtime.distributed`` or a detected cluster of more than one process
    initialises with jax's detection alone."""
    coord = rcfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = rcfg.num_processes if rcfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = rcfg.process_id if rcfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coord is not None or (n is not None and n > 1) or pid is not None
    if not (explicit or rcfg.distributed):
        detected = detected_process_count()
        if detected is None or detected <= 1:
            return None
    if n == 1 and coord is None and not rcfg.distributed:
        return None
    return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def setup_runtime(rcfg) -> None:
    """Multi-process init (:func:`distributed_args`) and the persistent compilation cache (once
    per process; before anything touches a JAX backend). Cross-process collectives of the CPU
    backend use gloo (``jax_cpu_collectives_implementation``, jax's default)."""
    global _RUNTIME_DONE
    if _RUNTIME_DONE:
        return
    args = distributed_args(rcfg)
    if args is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None},
                                   heartbeat_timeout_seconds=int(rcfg.heartbeat_timeout_s))
    if rcfg.compilation_cache:
        os.makedirs(rcfg.compilation_cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(rcfg.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _RUNTIME_DONE = True


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """The 1-D ``data`` mesh over all processes' devices, ordered by process: process ``p``'s
    devices hold the consecutive rows ``p * host_batch ...`` of the global batch, the rows of its
    data shard (:func:`lmeec_jax.data.pipeline.make_train_dataset`), so the global batch is the
    same for any process count. ``num_devices``: the first ``num_devices / process_count`` local
    devices of each process."""
    P_ = jax.process_count()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"{num_devices} devices requested, {len(devices)} available")
        if num_devices % P_:
            raise ValueError(f"runtime.num_devices {num_devices} is not divisible by the {P_} processes")
        per = num_devices // P_
        devices = [d for p in range(P_) for d in [x for x in devices if x.process_index == p][:per]]
    return Mesh(np.asarray(devices), ("data",))


def put_replicated(tree, sharding: NamedSharding):
    """A pytree of this process's arrays (the same values in every process) as global arrays of
    the replicated ``sharding``. Multi-process, each process fills its own devices' copies
    (``jax.device_put`` would compare every leaf across processes); PRNG keys go as key data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)) and not np.isscalar(x):
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def sync(name: str) -> None:
    """A barrier of all processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes(x: np.ndarray) -> np.ndarray:
    """``x`` of every process, stacked on a new leading axis (process order); ``x[None]`` alone."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


# ----------------------------------------------------------------------------- data


def prepare_synthetic(cfg: Config, workdir: Path, log=print) -> tuple[str, str]:
    """Generate (idempotently) the synthetic train/val splits; returns their directories."""
    from lmeec_jax.data.synthetic import make_synthetic_split

    sc = cfg.data.synthetic
    root = Path(sc.dir) if sc.dir else workdir / "data"
    train_dir, val_dir = root / "train", root / "val"
    t0 = time.time()
    kw = dict(n_frames=sc.n_frames, workers=sc.workers, raw_masks=sc.raw_masks, object_scale=float(sc.object_scale),
              exo_distance=tuple(float(x) for x in sc.exo_distance), p_lookalike=float(sc.p_lookalike),
              p_small=float(sc.p_small), patterns=tuple(sc.patterns), distinct_colours=bool(sc.distinct_colours))
    make_synthetic_split(train_dir, sc.train_takes, seed=sc.seed, split_name="train", **kw)
    make_synthetic_split(val_dir, sc.val_takes, seed=sc.seed + 1_000_003, split_name="val", **kw)
    log(f"synthetic data ready in {root} ({sc.train_takes} train / {sc.val_takes} val takes, {time.time() - t0:.0f} s)")
    return str(train_dir), str(val_dir)


# ----------------------------------------------------------------------------- model


def build_train_model(cfg: Config, log=print):
    """The model of ``cfg.model``: random init from ``seed``, then ``init_from`` (strict, except
    the ``fresh`` prefixes). Returns (model, ModelConfig)."""
    mc = cfg.model
    overrides = dict(mc.overrides)
    if mc.drop_path_rate is not None:
        overrides["trunk"] = {**overrides.get("trunk", {}), "drop_path_rate": float(mc.drop_path_rate)}
    mcfg = get_config(mc.name, **overrides)
    model = build_model(mcfg, seed=mc.seed)
    if mc.init_from:
        sd = model_ckpt.load_state(mc.init_from)
        names = param_names(nnx.state(model, nnx.Param))
        allow = [n for n in names if any(n.startswith(p) for p in mc.fresh)]
        fresh = load_state_dict(model, sd, allow_missing=allow)
        log(f"initialised from {mc.init_from}" + (f"; fresh: {len(fresh)} tensors ({', '.join(sorted({f.split('.')[0] for f in fresh}))})" if fresh else ""))
    return model, mcfg


# ----------------------------------------------------------------------------- the step


def _loss_and_metrics(out: LT.ClipOutputs, tgt_masks, loss_cfg):
    T, B = out.high_res_logits.shape[:2]
    targets = jnp.swapaxes(tgt_masks, 0, 1)  # [T, B, S, S]
    losses = multistep_multimask_loss(out.high_res_logits[:, None], out.ious[:, None],
                                      out.object_score_logits[:, None], targets, loss_cfg, num_objects=B)
    pred = out.high_res_logits[:, :, 0] > 0
    gt = targets > 0
    inter = jnp.sum(pred & gt, axis=(-1, -2)).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=(-1, -2)).astype(jnp.float32)
    present = jnp.any(gt, axis=(-1, -2))
    iou = jnp.sum(jnp.where(present, inter / jnp.maximum(union, 1.0), 0.0)) / jnp.maximum(jnp.sum(present), 1)
    return losses, {"train_iou": iou}


def make_train_step(graphdef, tx, fcfg: LT.TrainForwardConfig, loss_cfg, seed: int) -> Callable:
    """``step(state, batch, rngs) -> (state, metrics)`` (pure; jit it)."""
    base_key = jax.random.key(seed)

    def step(state, batch, rngs):
        rngs = LT.reseed_rngs(rngs, jax.random.fold_in(base_key, state["step"]))
        clip = LT.ClipBatch(*(batch[k] for k in BATCH_KEYS))

        def loss_fn(params):
            out, _ = LT.clip_forward(graphdef, params, rngs, state["rest"], clip, fcfg)
            losses, extra = _loss_and_metrics(out, clip.tgt_masks, loss_cfg)
            return losses["core_loss"], {**losses, **extra}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **{k: v for k, v in aux.items() if k != "core_loss"},
                   "grad_norm": optax.global_norm(grads)}
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rest": state["rest"]}
        return new, metrics

    return step


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """``Trainer(cfg, workdir).train()``; resumes from ``<workdir>/checkpoints`` when present.

    ``resume``: "auto" (resume if a checkpoint exists), "required" (error if none),
    "never" (start fresh; existing checkpoints of later steps are left alone).
    """

    def __init__(self, cfg: Config, workdir, *, resume: str = "auto", log: Callable = print,
                 resume_changed: bool = False, stop: Optional[StopRequest] = None):
        if resume not in ("auto", "required", "never"):
            raise ValueError(f"resume must be auto/required/never, not {resume!r}")
        self.t_start = time.time()
        self.cfg = cfg
        self.log = log
        self.stop = stop
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        setup_runtime(cfg.runtime)  # jax.distributed first: orbax and the mesh need the process group
        self.is_main = jax.process_index() == 0
        if not self.is_main:  # one voice: process 0 logs (errors still raise in every process)
            self.log = log = lambda *a, **k: None
        self.tb = None

        # ---- checkpoints, and the saved config of the run to resume (before any work)
        self.ckpt = Checkpointer(self.workdir / "checkpoints", keep=cfg.train.keep,
                                 async_save=cfg.train.async_checkpointing)
        latest = self.ckpt.latest_step() if resume != "never" else None
        if resume == "required" and latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.workdir / 'checkpoints'}")
        self._check_saved_config(latest, resume_changed)
        self.mesh = make_mesh(cfg.runtime.num_devices)
        self.n_devices = self.mesh.devices.size
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))

        # ---- data
        dc = cfg.data
        train_dir, val_dir = dc.train_dir, dc.val_dir
        if train_dir is None:
            if not dc.synthetic.enabled:
                raise ValueError("data.train_dir is not set (or enable data.synthetic)")
            # process 0 generates first; the others then find the takes written (shared file
            # system) or write their own copy (one per host)
            if not self.is_main:
                sync("lmeec_synthetic_data")
            train_dir, syn_val = prepare_synthetic(cfg, self.workdir, log if self.is_main else (lambda *a: None))
            if self.is_main:
                sync("lmeec_synthetic_data")
            val_dir = val_dir or syn_val
            self._check_stop("while generating the synthetic data")
        self.train_dir, self.val_dir = train_dir, val_dir
        takes = egoexo.read_take_list(dc.takes_file) if dc.takes_file else None
        self.records = egoexo.list_train_videos(train_dir, dc.num_frames, takes)
        if dc.max_videos:
            self.records = self.records[: dc.max_videos]
        if not self.records:
            raise ValueError(f"no training video with >= {dc.num_frames} frames in {train_dir}")
        self.global_batch = cfg.train.batch_size * self.n_devices
        self.steps_per_epoch = steps_per_epoch(len(self.records), dc.multiplier, self.global_batch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.records)} videos x {dc.multiplier} < global batch {self.global_batch}")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch

        # ---- model and state
        model, self.model_cfg = build_train_model(cfg, log)
        if dc.num_frames < 2:
            raise ValueError("training clips need at least 2 frames")
        model.train()
        self.graphdef, params, self.rngs, rest = LT.split_model(model)
        model.eval()
        self.graphdef_eval = LT.split_model(model)[0]
        del model
        self.tx = make_optimizer(params, cfg.optim, self.total_steps)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params), "rest": rest}
        self.state_sharding = jax.tree.map(lambda _: self.replicated, state)
        self.state = put_replicated(state, self.replicated)
        self.rngs = put_replicated(self.rngs, self.replicated)
        self.fcfg = LT.TrainForwardConfig(dtype=cfg.model.dtype, remat_blocks=cfg.model.remat_blocks,
                                          remat_frames=cfg.model.remat_frames)
        step_fn = make_train_step(self.graphdef, self.tx, self.fcfg, cfg.loss, cfg.train.seed)
        batch_sharding = {k: self.data_sharding for k in BATCH_KEYS}
        self.step_fn = jax.jit(step_fn, donate_argnums=(0,),
                               in_shardings=(self.state_sharding, batch_sharding, None),
                               out_shardings=(self.state_sharding, self.replicated))

        # ---- input pipeline
        spec = ClipSpec(dc.num_frames, AugmentConfig(**{**dc.augment, "size": self.model_cfg.image_size}), dc.preresize)
        self.dataset = make_train_dataset(train_dir, self.records, spec, num_steps=self.total_steps,
                                          global_batch=self.global_batch, seed=cfg.train.seed,
                                          multiplier=dc.multiplier, process_index=jax.process_index(),
                                          process_count=jax.process_count())
        self.data_iter = make_iterator(self.dataset, workers=dc.workers, worker_buffer=dc.worker_buffer,
                                       threads=dc.threads, prefetch=dc.prefetch)

        # ---- resume (the newest readable checkpoint)
        self.resumed_from = None
        if latest is not None:
            # a checkpoint of another process count has no iterator state of this process: the
            # data stream is a function of the step alone, so the iterator seeks to that step
            same_layout = self._has_data_state(latest)
            latest, state = self.ckpt.restore_latest(abstract_like(self.state), self.data_iter if same_layout else None,
                                                     log)
            if latest is not None:
                self.state = state
                self.resumed_from = latest
                if not same_layout:
                    self._seek_data(latest)
                log(f"resumed from step {latest} ({self.workdir / 'checkpoints'})"
                    + ("" if same_layout else f"; data iterator set to step {latest} (checkpoint of another process count)"))
        if self.is_main:
            self._write_config()
            if cfg.runtime.tensorboard:
                from lmeec_jax.training.summaries import TensorBoardWriter

                self.tb = TensorBoardWriter(self.workdir / "tensorboard")
        self.skipped = self.clips_read = 0
        self.validator = None
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.schedules = {"lr": cosine_schedule(cfg.optim.base_lr, cfg.optim.base_end, self.total_steps),
                          "lr_vision": cosine_schedule(cfg.optim.vision_lr, cfg.optim.vision_end, self.total_steps)}
        log(f"{len(self.records)} training videos, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
            f"global batch {self.global_batch} on {self.n_devices} device(s) ({jax.default_backend()}"
            + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "") + "), "
            f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f} M params")

    # ------------------------------------------------------------------ helpers
    def _has_data_state(self, step: int) -> bool:
        """Whether checkpoint ``step`` holds this process's iterator state (same process count),
        or has no iterator state of any layout (then the restore reports it)."""
        d = self.ckpt.step_path(step) / "data"
        mine = d / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return mine.is_file() or not any(d.glob("process_*-of-*.json"))

    def _seek_data(self, step: int) -> None:
        """Put the (fresh) data iterator at ``step``: batch ``step`` is the next one read."""
        st = self.data_iter.get_state()
        if "next_index" in st:  # threads only
            st = {**st, "next_index": int(step)}
        elif "iterators_in_use_states" in st:  # worker processes: batch b is worker b % W's
            W = len(st["iterators_in_use_states"])
            st = {**st, "next_index_in_cycle": int(step) % W,
                  "iterators_in_use_states": [{**w, "next_index": (int(step) - k + W - 1) // W}
                                              for k, w in enumerate(st["iterators_in_use_states"])]}
        else:
            raise CheckpointError(f"checkpoint {self.ckpt.step_path(step)}: written by another process count, "
                                  f"and the data iterator's state {sorted(st)} cannot be set to step {step}")
        self.data_iter.set_state(st)

    def _check_saved_config(self, latest: Optional[int], resume_changed: bool) -> None:
        """Resuming (a checkpoint is there) with another model / recipe than the saved
        ``config.yaml``: :class:`ConfigChanged`, unless ``resume_changed``."""
        path = self.workdir / "config.yaml"
        if latest is None or not path.is_file():
            return
        import yaml

        try:
            old = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigChanged(f"{path}: the saved config of the run to resume cannot be read "
                                f"({error_line(e)}); pass --fresh or another --workdir") from None
        changes = recipe_changes(old, to_dict(self.cfg))
        if changes and not resume_changed:
            raise ConfigChanged(f"{path}: resuming step {latest} with a changed config: {'; '.join(changes)} "
                                f"(pass --resume-changed to resume anyway, --fresh to start over, or another --workdir)")
        if changes:
            self.log(f"resuming step {latest} with a changed config: {'; '.join(changes)}")

    def _write_config(self) -> None:
        """``<workdir>/config.yaml``; a different one already there is kept as ``config.<time>.yaml``."""
        path = self.workdir / "config.yaml"
        text = config_yaml(self.cfg)
        if path.is_file() and path.read_text() != text:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            backup, n = self.workdir / f"config.{stamp}.yaml", 1
            while backup.exists():
                backup, n = self.workdir / f"config.{stamp}-{n}.yaml", n + 1
            os.replace(path, backup)
            self.log(f"the previous {path.name} is kept as {backup}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _check_stop(self, where: str) -> None:
        if self.stop is not None and self.stop.signum is not None:
            raise Interrupted(f"interrupted by {self.stop.name} {where}: no training step yet, no checkpoint saved")

    def _stop_now(self) -> None:
        """A signal arrived: save the current step (if not saved yet) and raise :class:`Interrupted`."""
        step = self.step
        path = self.ckpt.step_path(step)
        try:
            had = step in self.ckpt.all_steps()
            self.save(force=True)
            self.ckpt.wait()
        except CheckpointError as e:
            raise Interrupted(f"interrupted by {self.stop.name} at step {step}; no checkpoint saved: {e}") from None
        what = "already saved" if had else "saved"
        raise Interrupted(f"interrupted by {self.stop.name} at step {step}: checkpoint {what} in {path}")

    def _next_batch(self) -> dict:
        try:
            return next(self.data_iter)
        except StopIteration:
            raise
        except Exception as e:  # grain re-raises the sampler's error (possibly wrapped)
            raise DataFault(f"training data {self.train_dir}: {error_line(e)}") from e

    def _stop_requested(self) -> bool:
        """A SIGINT / SIGTERM arrived (in any process: all of them stop at the same step)."""
        signum = self.stop.signum if self.stop is not None else None
        if jax.process_count() == 1:
            return signum is not None
        flags = all_processes(np.asarray([signum or 0], np.int32)).ravel()
        if flags.any() and signum is None:  # another process was signalled: stop with it
            if self.stop is None:
                self.stop = StopRequest()
            self.stop.signum = int(flags[flags > 0][0])
        return bool(flags.any())

    def _global_ints(self, local: dict) -> dict:
        """The per-clip integers of the global batch (process order): ``skipped``, and with
        ``train.log_data`` the clip ids; each process holds its own shard only."""
        keys = ["skipped"] + (["index", "video", "start"] if self.cfg.train.log_data else [])
        n = len(np.asarray(local["src_images"]))
        rows = np.stack([np.asarray(local.get(k, np.zeros(n, np.int64))).reshape(n) for k in keys]).astype(np.int32)
        rows = all_processes(rows)  # [P, K, n]
        return {k: np.concatenate(list(rows[:, i])) for i, k in enumerate(keys)}

    def _count_skips(self, local: dict, step: int, skipped=None) -> None:
        """Clips dropped for bad data (``skipped`` of each clip of the global batch); too many
        stops the run."""
        tc = self.cfg.train
        if skipped is None:
            skipped = local.get("skipped", np.zeros(0, np.int64))
        skipped = np.asarray(skipped)
        self.skipped += int(skipped.sum())
        self.clips_read += int(skipped.size + skipped.sum())
        if self.clips_read >= tc.skip_min_clips and self.skipped > tc.max_skip_rate * self.clips_read:
            errors = [str(e) for e in np.asarray(local.get("skip_error", [])).ravel() if str(e)]
            try:
                self.save(force=True)
                self.ckpt.wait()
                saved = f"checkpoint of step {step} in {self.ckpt.step_path(step)}"
            except CheckpointError as e:
                saved = f"no checkpoint saved: {e}"
            msg = (f"training data {self.train_dir}: {self.skipped} of {self.clips_read} clips skipped for bad data "
                   f"({100 * self.skipped / self.clips_read:.0f}% > train.max_skip_rate {tc.max_skip_rate:g}); "
                   f"last: {errors[-1] if errors else 'unknown'}; {saved}")
            self._write({"step": step, "error": msg})
            raise DataFault(msg)

    @property
    def step(self) -> int:
        return int(local_copy(self.state["step"]))

    def _write(self, record: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _global_batch(self, local: dict) -> dict:
        out = {}
        for k in BATCH_KEYS:
            x = np.asarray(local[k])
            shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            out[k] = jax.make_array_from_process_local_data(self.data_sharding, x, shape)
        return out

    def get_validator(self):
        if self.validator is None and self.val_dir:
            recs = egoexo.list_videos(self.val_dir, "ego2exo")
            if self.cfg.eval.max_videos:
                recs = recs[: self.cfg.eval.max_videos]
            from lmeec_jax.training.evaluate import Validator

            self.validator = Validator(self.graphdef_eval, self.val_dir, recs, self.model_cfg.image_size,
                                       chunk=self.cfg.eval.chunk, log=self.log)
        return self.validator

    def evaluate(self, *, baseline: bool = False, overlays: int = 0, params=None, overlay_dir=None,
                 tb_step: Optional[int] = None) -> Optional[dict]:
        """Validation scores (main process; None elsewhere). ``overlays`` PNGs go to
        ``overlay_dir`` (default ``<workdir>/overlays``). ``tb_step``: also write the scores and
        the first ``runtime.tensorboard_images`` overlays to TensorBoard at that step."""
        if not self.val_dir:
            return None
        if not self.is_main:  # the others wait for process 0 (a collective meanwhile would time out)
            sync("lmeec_evaluate")
            return None
        val = self.get_validator()
        if val is None:
            sync("lmeec_evaluate")
            return None
        t0 = time.time()
        params = self.state["params"] if params is None else params
        overlay_dir = Path(overlay_dir) if overlay_dir is not None else self.workdir / "overlays"
        res = val.evaluate(*local_copy((params, self.rngs, self.state["rest"])),
                           baseline=baseline, overlay_dir=overlay_dir if overlays else None,
                           overlays=overlays)
        res["time_s"] = round(time.time() - t0, 1)
        if self.tb is not None and tb_step is not None:
            written = sorted(p for p in overlay_dir.glob("*.png") if p.stat().st_mtime >= t0 - 1) if overlays else []
            self.tb.eval(tb_step, res, written[: self.cfg.runtime.tensorboard_images])
            self.tb.flush()
        sync("lmeec_evaluate")
        return res

    def _tb_overlays(self, step: int, final: bool = False) -> dict:
        """``evaluate`` arguments for the overlays of a validation at ``step``: the final one
        writes ``eval.overlays`` PNGs to ``<workdir>/overlays``; the others (and a final one
        without) write ``runtime.tensorboard_images`` to ``<workdir>/overlays/step_<step>`` when
        TensorBoard is on."""
        if final and self.cfg.eval.overlays:
            return {"overlays": self.cfg.eval.overlays, "tb_step": step}
        n = self.cfg.runtime.tensorboard_images if self.tb is not None else 0
        return {"overlays": n, "overlay_dir": self.workdir / "overlays" / f"step_{step:06d}", "tb_step": step}

    def export_model(self, out=None) -> Optional[Path]:
        """The current parameters as a model directory (``<workdir>/model`` by default), the
        format ``python -m convert`` writes: ``eval predict|track --checkpoint`` and
        ``Predictor.load`` read it. Written by process 0 (None elsewhere) while the others wait;
        replaced atomically."""
        if not self.is_main:
            sync("lmeec_export")
            return None
        params, rngs, rest = local_copy((self.state["params"], self.rngs, self.state["rest"]))
        model = nnx.merge(self.graphdef_eval, params, rngs, rest)
        path = model_ckpt.save_model(model, self.model_cfg, self.workdir / "model" if out is None else out)
        sync("lmeec_export")
        return path

    def save(self, force: bool = False) -> None:
        step = self.step
        if step in self.ckpt.all_steps():
            return
        self.ckpt.save(step, self.state, self.data_iter, force=force)

    # ------------------------------------------------------------------ loop
    def train(self, until: Optional[int] = None) -> dict:
        """Train to ``total_steps`` (or stop after step ``until``, saving a checkpoint there),
        then (at the end only) run the final evaluation."""
        cfg = self.cfg
        tc = cfg.train
        step = self.step
        initial = None
        if cfg.eval.initial and step == 0 and self.val_dir:
            initial = self.evaluate(baseline=False, **self._tb_overlays(0))
            if initial is not None:
                write_json_atomic(self.workdir / "eval_initial.json", initial, indent=2)
                self.log(f"before training: IoU {initial['model']['iou']:.4f}")
        bar = None
        if cfg.runtime.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        t_last, n_last, t_first = time.time(), 0, None
        last_metrics = {}
        try:
            stop = self.total_steps if until is None else min(until, self.total_steps)
            while step < stop:
                if self._stop_requested():
                    self._stop_now()
                self.ckpt.check()  # a failed background save stops the run at once
                local = self._next_batch()
                ints = self._global_ints(local)
                self._count_skips(local, step, ints["skipped"])
                if tc.debug_nan_step is not None and step == tc.debug_nan_step:
                    local = {**local, "src_images": np.full_like(local["src_images"], np.nan)}
                batch = self._global_batch(local)
                self.state, metrics = self.step_fn(self.state, batch, self.rngs)
                metrics = {k: float(v) for k, v in local_copy(metrics).items()}
                step += 1
                if t_first is None:
                    t_first = time.time() - self.t_start
                if not math.isfinite(metrics["loss"]) and tc.fail_on_nonfinite:
                    self.ckpt.wait()
                    good = self.ckpt.latest_step()
                    msg = (f"non-finite loss ({metrics['loss']}) at step {step}: stopping without saving; "
                           f"last good checkpoint: {'step ' + str(good) if good is not None else 'none'}")
                    self._write({"step": step, "error": msg})
                    raise NonFiniteLoss(msg)
                n_last += 1
                if tc.log_data:
                    self._write({"step": step, "data": [int(i) for i in ints["index"]],
                                 "videos": [int(i) for i in ints["video"]],
                                 "starts": [int(i) for i in ints["start"]]})
                if step % tc.log_every == 0 or step == self.total_steps or step == 1:
                    dt = time.time() - t_last
                    rate = n_last * self.global_batch / max(dt, 1e-9)
                    lrs = {k: float(f(step - 1)) for k, f in self.schedules.items()}
                    last_metrics = {"step": step, **{k: round(v, 6) for k, v in metrics.items()}, **lrs,
                                    "clips_per_s": round(rate, 3), "skipped": self.skipped,
                                    "clips_read": self.clips_read, "time_s": round(time.time() - self.t_start, 1)}
                    self._write(last_metrics)
                    if self.tb is not None:
                        self.tb.train(last_metrics)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lrs['lr']:.2e}", clips_s=f"{rate:.2f}",
                                        skipped=self.skipped)
                    t_last, n_last = time.time(), 0
                if bar is not None:
                    bar.update(1)
                if tc.ckpt_every and step % tc.ckpt_every == 0 and step < self.total_steps:
                    self.save()
                if cfg.eval.every and step % cfg.eval.every == 0 and step < self.total_steps:
                    res = self.evaluate(**self._tb_overlays(step))
                    if res is not None:
                        self._write({"step": step, "eval": res})
                        self.log(f"step {step}: val IoU {res['model']['iou']:.4f}")
            self.save(force=True)
            self.ckpt.wait()
            if self._stop_requested():
                self._stop_now()
        finally:
            if bar is not None:
                bar.close()
        if step < self.total_steps:  # stopped early (`until`)
            return {"step": step, "wall_s": round(time.time() - self.t_start, 1)}
        exported = self.export_model()
        if exported is not None:
            self.log(f"model directory: {exported} (eval predict --checkpoint {exported})")
        train_time = time.time() - self.t_start
        summary = {"step": step, "train_wall_s": round(train_time, 1), "first_step_s": t_first,
                   "last": last_metrics}
        if cfg.eval.final and self.val_dir:
            res = self.evaluate(baseline=cfg.eval.baseline, **self._tb_overlays(step, final=True))
            if res is not None:
                if initial is None and (self.workdir / "eval_initial.json").is_file():
                    initial = read_json(self.workdir / "eval_initial.json")
                final = {**{k: res["model"][k] for k in ("iou", "contour_accuracy", "location_error",
                                                         "balanced_accuracy")},
                         "step": step, "n_videos": res["n_videos"], "model": res["model"]}
                if "baseline" in res:
                    final["baseline_paste_source"] = res["baseline"]
                if initial is not None:
                    final["before_training"] = initial["model"]
                final["wall_time_s"] = round(time.time() - self.t_start, 1)
                write_json_atomic(self.workdir / "eval_final.json", final, indent=2)
                self._write({"step": step, "eval": res})
                summary["eval"] = final
        summary["wall_s"] = round(time.time() - self.t_start, 1)
        sync("lmeec_train_done")  # no process leaves (jax's shutdown barrier) while one still writes
        return summary

    def close(self) -> None:
        self.ckpt.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        close = getattr(self.data_iter, "close", None)
        if close is not None:
            close()
