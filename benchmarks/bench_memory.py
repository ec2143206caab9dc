"""Peak memory of whole training steps (forward, backward, step) of a GPT-2-small-shaped model.

``python benchmarks/bench_memory.py`` (or ``adafactor bench --memory``) trains a decoder-only
Transformer of GPT-2 small's shapes (d_model 768, 12 layers, 12 heads, vocab 50257, 1024 learned
positions, tied softmax: 124M parameters) built from the demo's blocks (``adafactor.cli._model``),
for a few steps under each optimizer row, each row in a fresh process, and reports the peak memory
beside the expected size of each part:

* on CPU: the peak resident set size (a thread reads /proc/self/statm about every millisecond,
  as ``adafactor bench`` does) during the measured steps, minus the RSS before the model was
  built (after a warm-up of the same code on a tiny model, so that libraries, thread pools and
  the C kernel are loaded before the baseline); ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed
  tensors leave the RSS;
* on CUDA: ``torch.cuda.max_memory_allocated`` during the measured steps, minus the memory
  allocated before the model was built (not run by this project's CI: it has no GPU).

Expected parts: params and state are counted from the tensors; gradients are all of them without
release, and the largest one with it (at most one complete gradient is alive besides those
autograd is still summing); activations are the tensors autograd saves in one forward (counted by
``saved_tensors_hooks``, parameters excluded). With stochastic rounding, release also holds the
rounding noise of one tensor (int32, 4 bytes per element of the largest parameter).

Rows: AdamW (fused) fp32; Adafactor fp32; Adafactor fp32 with gradient release; bf16 parameters
with release and stochastic rounding; the same with ``kahan_summation=True`` once Adafactor takes
that keyword (a placeholder row until then). ``--rows`` picks some, ``--layers`` and ``--seq``
shrink the run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROWS: dict[str, str] = {
    "floor": "no optimizer: forward + backward, each gradient dropped once complete, fp32",
    "floor_bf16": "the same with bf16 parameters",
    "adamw": "torch.optim.AdamW(fused=True), fp32",
    "adafactor": "Adafactor, fp32",
    "adafactor_release": "Adafactor(gradient_release=True), fp32",
    "adafactor_bf16_release_sr": "Adafactor(gradient_release=True, stochastic_rounding=True), bf16",
    "adafactor_bf16_release_kahan": "Adafactor(gradient_release=True, kahan_summation=True), bf16",
}
TARGET_SLACK = 0.10  # release: peak <= params + state + activations + largest gradient + 10%


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def build_model(
    layers: int, d_model: int, heads: int, vocab: int, positions: int, untie: bool = False
) -> Any:
    """GPT-2's layout from the demo's pre-norm blocks: token and position embeddings, blocks,
    a final norm and the softmax tied to the token embedding (``untie``: a separate matrix)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from adafactor.cli._model import _Block

    class GPT2Shaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab = vocab
            self.wte = nn.Embedding(vocab, d_model)
            self.wpe = nn.Embedding(positions, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
            self.final_norm = nn.LayerNorm(d_model, bias=False)
            self.head = nn.Linear(d_model, vocab, bias=False) if untie else None
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)

        def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            head = self.wte.weight if self.head is None else self.head.weight
            logits = F.linear(self.final_norm(x), head)
            return F.cross_entropy(logits.float().reshape(-1, self.vocab), targets.reshape(-1))

    return GPT2Shaped()


def _kahan_available() -> bool:
    from adafactor import Adafactor

    return "kahan_summation" in inspect.signature(Adafactor.__init__).parameters


