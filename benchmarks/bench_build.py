"""First-use cost of the fused CPU kernel when N processes (ranks) start together.

``python benchmarks/bench_build.py [--procs 4]`` starts N processes at once on an empty temporary
cache; each imports :mod:`adafactor._build` and builds ``csrc/adafactor_cpu.c`` with the flags of
:mod:`adafactor._fused_cpu` (and the ``-D`` definitions of ``adafactor._plan.c_defines``). It
prints each process's time from launch to a loaded library (and the part spent in
``build_library``), and how many times the compiler ran (through a wrapper on ``$CC`` that logs
each run), then repeats on the now-warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import ctypes, json, sys, time
launched = float(sys.argv[1])
t0 = time.time()
import adafactor._build as b
t1 = time.time()
lib = b.build_library(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
t2 = time.time()
ctypes.CDLL(str(lib))
t3 = time.time()
print(json.dumps({"import": t1 - t0, "build": t2 - t1, "ready": t3 - launched}))
"""


def _round(
    n: int, source: Path, flags: list[str], defines: dict[str, int], env: dict[str, str]
) -> list[dict]:
    launched = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                repr(launched),
                str(source),
                json.dumps(flags),
                json.dumps(defines),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a process failed (exit {proc.returncode})")
        results.append(json.loads(out))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=4, help="processes started together")
    args = parser.parse_args()

    from adafactor import _fused_cpu

    real_cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if real_cc is None:
        raise SystemExit("no C compiler found")
    flags = [*_fused_cpu._FLAGS, "-lm"]
    try:  # the AF_* option values, where the kernel source takes them as -D definitions
        from adafactor._plan import c_defines

        defines = c_defines()
    except ImportError:
        defines = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cc.log"
        log.touch()
        wrapper = Path(tmp) / "cc-wrapper"
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec {real_cc} "$@"\n')
        wrapper.chmod(0o755)
        env = dict(os.environ, CC=str(wrapper), ADAFACTOR_CACHE_DIR=str(Path(tmp) / "cache"))
        env.pop("ADAFACTOR_REBUILD", None)
        print(f"{args.procs} processes, {os.cpu_count()} CPUs, compiler {real_cc}")
        print(f"flags: {' '.join(flags)}; {len(defines)} -D definitions")
        for label in ("cold cache", "warm cache"):
            before = len(log.read_text().splitlines())
            results = _round(args.procs, _fused_cpu._SOURCE, flags, defines, env)
            runs = len(log.read_text().splitlines()) - before
            print(f"\n{label}: compiler runs = {runs}")
            print("  proc  launch->ready s  import s  build_library s")
            for i, r in enumerate(results):
                print(f"  {i:4d}  {r['ready']:15.3f}  {r['import']:8.3f}  {r['build']:15.4f}")


if __name__ == "__main__":
    main()
