"""python -m convert --src CHECKPOINT.pt --out DIR [--model NAME] [--image-size N]

Converts a SAM 2.1 checkpoint (``{"model": state_dict}``), an LM-EEC trainer checkpoint
(``checkpoint.pt``, ``{"model": ...}``) or an LM-EEC ``<epoch>.pth`` (raw DDP state dict
with ``module.`` keys) into a model directory that ``lmeec_jax.load_model(DIR)`` reads.

Strict: every tensor of the checkpoint must be used and every parameter of the model
written, with matching shapes; otherwise the command lists each offending key and exits
with status 1. One exception, on purpose: converting a plain SAM 2.1 base_plus checkpoint
to ``--model lmeec_hiera_b+`` initialises the 12 MV_MoE tensors fresh (the LM-EEC
training start point) and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def fail(msg: str) -> int:
    print(f"convert: error: {msg}", file=sys.stderr)
    return 1


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint safely (``weights_only=True``) and return its state dict as numpy.

    Raises ValueError with a one-line reason when the file is not a usable checkpoint.
    """
    import torch  # only the converter imports torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, IndexError, RuntimeError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable PyTorch checkpoint ({first[:200]})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor (not a state dict?)")
        key = k[len("module."):] if k.startswith("module.") else k
        out[key] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
    return out


def convert(src: Path, out: Path, model: str | None = None, image_size: int | None = None, log=print):
    """Convert ``src`` into the model directory ``out``; returns the ModelConfig."""
    from convert.infer import MV_MOE_KEYS, resolve_config
    from lmeec_jax.models.checkpoint import save_model
    from lmeec_jax.models.sam2 import build_model
    from lmeec_jax.models.weights import load_state_dict

    sd = read_torch_state_dict(src)
    cfg = resolve_config({k: v.shape for k, v in sd.items()}, model, image_size)
    log(f"{src}: {len(sd)} tensors -> {cfg.name} (image_size {cfg.image_size})")
    allow = MV_MOE_KEYS if cfg.mv_moe and not any(k in sd for k in MV_MOE_KEYS) else ()
    # Random values are only needed for tensors the checkpoint does not provide.
    net = build_model(cfg, abstract=not allow)
    fresh = load_state_dict(net, sd, allow_missing=allow)
    if fresh:
        log(f"warning: {len(fresh)} MV_MoE tensors are not in the checkpoint and were initialised fresh:")
        for k in fresh:
            log(f"  {k}")
    save_model(net, cfg, out)
    log(f"wrote {out}")
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="PyTorch checkpoint (.pt / .pth)")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--model", default=None, help="model name (default: inferred from tensor shapes), "
                   "e.g. sam2.1_hiera_b+ or lmeec_hiera_b+")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: 1024 for SAM 2.1, 480 for LM-EEC)")
    args = p.parse_args(argv)
    from lmeec_jax.models.weights import StateDictMismatch

    try:
        convert(args.src, args.out, args.model, args.image_size)
    except StateDictMismatch as e:
        return fail(f"{args.src} does not fit the model:\n  {e}")
    except ValueError as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
