"""Thin wrapper: ``python benchmarks/bench_quality.py [options]`` = ``adafactor quality``.

A resumable training-quality sweep (``docs/which-configuration.md``): rerun the same command to
fill the missing cells; ``--report-only`` rebuilds the report from the finished ones.
"""

from __future__ import annotations

import sys

from adafactor.cli.quality import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
