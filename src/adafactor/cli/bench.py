"""``adafactor bench``: step time, memory and roofline of this project's Adafactor vs anchors.

Steady step times are *paired*: ``--runs`` fresh processes each hold every implementation, each
on its own copy of the same parameters and gradients, and after 2 warm-up steps run ``--steps``
rounds in which every implementation steps once in turn. The memory bandwidth of a cloud VM can
drift by 2x within seconds, so step times taken in separate processes compare different
machines; within a round all implementations see the same one. Reported: the median step time
over all rounds, and each ratio to an anchor as the median over rounds of the ratio within the
round. The first step (warm kernel cache, and for ``adafactor`` also an empty one, the C build
included) and the memory are taken in a fresh process per implementation: a thread reads RSS from
/proc/self/statm about every millisecond; *transient* = max over 3 steady steps of (peak RSS during
the step - RSS just before it), with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed temporaries leave
RSS. The memory bandwidth is measured in the same run (in-place ``a += b`` on 256 MiB arrays,
2 reads + 1 write, best of 5), and the roofline of each implementation is the bytes its pass
model must move divided by that bandwidth:

* Adafactor (the minimum of three passes; used for every Adafactor): pass 1 reads g, pass 2 reads
  g, pass 3 reads g and x and writes x (RMS(x) carried from the previous pass 3); an unfactored
  tensor adds V (read + write in pass 2, read in pass 3); momentum adds m (read + write).
* AdamW: reads p, g, m, v and writes p, m, v once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import INTERRUPTED
from ._train import output_file, positive_int

__all__ = ["SHAPE_SETS", "add_arguments", "run"]

IMPLS: dict[str, str] = {
    "adafactor": "this project, defaults (impl='auto')",
    "adafactor_mom_bf16": "this project, beta1=0.9, momentum_dtype=bfloat16",
    "adafactor_reference": "this project, impl='reference' (the readable math)",
    "adafactor_compiled": "this project, torch.compile(opt.step, fullgraph=True)",
    "torch_adafactor_single": "torch.optim.Adafactor(foreach=False)",
    "torch_adafactor_foreach": "torch.optim.Adafactor(foreach=True)",
    "hf_adafactor": "transformers Adafactor defaults (relative_step, scale_parameter)",
    "adamw_fused": "torch.optim.AdamW(fused=True)",
}
DEFAULT_IMPLS = [
    "adafactor",
    "adafactor_mom_bf16",
    "torch_adafactor_single",
    "torch_adafactor_foreach",
    "hf_adafactor",
    "adamw_fused",
]


def _gpt2_small() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]
        shapes += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return [*shapes, (768,), (768,)]


def _many_small() -> list[tuple[int, ...]]:
    # 2000 tensors of 64 .. 33k elements (23M params): per-tensor overhead dominates
    shapes: list[tuple[int, ...]] = []
    for i in range(500):
        shapes += [(64 + i % 7,), (32, 48 + i % 5), (128, 96), (256, 128)]
    return shapes


def _many_tiny() -> list[tuple[int, ...]]:
    # 2000 tensors of 16 elements: the per-tensor cost of the step alone (Python, dispatch)
    return [(16,)] * 2000


def _llama_1b() -> list[tuple[int, ...]]:
    # LLaMA-3.2-1B-like: 16 layers, d=2048, ffn 8192, GQA 8 kv heads of 64, vocab 128256, tied
    d, ffn, kv = 2048, 8192, 512
    shapes: list[tuple[int, ...]] = [(128256, d)]
    for _ in range(16):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return [*shapes, (d,)]


SHAPE_SETS = {
    "gpt2-small": _gpt2_small,
    "many-small": _many_small,
    "many-tiny": _many_tiny,
    "llama-1b": _llama_1b,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        choices=sorted(SHAPE_SETS),
        default="gpt2-small",
        help="parameter shapes to step: gpt2-small (124M parameters in 148 tensors), "
        "many-small (2000 tensors, 23M parameters: per-tensor overhead), many-tiny (2000 "
        "tensors of 16 elements: the per-tensor cost alone) or llama-1b "
        "(1.2B parameters: tens of GB of memory, checked before it starts) (default gpt2-small)",
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        nargs="+",
        default=["fp32", "bf16"],
        help="parameter and gradient dtypes to time, one table block each (default both)",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=sorted(IMPLS),
        default=None,
        metavar="IMPL",
        help="implementations to time: " + ", ".join(sorted(IMPLS)) + " (default: all but "
        "adafactor_reference and adafactor_compiled; hf_adafactor is skipped when transformers "
        "is not installed)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=10,
        help="timed rounds per paired run, after 2 warm-up steps (default 10)",
    )
    parser.add_argument(
        "--runs",
        type=positive_int,
        default=3,
        help="paired runs, each in a fresh process (default 3)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=2,
        help="CPU threads for torch and OpenMP in every process (default 2)",
    )
    parser.add_argument(
        "--output",
        type=output_file,
        default=None,
        metavar="FILE",
        help="also write the rows to FILE (.json or .csv) and the table beside it as .md "
        "(default: print the table only)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead of step times, measure the peak memory of whole training steps (forward, "
        "backward, step) of a GPT-2-small-shaped model under AdamW, Adafactor, Adafactor with "
        "gradient release and bf16 with release and stochastic rounding: runs "
        "benchmarks/bench_memory.py of the source checkout with --threads and --output "
        "(docs/memory.md; several minutes on 2 cores)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# worker side (one implementation, one fresh process)
# ---------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)


class _Compiled:
    """An optimizer whose step is ``torch.compile(opt.step, fullgraph=True)``."""

    def __init__(self, opt: Any) -> None:
        import torch

        self.state = opt.state
        self.step = torch.compile(opt.step, fullgraph=True)


def _make_optimizer(name: str, params: list[Any]) -> Any:
    import torch

    if name.startswith("adafactor"):
        from adafactor import Adafactor

        if name == "adafactor_mom_bf16":
            return Adafactor(params, beta1=0.9, momentum_dtype=torch.bfloat16)
        if name == "adafactor_compiled":
            return _Compiled(Adafactor(params))
        return Adafactor(params, impl="reference" if name == "adafactor_reference" else "auto")
    if name == "torch_adafactor_single":
        return torch.optim.Adafactor(params, foreach=False)
    if name == "torch_adafactor_foreach":
        return torch.optim.Adafactor(params, foreach=True)
    if name == "hf_adafactor":
        from transformers.optimization import Adafactor as HFAdafactor

        return HFAdafactor(params, lr=None, relative_step=True, scale_parameter=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True)
    raise ValueError(f"unknown implementation {name!r}; choose from {sorted(IMPLS)}")


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["impl"] == "bandwidth":
        a = torch.ones(64 << 20)
        b = torch.ones(64 << 20)
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            a.add_(b)
            best = min(best, time.perf_counter() - t)
        return {"bandwidth_GBps": 3 * a.numel() * 4 / best / 1e9}
    if spec["impl"] == "paired":
        return _paired(spec)
    opt = _make_optimizer(spec["impl"], _params(spec))
    t = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t
    times = []
    for i in range(spec["steps"] + 2):
        t = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    out: dict[str, Any] = {"first": first, "times": times}
    if spec["memory"]:
        transient = 0
        for _ in range(3):
            before = _rss()
            sampler = _Sampler()
            sampler.start()
            opt.step()
            sampler.running = False
            sampler.join()
            transient = max(transient, sampler.peak - before)
        out["transient_bytes"] = transient
        seen, state = set(), 0
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    state += v.untyped_storage().nbytes()
        out["state_bytes"] = state
    return out


def _params(spec: dict[str, Any]) -> list[Any]:
    import torch

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPE_SETS[spec["shapes"]]():
        p = torch.randn(shape, generator=gen).mul_(0.02).to(dtype).requires_grad_(True)
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def _paired(spec: dict[str, Any]) -> dict[str, Any]:
    """Every implementation in this process, one step each per round (see the module docstring)."""
    opts = {impl: _make_optimizer(impl, _params(spec)) for impl in spec["impls"]}
    for opt in opts.values():
        for _ in range(2):
            opt.step()
    times: dict[str, list[float]] = {impl: [] for impl in opts}
    for _ in range(spec["steps"]):
        for impl, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[impl].append(time.perf_counter() - t)
    return {"times": times}


def _spawn(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "adafactor.cli.bench", "--worker", json.dumps(spec)]
    full_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", **(env or {})}
    full_env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if proc.returncode != 0:
        print(f"  {spec['impl']}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the roofline model
# ---------------------------------------------------------------------------------------------
def model_bytes(impl: str, shapes: list[tuple[int, ...]], dtype: str) -> float:
    """Bytes one step must move under the pass model of the module docstring."""
    p = 2 if dtype == "bf16" else 4
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if impl == "adamw_fused":
            total += n * (2 * p + p + 4 * p)  # p r/w, g r, m and v r/w (state in param dtype)
            continue
        factored = len(shape) >= 2
        total += n * (3 * p + 2 * p)  # g three times; x read and written in pass 3
        if not factored:
            total += n * 3 * 4  # V: read + write in pass 2, read in pass 3
        if impl == "adafactor_mom_bf16":
            total += n * 2 * 2
    return total


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _available(impl: str) -> bool:
    if impl != "hf_adafactor":
        return True
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _bench_dtype(args: argparse.Namespace, dtype: str, impls: list[str]) -> list[dict[str, Any]]:
    base = {"shapes": args.shapes, "dtype": dtype, "threads": args.threads, "steps": args.steps}
    _check_memory(args.shapes, dtype, impls)
    results: dict[str, dict[str, Any]] = {i: {"times": []} for i in impls}
    for impl in impls:  # first step and memory: a fresh process each
        print(f"  {dtype} first step and memory: {impl}", file=sys.stderr, flush=True)
        out = _spawn({**base, "impl": impl, "memory": True, "steps": 0})
        if out is not None:
            results[impl].update(out)
    for r in range(args.runs):
        print(f"  {dtype} paired run {r + 1}/{args.runs}", file=sys.stderr, flush=True)
        out = _spawn({**base, "impl": "paired", "impls": impls})
        if out is None:
            continue
        for impl in impls:
            results[impl]["times"] += out["times"][impl]
    bw = max(_spawn({**base, "impl": "bandwidth"})["bandwidth_GBps"] for _ in range(2))  # type: ignore[index]
    cold = None
    if "adafactor" in impls:  # first step with an empty kernel cache (the C build included)
        with tempfile.TemporaryDirectory() as cache:
            spec = {**base, "impl": "adafactor", "memory": False, "steps": 0}
            out = _spawn(spec, {"ADAFACTOR_CACHE_DIR": cache})
            cold = out["first"] if out else None
    shapes = SHAPE_SETS[args.shapes]()
    rows = []
    for impl in impls:
        res = results[impl]
        if not res["times"]:
            continue
        median = statistics.median(res["times"])
        roof = model_bytes(impl, shapes, dtype) / (bw * 1e9)
        rows.append(
            {
                "impl": impl,
                "dtype": dtype,
                "median_s": median,
                "min_s": min(res["times"]),
                "first_s": res.get("first", math.nan),
                "first_cold_s": cold if impl == "adafactor" else None,
                "state_MiB": res.get("state_bytes", 0) / 2**20,
                "transient_MiB": res.get("transient_bytes", 0) / 2**20,
                "model_GB": model_bytes(impl, shapes, dtype) / 1e9,
                "roofline_s": roof,
                "roofline_pct": 100 * roof / median,
                "bandwidth_GBps": bw,
            }
        )
    stepped = {row["impl"] for row in rows}
    for row in rows:
        for anchor in ("adamw_fused", "torch_adafactor_single", "hf_adafactor"):
            if anchor in stepped:  # the median of the ratios within each round
                pairs = zip(results[row["impl"]]["times"], results[anchor]["times"])
                row[f"x_{anchor}"] = statistics.median(a / b for a, b in pairs)
    return rows


def _check_memory(shapes: str, dtype: str, impls: list[str]) -> None:
    """The paired process holds params and grads for every implementation (+ AdamW's state)."""
    numel = sum(math.prod(s) for s in SHAPE_SETS[shapes]())
    need = numel * (2 if dtype == "bf16" else 4) * (2 * len(impls) + 2 + 2)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if "MemAvailable" in line)
    except (OSError, StopIteration):
        return
    if need > 0.8 * avail:
        raise SystemExit(
            f"adafactor bench: the paired run needs about {need / 2**30:.1f} GiB for "
            f"--shapes {shapes} --dtype {dtype} with {len(impls)} implementations, but "
            f"{avail / 2**30:.1f} GiB are available; pass fewer --impls"
        )


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    anchors = [
        a
        for a in ("adamw_fused", "torch_adafactor_single", "hf_adafactor")
        if any(f"x_{a}" in r for r in rows)
    ]
    head = ["impl", "dtype", "median s", "min s", "first s (warm)", "first s (cold)"]
    head += [f"x {a}" for a in anchors]
    head += ["state MiB", "transient MiB", "model GB", "roofline s", "% roofline"]
    lines = [
        f"shapes={args.shapes}, threads={args.threads}, {args.runs} paired runs x {args.steps} "
        "rounds; "
        f"bandwidth {rows[0]['bandwidth_GBps']:.1f} GB/s (in-place add, 2r1w)"
        if rows
        else "",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cold = f"{r['first_cold_s']:.2f}" if r["first_cold_s"] is not None else ""
        cells = [r["impl"], r["dtype"], f"{r['median_s']:.4f}", f"{r['min_s']:.4f}"]
        cells += [f"{r['first_s']:.3f}", cold]
        cells += [f"{r[f'x_{a}']:.2f}" if f"x_{a}" in r else "" for a in anchors]
        cells += [f"{r['state_MiB']:.1f}", f"{r['transient_MiB']:.1f}", f"{r['model_GB']:.2f}"]
        cells += [f"{r['roofline_s']:.4f}", f"{r['roofline_pct']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(rows: list[dict[str, Any]], table: str, output: Path) -> None:
    if output.suffix == ".csv":
        import csv

        with open(output, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    else:
        output.write_text(json.dumps(rows, indent=2))
    output.with_suffix(".md").write_text(table)


def memory_script() -> Path:
    """benchmarks/bench_memory.py of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "benchmarks" / "bench_memory.py"


def _memory(args: argparse.Namespace) -> int:
    """``--memory``: run benchmarks/bench_memory.py (it spawns a process per optimizer row)."""
    script = memory_script()
    if not script.is_file():
        print(
            f"adafactor bench: error: --memory runs {script}, which this installation lacks; "
            "run it from a source checkout (pip install -e .): python benchmarks/bench_memory.py",
            file=sys.stderr,
        )
        return 2
    argv = [sys.executable, str(script), "--threads", str(args.threads)]
    if args.output is not None:
        if args.output.suffix != ".json":
            print(
                f"adafactor bench: error: --memory writes JSON; pass --output with the suffix "
                f".json, got {args.output}",
                file=sys.stderr,
            )
            return 2
        argv += ["--output", str(args.output)]
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return INTERRUPTED


def run(args: argparse.Namespace) -> int:
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if getattr(args, "memory", False):
        return _memory(args)
    if args.output is not None:  # checked when parsed; made now, before minutes of timing
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"adafactor bench: error: --output {args.output}: cannot create its folder "
                f"({exc.strerror or exc}); pass another path",
                file=sys.stderr,
            )
            return 2
    impls = args.impls or DEFAULT_IMPLS
    missing = [i for i in impls if not _available(i)]
    if missing:
        print(f"skipping {missing}: transformers is not installed", file=sys.stderr)
    impls = [i for i in impls if i not in missing]
    rows: list[dict[str, Any]] = []
    finished: list[str] = []
    interrupted = False
    for dtype in args.dtype:
        try:
            rows += _bench_dtype(args, dtype, impls)
        except KeyboardInterrupt:
            interrupted = True
            break
        finished.append(dtype)
    if interrupted and not rows:
        print("adafactor bench: interrupted before any dtype finished", file=sys.stderr)
        return INTERRUPTED
    table = _markdown(rows, args)
    print(table)
    if args.output is not None:
        _write(rows, table, args.output)
    if interrupted:
        where = f" in {args.output} and above" if args.output is not None else " above"
        print(
            f"adafactor bench: interrupted: kept results of {', '.join(finished)}{where}",
            file=sys.stderr,
        )
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="adafactor bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
