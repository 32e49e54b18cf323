"""The model options shared by the commands that run the tracker (`eval predict`, `eval track`)."""

from __future__ import annotations

from typing import Optional, Tuple


def add_model_args(p, max_objects_help: str = "objects per batch (default 8)") -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model directory (python -m convert) or random:<config-name>, e.g. random:lmeec_hiera_nano")
    p.add_argument("--chunk", type=int, default=8, help="frames per jitted call (default 8)")
    p.add_argument("--max-objects", type=int, default=8, help=max_objects_help)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (float32: parity; bfloat16: like the reference's CUDA autocast)")
    p.add_argument("--precision", default=None, choices=("highest", "default"),
                   help="matmul precision (default: highest for float32, default for bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:<config> weights")


def load_predictor(args) -> Tuple[Optional[object], Optional[str]]:
    """``(Predictor, None)`` for the model options of ``args``, or ``(None, one-line error)``
    (a plain SAM 2.1 model, an unreadable model directory, bad options)."""
    from lmeec_jax.inference.predictor import Predictor
    from lmeec_jax.models.load import MissingMVMoE

    try:
        return Predictor.load(args.checkpoint, seed=args.seed, dtype=args.dtype, precision=args.precision,
                              chunk=args.chunk, max_objects=args.max_objects), None
    except MissingMVMoE as e:
        return None, str(e)
    except (OSError, ValueError) as e:
        return None, f"cannot load the model {args.checkpoint!r}: {e}"
