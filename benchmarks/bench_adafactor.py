"""Thin wrapper: ``python benchmarks/bench_adafactor.py [options]`` = ``adafactor bench``."""

from __future__ import annotations

import sys

from adafactor.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
