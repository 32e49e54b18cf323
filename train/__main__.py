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
touching data or the workdir.
"""

from __future__ import annotations

import argparse
import json
import sys


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
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    args = p.parse_args(argv)

    from lmeec_jax.training.config import ConfigError, config_yaml, load_config

    overrides = list(args.overrides) + (["runtime.distributed=true"] if args.distributed else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        p.error(str(e))
    if args.dry_run:
        sys.stdout.write(config_yaml(cfg))
        return 0
    workdir = args.workdir or f"work_dirs/{cfg.name}"

    from lmeec_jax.training.trainer import NonFiniteLoss, Trainer

    resume = "required" if args.resume else "never" if args.fresh else "auto"
    try:
        trainer = Trainer(cfg, workdir, resume=resume)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
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
