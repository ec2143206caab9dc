"""The training loop both subcommands share, their common options, and run measurements."""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._data import Corpus, train_batches, val_batches
from ._model import MODEL_SIZES, ByteTransformer, ModelSize

__all__ = [
    "OptimizerSpec",
    "RunResult",
    "add_common_arguments",
    "positive_float",
    "positive_int",
    "setup_device",
    "train_run",
]

Batch = tuple[Tensor, Tensor]
DIVERGENCE_FACTOR = 1.5  # a loss this many times the first step's loss counts as diverged
_EVAL_WINDOWS = 128  # windows in the fixed validation (and train-evaluation) set
_CURVE_POINTS = 10  # validation evaluations along each run


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that names the value and the fix."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_common_arguments(
    parser: argparse.ArgumentParser, *, steps: int, size: str, output: str
) -> None:
    """Options shared by ``demo`` and ``reproduce``; the defaults differ per subcommand."""
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=steps,
        help=f"training steps per run (default {steps})",
    )
    parser.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default=size,
        help=f"model and batch shape (default {size})",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="a text file or a folder of text files (default: this Python's stdlib sources)",
    )
    parser.add_argument(
        "--output", metavar="DIR", default=output, help=f"results folder (default {output})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="model initialisation and batch order seed"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads for torch (default 2)"
    )


def setup_device(name: str, threads: int) -> torch.device:
    """Parse ``--device`` and check that it exists; raises ValueError with the fix."""
    torch.set_num_threads(threads)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one run's optimizer (and its schedule) for a fresh model."""

    name: str
    build: Callable[[nn.Module, int], tuple[Optimizer, LRScheduler | None]]
    grad_clip_norm: float | None = None


@dataclass
class RunResult:
    name: str
    train_curve: list[float] = field(default_factory=list)  # loss of every step taken
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    final_train_loss: float = math.nan  # on a fixed set of training windows
    final_val_loss: float = math.nan
    diverged_at: int | None = None  # 1-based step where divergence was detected
    step_time_s: float = math.nan  # median
    tokens_per_s: float = math.nan
    state_bytes: int = 0
    param_count: int = 0
    peak_memory_bytes: int = 0
    wall_s: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def val_bits_per_byte(self) -> float:
        return self.final_val_loss / math.log(2)


def _state_bytes(optimizer: Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak covers the whole process so far


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@torch.no_grad()
def _evaluate(model: ByteTransformer, batches: list[Batch], device: torch.device) -> float:
    model.eval()
    total = sum(model.loss(x.to(device), y.to(device)).item() * len(x) for x, y in batches)
    model.train()
    return total / sum(len(x) for x, _ in batches)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; training works without it
        return None
    # disable=None hides the bar when stderr is not a terminal (logs, tests).
    return tqdm(total=total, desc=desc, unit="step", disable=None if enabled else True)


def train_run(
    spec: OptimizerSpec,
    size: ModelSize,
    corpus: Corpus,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> RunResult:
    """Train a fresh model (same seed, same batches for every spec) and measure the run."""
    torch.manual_seed(seed)
    model = ByteTransformer(size).to(device)
    optimizer, scheduler = spec.build(model, steps)
    batches = train_batches(corpus, steps, size.batch_size, size.context, seed)
    val = val_batches(corpus, _EVAL_WINDOWS, size.batch_size, size.context)
    # Random training windows, scored like the validation set so the two losses compare.
    train_eval = train_batches(
        corpus, _EVAL_WINDOWS // size.batch_size, size.batch_size, size.context, seed + 1
    )
    eval_every = max(1, steps // _CURVE_POINTS)
    result = RunResult(name=spec.name, param_count=sum(p.numel() for p in model.parameters()))
    times: list[float] = []
    bar = _progress(steps, spec.name, progress)
    _reset_peak_memory(device)
    start = time.perf_counter()
    result.val_curve.append((0, _evaluate(model, val, device)))
    for step, (x, y) in enumerate(batches, start=1):
        tick = time.perf_counter()
        loss = model.loss(x.to(device), y.to(device))
        loss.backward()
        if spec.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        value = loss.item()  # the host sync: step time includes the whole step
        times.append(time.perf_counter() - tick)
        result.train_curve.append(value)
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * result.train_curve[0]:
            result.diverged_at = step
            break
        if step % eval_every == 0 or step == steps:
            result.val_curve.append((step, _evaluate(model, val, device)))
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{x.numel() / times[-1]:.0f}")
    if bar is not None:
        bar.close()
    result.wall_s = time.perf_counter() - start
    result.peak_memory_bytes = _peak_memory(device)
    result.state_bytes = _state_bytes(optimizer)
    result.step_time_s = statistics.median(times)
    result.tokens_per_s = size.batch_size * size.context / result.step_time_s
    result.final_val_loss = _evaluate(model, val, device)
    result.final_train_loss = _evaluate(model, train_eval, device)
    return result
