"""`python -m train [--config NAME|FILE] [--set KEY=VALUE ...] [--workdir DIR] [--resume] [--dry-run]`

``--config`` takes the name of a config shipped in the package (``synthetic_tiny``,
``lmeec_hiera_b+_egoexo``; files in ``lmeec_jax/configs/``) or a path to a YAML file.
Without it the built-in ``synthetic_tiny`` runs: it generates a
synthetic ego-exo dataset, trains the nano model on the CPU for a few minutes and writes
``<workdir>/eval_final.json`` and overlay PNGs. A workdir that already holds a checkpoint is
resumed (``--resume`` insists on one, ``--fresh`` ignores it). Outputs in the workdir
(default ``work_dirs/<config name>``): ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoints/<step>/``, ``eval_final.json``, ``overlays/``. ``--dry-run`` prints the resolved
config as YAML (loadable again with ``--config``) and exits without building the model or
touching data or the workdir. TensorBoard event files go to ``<workdir>/tensorboard/``.

More than one process (several hosts, or a process per GPU): run the same command in each with
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``); under SLURM ``srun``, Open MPI and on TPU pod
slices nothing is needed (jax detects the processes). The workdir is shared; process 0 writes
the run's files and prints, the others log to ``error.process<I>.log``.

Faults end with one line on stderr (``error: ...``, naming the path or key and the cause; a
full traceback, and what libraries log, go to ``<workdir>/error.log``) and a status: 2 a bad
config (every problem, one line each), ``--workdir`` a file or read-only, or resuming a
workdir whose ``config.yaml`` has another model or recipe (``--resume-changed`` resumes anyway,
keeping the old file as ``config.<time>.yaml``); 1 a storage fault (a checkpoint that cannot be
written, none readable) or bad training data (more than ``train.max_skip_rate`` of the clips
skipped); 3 a non-finite loss; 130 SIGINT / SIGTERM (a checkpoint of the current step is saved
first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional


def _fail(lines, code: int):
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(code)


def check_workdir(path) -> Path:
    """``--workdir``: a directory (or a new one) that can be written, else one line, status 2."""
    wd = Path(path)
    if wd.exists() and not wd.is_dir():
        _fail([f"--workdir {wd}: not a directory (a file is there)"], 2)
    probe = wd
    while not probe.exists():  # the nearest existing folder is where it gets created
        probe = probe.parent
    if not probe.is_dir():
        _fail([f"--workdir {wd}: {probe} is not a directory"], 2)
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail([f"--workdir {wd}: {probe} is read-only (permission denied)"], 2)
    return wd


@contextlib.contextmanager
def _quiet_stderr(log_path: Path):
    """Send the libraries' output to ``log_path``: file descriptor 2 (C++ logs), Python
    logging, thread / unraisable exceptions. ``sys.stderr`` keeps going where it went (the
    progress bar and the one-line errors)."""
    log = open(log_path, "a", buffering=1)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    term = sys.stderr
    if getattr(term, "fileno", None) is not None:
        try:
            if term.fileno() == 2:  # the real stderr: keep a copy of it for ours
                term = os.fdopen(os.dup(saved_fd), "w", buffering=1)
        except (OSError, ValueError):  # a captured stream without a descriptor
            pass
    os.dup2(log.fileno(), 2)
    old_stderr, old_thread, old_unraisable = sys.stderr, threading.excepthook, sys.unraisablehook
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    old_last_resort, logging.lastResort = logging.lastResort, handler
    sys.stderr = term
    threading.excepthook = lambda a: traceback.print_exception(a.exc_type, a.exc_value, a.exc_traceback, file=log)
    sys.unraisablehook = lambda u: traceback.print_exception(type(u.exc_value), u.exc_value, u.exc_traceback,
                                                             file=log)
    try:
        yield log
    finally:
        sys.stderr.flush()
        sys.stderr, threading.excepthook, sys.unraisablehook = old_stderr, old_thread, old_unraisable
        root.handlers, logging.lastResort = old_handlers, old_last_resort
        root.setLevel(old_level)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if term is not old_stderr:
            term.close()
        log.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="a config shipped in lmeec_jax/configs/ by name (e.g. lmeec_hiera_b+_egoexo) "
                   "or a path to a YAML file (default: synthetic_tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 --set optim.base_lr=1e-4 (repeatable)")
    p.add_argument("--workdir", default=None, help="output directory (default: work_dirs/<config name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a checkpoint in the workdir and resume from it")
    g.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start from step 0")
    p.add_argument("--resume-changed", action="store_true",
                   help="resume even though the model or recipe differs from the workdir's config.yaml "
                   "(the old one is kept as config.<time>.yaml)")
    g = p.add_argument_group("more than one process (jax.distributed; see README)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service (runtime.coordinator_address; "
                   "default: $JAX_COORDINATOR_ADDRESS, or what jax detects under SLURM / Open MPI / TPU pods)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes (runtime.num_processes; default: $JAX_NUM_PROCESSES or detected)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process, 0..N-1 (runtime.process_id; default: $JAX_PROCESS_ID or detected)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() even where nothing above is set (jax's cluster detection)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    args = p.parse_args(argv)

    from lmeec_jax.training.config import ConfigError, config_yaml, load_config

    overrides = list(args.overrides) + (["runtime.distributed=true"] if args.distributed else [])
    for flag, key in (("coordinator", "coordinator_address"), ("num_processes", "num_processes"),
                      ("process_id", "process_id")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"runtime.{key}={json.dumps(v)}")
    try:  # a dry run only prints: the input paths need not exist yet
        cfg = load_config(args.config, overrides, check_paths=not args.dry_run)
    except ConfigError as e:
        _fail(e.problems or [str(e)], 2)
    if args.dry_run:
        sys.stdout.write(config_yaml(cfg))
        return 0
    workdir = check_workdir(args.workdir or f"work_dirs/{cfg.name}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail([f"--workdir {workdir}: {e.strerror or e}"], 2)
    pid = _process_id(cfg)
    with _quiet_stderr(workdir / ("error.log" if not pid else f"error.process{pid}.log")) as log:
        return _train(cfg, workdir, args, log)


def _process_id(cfg) -> Optional[int]:
    """This process's index as known before jax starts (flag, JAX_PROCESS_ID, SLURM, Open MPI):
    every process but 0 logs to its own ``error.process<i>.log``."""
    if cfg.runtime.process_id is not None:
        return cfg.runtime.process_id
    for var in ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return None


def _train(cfg, workdir: Path, args, log) -> int:
    from lmeec_jax.training.checkpointing import CheckpointError
    from lmeec_jax.training.trainer import ConfigChanged, DataFault, Interrupted, NonFiniteLoss, StopRequest, Trainer

    def error(e: BaseException, code: int) -> int:
        traceback.print_exception(type(e), e, e.__traceback__, file=log)
        print(f"error: {' '.join(str(e).split(chr(10)))}", file=sys.stderr)
        return code

    resume = "required" if args.resume else "never" if args.fresh else "auto"
    trainer = None
    with StopRequest() as stop:
        try:
            trainer = Trainer(cfg, workdir, resume=resume, resume_changed=args.resume_changed, stop=stop)
            summary = trainer.train()
        except Interrupted as e:
            return error(e, 130)
        except (CheckpointError, DataFault) as e:
            return error(e, 1)
        except NonFiniteLoss as e:
            return error(e, 3)
        except (ConfigChanged, FileNotFoundError, ValueError) as e:
            return error(e, 2)
        except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in error.log
            traceback.print_exception(type(e), e, e.__traceback__, file=log)
            print(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (traceback in {workdir / 'error.log'})",
                  file=sys.stderr)
            return 1
        finally:
            if trainer is not None:
                trainer.close()
    if not trainer.is_main:
        return 0
    ev = summary.get("eval")
    print(f"done: {summary['step']} steps, wall time {summary['wall_s']:.0f} s (training {summary['train_wall_s']:.0f} s)")
    if ev:
        line = {k: round(ev[k], 4) for k in ("iou", "contour_accuracy", "location_error", "balanced_accuracy")}
        print(f"final ego->exo (LM-EEC protocol, {ev['n_videos']} videos): {json.dumps(line)}")
        if "before_training" in ev:
            print(f"  before training IoU {ev['before_training']['iou']:.4f}")
        if "baseline_paste_source" in ev:
            print(f"  paste-source baseline IoU {ev['baseline_paste_source']['iou']:.4f}")
        print(f"  -> {workdir}/eval_final.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
