"""The ``adafactor`` command: ``demo``, ``reproduce`` and ``bench`` subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Before a subcommand runs, ``main`` checks that the optional packages it
needs (the ``[cli]`` extra) import, so that a missing one stops the command before any work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["build_parser", "main"]

DESCRIPTION = (
    "Adafactor's command-line tools: a demo against AdamW, the paper's ablation, a benchmark."
)
_SUBCOMMANDS = {
    "demo": "Train a small Transformer with Adafactor beside AdamW and compare them.",
    "reproduce": "Run the paper's Table 2 ablation at small scale.",
    "bench": "Time this project's step against torch.optim.Adafactor and fused AdamW.",
    "quality": "Resumable sweep: Adafactor configurations against tuned AdamW at several lengths.",
}
# What each subcommand imports from the [cli] extra: the plots and the progress bar.
EXTRAS = {"demo": ("matplotlib", "tqdm"), "reproduce": ("matplotlib", "tqdm"), "bench": ()}
EXTRAS["quality"] = ("matplotlib", "tqdm")
INSTALL_HINT = "pip install 'adafactor[cli]' (in a source checkout: pip install '.[cli]')"
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (Ctrl-C)


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"adafactor.cli.{name}") for name in _SUBCOMMANDS}


def build_parser(modules: dict[str, ModuleType] | None = None) -> argparse.ArgumentParser:
    """The ``adafactor`` parser with one subparser per subcommand."""
    modules = modules or _modules()
    parser = argparse.ArgumentParser(prog="adafactor", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(sub_parser)
    return parser


def extras_problem(command: str) -> str | None:
    """What keeps the [cli] packages that ``command`` needs from importing, or None."""
    absent, broken = [], []
    for name in EXTRAS[command]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            # A broken install (matplotlib without numpy, say) names another module.
            if exc.name in (None, name) or exc.name.startswith(f"{name}."):
                absent.append(name)
            else:
                broken.append(f"{name} is installed but cannot import {exc.name}")
    if absent:
        broken.insert(0, f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed")
    return "; ".join(broken) or None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adafactor`` console script."""
    command = "adafactor"
    try:
        modules = _modules()
        args = build_parser(modules).parse_args(argv)
        command = f"adafactor {args.command}"
        problem = extras_problem(args.command)
        if problem:
            print(
                f"{command}: error: {problem}; the command needs its extras: {INSTALL_HINT}",
                file=sys.stderr,
            )
            return 2
        return int(modules[args.command].run(args))
    except KeyboardInterrupt:  # the subcommands report their own kept results
        print(f"{command}: interrupted", file=sys.stderr)
        return INTERRUPTED
