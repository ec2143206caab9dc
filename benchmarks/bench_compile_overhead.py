"""Compiled (inductor) against eager ``opt.step`` on 24 matrices of 768x768, 2 threads.

Run it from two checkouts (``PYTHONPATH=other/src python benchmarks/bench_compile_overhead.py``)
alternately to compare commits; prints the best of 15 steps for each and their ratio.
"""

from __future__ import annotations

import time
import warnings

import torch

from adafactor import Adafactor


def _best_ms(step, repeats: int = 15) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    params = [torch.nn.Parameter(torch.randn(768, 768)) for _ in range(24)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adafactor(params, lr=1e-3)
    opt.step()
    compiled = torch.compile(opt.step)
    for _ in range(3):
        compiled()
    eager_ms, compiled_ms = _best_ms(opt.step), _best_ms(compiled)
    ratio = compiled_ms / eager_ms
    print(f"eager {eager_ms:.1f} ms, compiled {compiled_ms:.1f} ms, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
