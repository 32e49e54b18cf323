"""`python -m eval <command> ...`

Each command lives in its own module of this package and exposes
``register(subparsers)`` which adds its sub-parser and sets ``func`` to its main.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module (in this package) that registers it
COMMANDS = {
    "predict": "predict",
    "score": "score",
    "merge": "merge",
    "show": "show",
    "report": "report",
    "track": "track",
    "build-gt": "build_gt",
    "make-synthetic": "make_synthetic",
    "prepare-egoexo": "prepare_egoexo",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        try:
            module = importlib.import_module(f"eval.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"eval.{mod}":
                continue  # command not built in this checkout
            raise
        module.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
