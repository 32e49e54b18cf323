"""python -m convert --src CHECKPOINT.pt --out DIR [--model NAME] [--image-size N] [--overwrite]

Converts a SAM 2.1 checkpoint (``{"model": state_dict}``), an LM-EEC trainer checkpoint
(``checkpoint.pt``, ``{"model": ...}``) or an LM-EEC ``<epoch>.pth`` (raw DDP state dict
with ``module.`` keys) into a model directory that ``lmeec_jax.load_model(DIR)`` reads.

Strict: every tensor of the checkpoint must be used and every parameter of the model
written, with matching shapes; otherwise the command lists each offending key and exits
with status 1. One exception, on purpose: converting a plain SAM 2.1 base_plus checkpoint
to ``--model lmeec_hiera_b+`` initialises the 12 MV_MoE tensors fresh (the LM-EEC
training start point) and says so.

``--out`` must not exist, or be an empty directory; an existing directory (a model directory
or any other) is replaced only with ``--overwrite``, and then as a whole, only once the new
one is complete (a kill at any moment leaves the old or the new directory). Exit status: 0 done,
1 bad checkpoint or failed write (disk full), 2 unusable ``--out`` (exists, a file, read-only).
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import warnings
from pathlib import Path

import numpy as np


# --out problems (status 2), as opposed to a write that failed on the way (status 1: disk full...).
OUT_ERRNOS = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS}


def fail(msg: str, status: int = 1) -> int:
    print(f"convert: error: {msg}", file=sys.stderr)
    return status


def blocked_globals(path: Path, error: str) -> list[str]:
    """The globals (``module.name``) in the pickle of ``path`` that ``weights_only`` loading
    refuses: from torch's message, else read (not run) from the pickle itself."""
    import pickletools

    import torch

    names = re.findall(r"GLOBAL ([\w.]+)", error)
    if names:
        return list(dict.fromkeys(names))
    try:  # a torch.save zip
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        pass
    found, strings = [], []  # a bare pickle (protocol 4+ stops torch before its first global)
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        pass
    return [n for n in dict.fromkeys(found) if n.split(".")[0] not in ("torch", "collections")]


_TORCH_BOILERPLATE = ("Weights only", "Please file an issue", "Check the doc")


def _load_error(path: Path, e: Exception) -> str:
    """One line for a checkpoint that ``torch.load(weights_only=True)`` refused."""
    import pickle

    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        names = blocked_globals(path, text)
        if names:
            return (f"{path}: refused for safety: its pickle calls {', '.join(names)}, which safe loading "
                    f"(torch.load weights_only=True) blocks; only tensors are read")
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(_TORCH_BOILERPLATE)]
        text = lines[0] if lines else text
    first = text.splitlines()[0] if text else type(e).__name__
    return f"{path}: not a loadable PyTorch checkpoint ({first[:200]})"


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint safely (``weights_only=True``) and return its state dict as numpy.

    Raises ValueError with a one-line reason when the file is not a usable checkpoint.
    """
    import torch  # only the converter imports torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, IndexError, RuntimeError...)
        raise ValueError(_load_error(path, e)) from None
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


def convert(src: Path, out: Path, model: str | None = None, image_size: int | None = None, log=print,
            overwrite: bool = False):
    """Convert ``src`` into the model directory ``out``; returns the ModelConfig. An existing
    ``out`` directory is replaced only when ``overwrite`` (else ModelDirError, before any work)."""
    from convert.infer import MV_MOE_KEYS, resolve_config
    from lmeec_jax.models.checkpoint import prepare_save_target, save_model
    from lmeec_jax.models.sam2 import build_model
    from lmeec_jax.models.weights import load_state_dict

    prepare_save_target(out, overwrite=overwrite, overwrite_other=overwrite, flag="--overwrite")
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
    save_model(net, cfg, out, overwrite=overwrite, overwrite_other=overwrite)
    log(f"wrote {out}")
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="PyTorch checkpoint (.pt / .pth)")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--model", default=None, help="model name (default: inferred from tensor shapes), "
                   "e.g. sam2.1_hiera_b+ or lmeec_hiera_b+")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: 1024 for SAM 2.1, 480 for LM-EEC)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out directory (a model directory or any other: all its files go)")
    args = p.parse_args(argv)
    from lmeec_jax.models.checkpoint import ModelDirError
    from lmeec_jax.models.weights import StateDictMismatch

    try:
        convert(args.src, args.out, args.model, args.image_size, overwrite=args.overwrite)
    except ModelDirError as e:
        return fail(str(e), 2 if e.errno in OUT_ERRNOS else 1)
    except StateDictMismatch as e:
        return fail(f"{args.src} does not fit the model:\n  {e}")
    except ValueError as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
