"""GPU timing of one optimizer step, with the device's bandwidth roofline measured in the same run.

``python benchmarks/bench_gpu.py [--shapes gpt2-small llama-1b] [--dtypes fp32 bf16]
[--steps 20] [--out DIR]`` times, on the current CUDA device:

* ``adafactor``: ``Adafactor()`` (the op's CUDA kernel: the foreach implementation);
* ``adafactor_triton``: ``Adafactor(impl="triton")`` (when triton is installed);
* ``torch_adafactor_foreach``: ``torch.optim.Adafactor(foreach=True)``;
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``;

on the shape sets of ``adafactor bench`` (GPT-2 small: 124M parameters in 148 tensors; a
LLaMA-3.2-1B-like set: 1.2B in 146), in float32 and bfloat16. Each step is timed alone with CUDA
events (median and minimum over ``--steps`` steps after 3 warm-up steps, which include Triton's
compilation). The roofline is a large ``a += b`` (3 bytes moved per byte of ``a``) timed the
same way; each row reports the bytes the step must move under ``adafactor bench``'s pass model
divided by its time, and that as a fraction of the roofline. Also reported: the peak memory a
step allocates beyond what was allocated before it.

Writes ``DIR/bench_gpu.json`` and ``DIR/bench_gpu.md`` (default DIR: ``build/gpu-check``).
Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adafactor.cli.bench import SHAPE_SETS, model_bytes
from adafactor.kernels import HAS_TRITON

IMPLS = ["adafactor", "adafactor_triton", "torch_adafactor_foreach", "adamw_fused"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from adafactor import Adafactor

    if name == "adafactor":
        return Adafactor(params)
    if name == "adafactor_triton":
        return Adafactor(params, impl="triton")
    if name == "torch_adafactor_foreach":
        return torch.optim.Adafactor(params, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True)
    raise ValueError(name)


def _time(fn: Any, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def roofline(numel: int = 1 << 28, steps: int = 10) -> float:
    """GB/s of ``a += b`` on float32 tensors of ``numel`` elements (read a, b; write a)."""
    a = torch.zeros(numel, device="cuda")
    b = torch.ones(numel, device="cuda")
    ms = statistics.median(_time(lambda: a.add_(b), steps))
    return 3 * numel * 4 / (ms * 1e-3) / 1e9


def bench_one(name: str, shapes: list[tuple[int, ...]], dtype: str, steps: int) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=DTYPES[dtype]) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = _optimizer(name, params)
    opt.step()  # state allocated, kernels compiled
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = _time(opt.step, steps)
    model = "adamw_fused" if name == "adamw_fused" else "adafactor"
    moved = model_bytes(model, shapes, dtype)
    ms = statistics.median(times)
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "impl": name,
        "dtype": dtype,
        "ms_median": round(ms, 4),
        "ms_min": round(min(times), 4),
        "model_gb": round(moved / 1e9, 4),
        "gbps": round(moved / (ms * 1e-3) / 1e9, 1),
        "peak_extra_mib": round(peak / 2**20, 1),
    }


def markdown(report: dict) -> str:
    lines = [
        f"GPU step timings on {report['device']} (torch {report['torch']}, triton "
        f"{report['triton']}); roofline `a += b`: {report['roofline_gbps']:.0f} GB/s",
        "",
        "| shapes | dtype | implementation | ms/step (median) | ms (min) | GB/s (pass model) "
        "| of roofline | extra MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['shapes']} | {r['dtype']} | {r['impl']} | {r['ms_median']:.3f} | "
            f"{r['ms_min']:.3f} | {r['gbps']:.0f} | {r['roofline_frac']:.0%} | "
            f"{r['peak_extra_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2-small", "llama-1b"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", default=IMPLS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("build/gpu-check"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to time (skipped)")
        return 0
    impls = [i for i in args.impls if i != "adafactor_triton" or HAS_TRITON]
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if HAS_TRITON else None,
        "python": platform.python_version(),
        "roofline_gbps": round(roofline(), 1),
        "rows": [],
    }
    print(f"roofline: {report['roofline_gbps']} GB/s", flush=True)
    for shapes_name in args.shapes:
        shapes = SHAPE_SETS[shapes_name]()
        for dtype in args.dtypes:
            for name in impls:
                try:
                    row = bench_one(name, shapes, dtype, args.steps)
                except Exception as e:  # one failure must not lose the rest
                    row = {"impl": name, "dtype": dtype, "error": f"{type(e).__name__}: {e}"}
                    print(f"{shapes_name} {dtype} {name}: {row['error']}", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    report.setdefault("errors", []).append({"shapes": shapes_name, **row})
                    continue
                row["shapes"] = shapes_name
                row["params_m"] = round(sum(math.prod(s) for s in shapes) / 1e6, 1)
                row["roofline_frac"] = row["gbps"] / report["roofline_gbps"]
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench_gpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
