"""Tables, JSON and loss-curve plots of training runs."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ._train import RunResult

__all__ = [
    "error",
    "fmt_loss",
    "markdown_table",
    "plot_curves",
    "plot_grid",
    "run_record",
    "write_json",
]


def error(command: str, message: str) -> int:
    """Print a command-line error the way argparse does and return its exit status."""
    print(f"adafactor {command}: error: {message}", file=sys.stderr)
    return 2


def fmt_loss(value: float) -> str:
    """A loss as the tables print it (and as the tests read it back)."""
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def fmt_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity; a diverged run's losses become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def run_record(result: RunResult) -> dict[str, Any]:
    """Everything measured in one run, for the JSON file."""
    record = asdict(result)
    record["diverged"] = result.diverged
    record["val_bits_per_byte"] = result.val_bits_per_byte
    return record


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(_finite_or_none(payload), indent=2) + "\n")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError(
            "matplotlib is needed for the loss-curve plots: pip install 'adafactor[cli]'"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _draw(axes: Any, result: RunResult, label: str, color: str) -> None:
    window = max(1, len(result.train_curve) // 25)
    steps = range(1, len(result.train_curve) + 1)
    axes.plot(steps, _smooth(result.train_curve, window), color=color, alpha=0.45, lw=1)
    val_steps, val_losses = zip(*result.val_curve)
    axes.plot(val_steps, val_losses, "o-", color=color, ms=3, lw=1.5, label=label)
    if result.diverged_at is not None:
        axes.axvline(result.diverged_at, color=color, ls=":", lw=1)


def _loss_range(results: Sequence[RunResult]) -> tuple[float, float] | None:
    """y-axis limits from the finite validation losses after step 0 (all of them if none).

    The untrained model's loss (12 nats at d_model 512, with the tied embedding predicting the
    input byte) and a diverged run would otherwise squash every curve into the bottom edge.
    """
    later = [v for r in results for s, v in r.val_curve if s > 0 and math.isfinite(v)]
    finite = later or [v for r in results for _, v in r.val_curve if math.isfinite(v)]
    return (min(finite) * 0.95, max(finite) * 1.05) if finite else None


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    """One plot: faint smoothed training loss and marked validation loss of every run."""
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(7, 4.5))
    for i, result in enumerate(results):
        _draw(axes, result, f"{result.name} (val)", f"C{i}")
    limits = _loss_range(results)
    if limits is not None:
        axes.set_ylim(*limits)
    axes.set(xlabel="step", ylabel="loss (nats/byte)", title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(panels: Sequence[tuple[str, Sequence[RunResult]]], path: Path, title: str) -> None:
    """A grid of small plots, one per (title, runs) panel, sharing the loss axis."""
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharey=True, squeeze=False)
    for axes, (panel_title, results) in zip(grid.flat, panels):
        for i, result in enumerate(results):
            _draw(axes, result, result.name, f"C{i}")
        axes.set_title(panel_title, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    for axes in grid.flat[len(panels) :]:
        axes.axis("off")
    limits = _loss_range([r for _, rs in panels for r in rs])
    if limits is not None:  # a diverged run must not squash the other curves
        grid[0][0].set_ylim(*limits)
    fig.suptitle(title)
    fig.supxlabel("step")
    fig.supylabel("loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
