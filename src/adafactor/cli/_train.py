"""The training loop both subcommands share, their common options, and run measurements."""

from __future__ import annotations

import argparse
import math
import os
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
    "make_output_dir",
    "output_dir",
    "output_file",
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


def _existing_ancestor(text: str, path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    while True:
        try:
            if path.exists() or path.parent == path:
                return path
        except OSError as exc:  # e.g. a folder on the way without search permission
            raise argparse.ArgumentTypeError(
                f"{text}: cannot look at {path} ({exc.strerror or exc}); pass a folder you can "
                "write to"
            ) from None
        path = path.parent


def _check_creatable(text: str, base: Path) -> None:
    """Raise ArgumentTypeError unless the existing ``base`` is a folder we can write to."""
    if not base.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: {base} is a file, so no folder can be created under it; pass a path "
            "outside it"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"{text}: {base} is not writable; pass a folder you can write to"
        )


def output_dir(text: str) -> Path:
    """argparse type: a results folder that exists or can be created, and is writable.

    Checked when the options are parsed, so a bad path stops the command before any work.
    """
    if not text:
        raise argparse.ArgumentTypeError("is empty; pass a folder, e.g. runs/demo")
    path = Path(text).expanduser()
    base = _existing_ancestor(text, path)
    if base == path and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file, not a folder; pass a folder (it is created if missing)"
        )
    _check_creatable(text, base)
    return path


def output_file(text: str) -> Path:
    """argparse type: a .json or .csv file whose folder exists or can be created."""
    path = Path(text).expanduser()
    base = _existing_ancestor(text, path)
    if base == path and path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder; pass a file name such as {path / 'bench.json'}"
        )
    if path.suffix not in (".json", ".csv"):
        raise argparse.ArgumentTypeError(
            f"{text}: pass a .json or .csv file name (the markdown table is written beside it, "
            "with the suffix .md)"
        )
    _check_creatable(text, base if base != path else path.parent)
    return path


def make_output_dir(path: Path) -> None:
    """Create the results folder; raises ValueError naming --output if that fails after all."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"--output {path}: cannot create the folder ({exc.strerror or exc}); pass another "
            "folder"
        ) from None


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
        "--output",
        type=output_dir,
        metavar="DIR",
        default=output,
        help=f"results folder, created if missing (default {output})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="model initialisation and batch order seed (default 0)"
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


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _interactive() -> bool:
    """Whether someone watches both streams: then a live bar, else progress lines."""
    return _is_terminal(sys.stdout) and _is_terminal(sys.stderr)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


class _Progress:
    """A tqdm bar (on stderr) when the session is interactive; otherwise, as in CI logs or
    behind ``| tee``, one line on stdout about every 10% of the run, since a bar is invisible
    or unreadable there."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label = total, label
        self.bar: Any = None
        self.lines = False
        self.start = time.perf_counter()
        if not enabled:
            return
        if _interactive():
            try:
                from tqdm import tqdm
            except ImportError:  # checked by the command; without it, lines will do
                pass
            else:
                self.bar = tqdm(total=total, desc=label, unit="step")
                return
        self.lines = True

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
        elif self.lines and 10 * step // self.total > 10 * (step - 1) // self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total - step)
            print(
                f"{self.label}: step {step}/{self.total} ({100 * step // self.total}%), "
                f"loss {loss:.4f}, elapsed {_duration(elapsed)}, ETA {_duration(eta)}",
                flush=True,
            )

    def diverged(self, step: int, loss: float) -> None:
        if self.lines:
            print(f"{self.label}: diverged at step {step} (loss {loss:.4g}); stopped", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_run(
    spec: OptimizerSpec,
    size: ModelSize,
    corpus: Corpus,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    label: str | None = None,
    unscaled_embedding: bool = False,
    param_dtype: torch.dtype | None = None,
) -> RunResult:
    """Train a fresh model (same seed, same batches for every spec) and measure the run.

    ``label`` names the run in its progress bar or lines (default: the spec's name).
    ``unscaled_embedding`` builds the paper's unscaled-embedding model (see ``ByteTransformer``);
    ``param_dtype`` (e.g. ``torch.bfloat16``) casts the model's parameters after initialisation.
    """
    torch.manual_seed(seed)
    model = ByteTransformer(size, unscaled_embedding=unscaled_embedding)
    model = model.to(device=device, dtype=param_dtype)
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
    _reset_peak_memory(device)
    start = time.perf_counter()
    progress_report = _Progress(steps, label or spec.name, progress)
    try:  # a Ctrl-C (KeyboardInterrupt) still closes the bar, leaving the terminal tidy
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
                progress_report.diverged(step, value)
                break
            if step % eval_every == 0 or step == steps:
                result.val_curve.append((step, _evaluate(model, val, device)))
            progress_report.update(step, value, x.numel() / times[-1])
    finally:
        progress_report.close()
    result.wall_s = time.perf_counter() - start
    result.peak_memory_bytes = _peak_memory(device)
    result.state_bytes = _state_bytes(optimizer)
    result.step_time_s = statistics.median(times)
    result.tokens_per_s = size.batch_size * size.context / result.step_time_s
    result.final_val_loss = _evaluate(model, val, device)
    result.final_train_loss = _evaluate(model, train_eval, device)
    return result
