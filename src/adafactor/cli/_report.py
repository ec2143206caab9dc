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
    "curves_figure",
    "error",
    "fmt_loss",
    "grid_figure",
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


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure outside pyplot: no display, no global state, files only."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            "matplotlib is needed for the loss-curve plots: pip install 'adafactor[cli]'"
        ) from None
    return Figure(**kwargs)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _train_points(result: RunResult) -> tuple[list[int], list[float]]:
    """The smoothed training loss against the step it was measured at.

    ``train_curve[i]`` is the loss of the batch of update i + 1, computed before that update,
    so it belongs to step i, where the validation loss after i updates sits.
    """
    window = max(1, len(result.train_curve) // 25)
    return list(range(len(result.train_curve))), _smooth(result.train_curve, window)


def _draw(axes: Any, result: RunResult, color: str) -> None:
    """A run's faint training curve, its marked validation curve and its divergence, each
    labelled for the legend."""
    steps, losses = _train_points(result)
    axes.plot(steps, losses, color=color, alpha=0.45, lw=1, label=f"{result.name} train (smoothed)")
    val_steps, val_losses = zip(*result.val_curve)
    axes.plot(
        val_steps, val_losses, "o-", color=color, ms=3, lw=1.5, label=f"{result.name} validation"
    )
    if result.diverged_at is not None:
        axes.axvline(
            result.diverged_at,
            color=color,
            ls=":",
            lw=1,
            label=f"{result.name} diverged at step {result.diverged_at}",
        )


def _positive(values: Any) -> list[float]:
    return [v for v in values if math.isfinite(v) and v > 0]


def _loss_range(results: Sequence[RunResult], first: int = 0) -> tuple[float, float] | None:
    """y-limits holding every validation loss from step ``first`` on (the untrained model's at
    step 0 included by default) and the smoothed training loss below them.

    Training losses above the highest validation loss (a diverging run's last steps) are left
    out, so that a divergence cannot squash the other curves; its vertical line marks it.
    """
    val = _positive(v for r in results for s, v in r.val_curve if s >= first)
    if not val:
        return None
    top = max(val)
    if first == 0:  # the first training point is the untrained model too
        top = max([top, *_positive(r.train_curve[0] for r in results if r.train_curve)])
    train = _positive(
        v for r in results for s, v in zip(*_train_points(r)) if s >= first and v <= top
    )
    return min(val + train) * 0.95, top * 1.08


def _log_loss_axis(axes: Any) -> None:
    """Log-scaled loss axis with plain-number ticks (1.5, 2, 3, ... rather than 2x10^0)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)))
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def curves_figure(results: Sequence[RunResult], title: str) -> Any:
    """The demo's plot: every run's training and validation loss over the whole run from step 0
    (log scale, so the untrained model's loss fits beside the trained one's), and beside it the
    last 80% of the run on a linear scale, where the optimizers' final losses differ."""
    fig = _figure(figsize=(11, 4.5))
    full, zoom = fig.subplots(1, 2)
    steps = max([1, *(s for r in results for s, _ in r.val_curve)])
    for i, result in enumerate(results):
        for axes in (full, zoom):
            _draw(axes, result, f"C{i}")
    _log_loss_axis(full)
    limits = _loss_range(results)
    if limits is not None:
        full.set_ylim(*limits)
    full.set(xlabel="step", ylabel="loss (nats/byte, log scale)", title="whole run, from step 0")
    first = round(0.2 * steps)
    zoom.set_xlim(first - 0.02 * steps, steps * 1.02)
    limits = _loss_range(results, first=first)
    if limits is not None:
        zoom.set_ylim(*limits)
    zoom.set(xlabel="step", ylabel="loss (nats/byte)", title=f"from step {first}")
    zoom.legend(fontsize=8)
    for axes in (full, zoom):
        axes.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Write :func:`curves_figure` as a PNG."""
    curves_figure(results, title).savefig(path, dpi=110)


def grid_figure(panels: Sequence[tuple[str, Sequence[RunResult]]], title: str) -> Any:
    """A grid of small plots, one per (title, runs) panel, sharing the log-scaled loss axis;
    every panel starts at step 0 and has its own legend."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(figsize=(4 * cols, 3.2 * rows))
    grid = fig.subplots(rows, cols, sharey=True, squeeze=False)
    for axes, (panel_title, results) in zip(grid.flat, panels):
        for i, result in enumerate(results):
            _draw(axes, result, f"C{i}")
        axes.set_title(panel_title, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6)
    for axes in grid.flat[len(panels) :]:
        axes.axis("off")
    _log_loss_axis(grid[0][0])
    limits = _loss_range([r for _, rs in panels for r in rs])
    if limits is not None:  # a diverged run must not squash the other curves
        grid[0][0].set_ylim(*limits)
    fig.suptitle(title)
    fig.supxlabel("step")
    fig.supylabel("loss (nats/byte, log scale)")
    fig.tight_layout()
    return fig


def plot_grid(panels: Sequence[tuple[str, Sequence[RunResult]]], path: Path, title: str) -> None:
    """Write :func:`grid_figure` as a PNG."""
    grid_figure(panels, title).savefig(path, dpi=100)
