"""The ``adafactor`` command: ``demo``, ``reproduce`` and ``bench`` subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

_SUBCOMMANDS = {
    "demo": "Train a small Transformer with Adafactor beside AdamW and compare them.",
    "reproduce": "Run the paper's Table 2 ablation at small scale.",
    "bench": "Time this project's step against torch.optim.Adafactor and fused AdamW.",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adafactor`` console script."""
    parser = argparse.ArgumentParser(prog="adafactor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in _SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        modules[name] = importlib.import_module(f"adafactor.cli.{name}")
        modules[name].add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