class DropGradients:
    """The floor row: each gradient is dropped as soon as autograd completes it, nothing is
    stepped: the least memory a training step of this model can take."""

    def __init__(self, params: list[Any]) -> None:
        self.state: dict[Any, Any] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._drop) for p in params]

    @staticmethod
    def _drop(p: Any) -> None:
        p.grad = None

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove_gradient_release(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_optimizer(row: str, params: list[Any]) -> Any:
    import torch

    from adafactor import Adafactor

    if row.startswith("floor"):
        return DropGradients(params)
    if row == "adamw":
        return torch.optim.AdamW(params, fused=True)
    kwargs: dict[str, Any] = {}
    if "release" in row:
        kwargs["gradient_release"] = True
    if "_sr" in row:
        kwargs["stochastic_rounding"] = True
        kwargs["generator"] = torch.Generator().manual_seed(0)
    if "kahan" in row:
        kwargs["kahan_summation"] = True
    return Adafactor(params, **kwargs)


# ---------------------------------------------------------------------------------------------
# the worker: one row in a fresh process
# ---------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler(threading.Thread):
    """The peak RSS while it runs (read about every millisecond), and per phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "forward"
        self.peak = _rss()
        self.phases: dict[str, int] = {}
        self.running = True

    def run(self) -> None:
        while self.running:
            rss = _rss()
            self.peak = max(self.peak, rss)
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), rss)
            time.sleep(0.001)


def _batch(spec: dict[str, Any], step: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"] + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _train_step(
    model: Any, opt: Any, spec: dict[str, Any], step: int, device: Any, sampler: Any = None
) -> float:
    x, y = _batch(spec, step)
    loss = model.loss(x.to(device), y.to(device))
    if sampler is not None:
        sampler.phase = "backward"
    loss.backward()
    if sampler is not None:
        sampler.phase = "step"
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _saved_bytes(model: Any, spec: dict[str, Any], device: Any) -> int:
    """Bytes of the distinct tensors autograd saves in one forward, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = _batch(spec, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x.to(device), y.to(device))
    del loss
    return sum(seen.values())


def _warm_up(spec: dict[str, Any], device: Any) -> None:
    """The same code on a tiny model: libraries, thread pools, the kernel build and load."""
    import torch

    model = build_model(1, 64, 2, 97, 32).to(device=device, dtype=spec["torch_dtype"])
    opt = make_optimizer(spec["row"], list(model.parameters()))
    tiny = {**spec, "vocab": 97, "seq": 16}
    for step in range(2):
        _train_step(model, opt, tiny, step, device)
    opt.remove_gradient_release()
    del model, opt
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _tensor_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    spec["torch_dtype"] = torch.bfloat16 if "bf16" in spec["row"] else torch.float32
    _warm_up(spec, device)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device) if cuda else _rss()

    torch.manual_seed(0)
    model = build_model(
        spec["layers"], spec["d_model"], spec["heads"], spec["vocab"], 1024, spec["untie"]
    )
    model = model.to(device=device, dtype=spec["torch_dtype"])
    params = list(model.parameters())
    opt = make_optimizer(spec["row"], params)
    losses = [_train_step(model, opt, spec, 0, device)]  # allocates the optimizer state
    peaks, times, phases = [], [], {}
    for step in range(1, spec["steps"] + 1):
        start = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            losses.append(_train_step(model, opt, spec, step, device))
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated(device) - baseline)
        else:
            sampler = _Sampler()
            sampler.start()
            losses.append(_train_step(model, opt, spec, step, device, sampler))
            sampler.running = False
            sampler.join()
            peaks.append(sampler.peak - baseline)
            for phase, peak in sampler.phases.items():
                phases[phase] = max(phases.get(phase, 0), peak - baseline)
        times.append(time.perf_counter() - start)
    after = (torch.cuda.memory_allocated(device) if cuda else _rss()) - baseline
    param_bytes = _tensor_bytes(params)
    grads = [p.numel() * p.element_size() for p in params]
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    activations = _saved_bytes(model, spec, device)
    released = "release" in spec["row"] or spec["row"].startswith("floor")
    noise = max(p.numel() for p in params) * 4 if "_sr" in spec["row"] else 0
    return {
        "row": spec["row"],
        "params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "grad_bytes": max(grads) if released else sum(grads),
        "all_grad_bytes": sum(grads),
        "largest_grad_bytes": max(grads),
        "state_bytes": _tensor_bytes(state),
        "activation_bytes": activations,
        "noise_bytes": noise,
        "peak_bytes": max(peaks),
        "phase_peak_bytes": phases,
        "after_step_bytes": after,
        "step_s": min(times),
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def _spawn(spec: dict[str, Any]) -> dict[str, Any] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"  {spec['row']}: failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def expected_bytes(r: dict[str, Any]) -> int:
    """params + gradients (all, or the largest with release) + state + activations (+ noise)."""
    parts = ("param_bytes", "grad_bytes", "state_bytes", "activation_bytes", "noise_bytes")
    return sum(r[k] for k in parts)


def _floor_of(r: dict[str, Any], by: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return by.get("floor_bf16" if "bf16" in r["row"] else "floor")


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {r["row"]: r for r in results if "peak_bytes" in r}
    head = ["row", "params MiB", "grads MiB", "state MiB", "activations MiB", "expected MiB"]
    head += ["peak MiB", "peak / expected", "peak in", "over floor MiB", "vs AdamW"]
    head += ["vs Adafactor", "step s"]
    lines = [
        f"model: GPT-2-small shapes, {args.layers} layers, d_model {args.d_model}, vocab "
        f"{args.vocab}, {'untied' if args.untie else 'tied'} softmax, batch {args.batch} x "
        f"{args.seq} tokens; device {args.device}, "
        f"{args.threads} threads; peak over {args.steps} steps after one warm-up step",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        if "peak_bytes" not in r:
            lines.append(f"| {r['row']} | {r['note']} |" + " |" * (len(head) - 2))
            continue
        grads = _mib(r["grad_bytes"])
        if r["grad_bytes"] != r["all_grad_bytes"]:
            grads += " (largest)"
        if r["noise_bytes"]:
            grads += f" + {_mib(r['noise_bytes'])} SR noise"
        cells = [r["row"], _mib(r["param_bytes"]), grads, _mib(r["state_bytes"])]
        cells += [_mib(r["activation_bytes"]), _mib(expected_bytes(r)), _mib(r["peak_bytes"])]
        cells.append(f"{r['peak_bytes'] / expected_bytes(r):.2f}")
        phases = r.get("phase_peak_bytes") or {}
        cells.append(max(phases, key=phases.__getitem__) if phases else "")
        floor = _floor_of(r, by)
        over = floor is not None and floor is not r
        cells.append(_mib(r["peak_bytes"] - floor["peak_bytes"]) if over else "")
        for anchor in ("adamw", "adafactor"):
            other = by.get(anchor)
            ratio = other and anchor != r["row"] and not r["row"].startswith("floor")
            cells.append(f"{r['peak_bytes'] / other['peak_bytes']:.2f}" if ratio else "")
        cells.append(f"{r['step_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    verdicts = []
    for r in results:
        if "release" not in r["row"] or "peak_bytes" not in r:
            continue
        noise = " + SR noise" if r["noise_bytes"] else ""
        bound = r["param_bytes"] + r["state_bytes"] + r["activation_bytes"]
        bound = (bound + r["largest_grad_bytes"] + r["noise_bytes"]) * (1 + TARGET_SLACK)
        verdict = "PASS" if r["peak_bytes"] <= bound else "FAIL"
        verdicts.append(
            f"{r['row']}: peak {_mib(r['peak_bytes'])} MiB <= (params + state + activations + "
            f"largest gradient{noise}) x 1.1 = {_mib(bound)} MiB: {verdict}"
        )
        floor = _floor_of(r, by)
        if floor is not None:
            bound = (floor["peak_bytes"] + r["state_bytes"] + r["noise_bytes"]) * (1 + TARGET_SLACK)
            verdict = "PASS" if r["peak_bytes"] <= bound else "FAIL"
            verdicts.append(
                f"{r['row']}: peak {_mib(r['peak_bytes'])} MiB <= (floor "
                f"{_mib(floor['peak_bytes'])} MiB + state{noise}) x 1.1 = {_mib(bound)} MiB: "
                f"{verdict}"
            )
    if verdicts:
        lines += ["", *verdicts]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--layers", type=int, default=12, help="Transformer blocks (default 12)")
    parser.add_argument("--d-model", type=int, default=768, help="width (default 768)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary (default 50257)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (default 2)")
    parser.add_argument(
        "--untie",
        action="store_true",
        help="a softmax matrix of its own instead of GPT-2's tied one (autograd sums the two "
        "gradients of a tied matrix out of place: 3 of them exist for a moment)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_memory.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    base = {k: getattr(args, k) for k in ("layers", "d_model", "heads", "vocab", "batch", "seq")}
    base |= {"steps": args.steps, "threads": args.threads, "device": args.device}
    base["untie"] = args.untie
    results: list[dict[str, Any]] = []
    for row in args.rows:
        if "kahan" in row and not _kahan_available():
            results.append({"row": row, "note": "n/a: Adafactor has no kahan_summation yet"})
            continue
        print(f"  {row}: {ROWS[row]}", file=sys.stderr, flush=True)
        out = _spawn({**base, "row": row})
        results.append(out if out is not None else {"row": row, "note": "failed"})
    table = markdown(results, args)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"config": base, "rows": results}, indent=2))
        args.output.with_suffix(".md").write_text(table)
    return 0 if all("peak_bytes" in r or "n/a" in r.get("note", "") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
