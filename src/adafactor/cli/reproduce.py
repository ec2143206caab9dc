"""``adafactor reproduce``: the paper's Table 2 ablation at small scale.

Each row is one Adafactor configuration (beta1, the second-moment decay, factoring, update
clipping, relative or absolute step), trained with and without learning-rate warmup on the
demo's model and data. The paper's step-size schedules span 100k steps with a 10k-step warmup;
here time is rescaled so that a run of N steps follows the same curves: s(t) = s_paper(t * 1e5 /
N), peak 1e-2. Relative-step rows use rho = s(t), as in the paper. Absolute-step rows use
lr = abs_lr * s(t) / 1e-2: the paper's abs_lr is 1e-3 (Adam's peak in its setup, the full mode's
default); the quick mode uses 1e-2, the best peak for row A (Adam) on its small model, so that
the Adam baseline is tuned and the unstable rows are probed at a learning rate that matters.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from adafactor import Adafactor

from . import INTERRUPTED
from ._data import Corpus, DataError, load_corpus
from ._model import MODEL_SIZES, ModelSize
from ._report import error, fmt_loss, markdown_table, plot_grid, run_record, write_json
from ._train import (
    OptimizerSpec,
    RunResult,
    add_common_arguments,
    make_output_dir,
    positive_float,
    setup_device,
    train_run,
)

__all__ = ["ROWS", "Row", "add_arguments", "paper_schedule", "run"]

PAPER_STEPS = 100_000
MATCH = 0.03  # two final validation losses within 3% "match"; more than 3% worse is "worse"
PAPER_PEAK = 1e-2  # the peak of the paper's s_t
FULL: dict[str, Any] = {"steps": 1500, "model_size": "base", "abs_lr": 1e-3}
# abs_lr 1e-2: row A's best of {1e-3, 3e-3, 1e-2, 3e-2} at 600 steps (docs/reproduce.md).
QUICK: dict[str, Any] = {"steps": 600, "model_size": "small", "abs_lr": 1e-2}


@dataclass(frozen=True)
class Row:
    """One configuration of Table 2, in the paper's terms."""

    key: str
    beta1: float
    beta2: float | None  # fixed (with Adam's bias correction) or None: 1 - t^-0.8
    factored: bool
    clip: float | None  # update clipping threshold d
    relative: bool  # relative step rho_t (with parameter scale) or absolute step alpha_t

    def describe(self) -> list[str]:
        return [
            self.key,
            f"{self.beta1:g}",
            f"{self.beta2:g}" if self.beta2 is not None else "1-t^-0.8",
            "yes" if self.factored else "no",
            f"{self.clip:g}" if self.clip is not None else "off",
            "relative" if self.relative else "absolute",
        ]

    def label(self) -> str:
        _, beta1, beta2, factored, clip, step = self.describe()
        full = "factored" if factored == "yes" else "full V"
        return f"{self.key}: beta1 {beta1}, beta2 {beta2}, {full}, clip {clip}, {step} step"


ROWS = [
    Row("A", 0.9, 0.999, False, None, False),  # Adam (T2T afx_mimic_adam)
    Row("B", 0.9, 0.999, True, None, False),
    Row("C", 0.0, 0.999, False, None, False),  # afx_base
    Row("D", 0.0, 0.999, True, None, False),
    Row("E", 0.0, 0.999, False, 1.0, False),  # afx_clip
    Row("F", 0.0, None, False, None, False),  # afx_pow08
    Row("G", 0.0, None, True, None, False),
    Row("H", 0.0, None, False, 1.0, False),  # afx_pow08_clip
    Row("I", 0.0, None, True, 1.0, False),  # Adafactor with an absolute step
    Row("J", 0.0, None, True, 1.0, True),  # Adafactor (afx_adafactor)
]
_BY_KEY = {row.key: row for row in ROWS}
COLUMNS = ("warmup", "no warmup")


def paper_schedule(steps: int, warmup: bool) -> Callable[[int], float]:
    """The paper's s_t, min(1e-6 t, 1/sqrt t) or min(1e-2, 1/sqrt t), squeezed into ``steps``."""
    scale = PAPER_STEPS / steps

    def schedule(index: int) -> float:  # Adafactor passes the 0-based update index
        t = (index + 1) * scale
        return min(1e-6 * t if warmup else 1e-2, t**-0.5)

    return schedule


def adafactor_kwargs(
    row: Row, warmup: bool, steps: int, abs_lr: float = FULL["abs_lr"]
) -> dict[str, Any]:
    """The Adafactor options that implement ``row`` in the ``warmup`` column.

    Absolute-step rows follow s(t) scaled to the peak ``abs_lr`` (the paper: 1e-3, 0.1 s_t).
    """
    schedule = paper_schedule(steps, warmup)
    scale = abs_lr / PAPER_PEAK
    return {
        "lr": schedule if row.relative else (lambda index: scale * schedule(index)),
        "relative_step": row.relative,
        "scale_parameter": row.relative,
        "beta1": row.beta1 or None,
        "beta2": row.beta2,
        "beta2_decay": -0.8,
        "factored": row.factored,
        "clip_threshold": row.clip,
    }


def _spec(row: Row, warmup: bool, abs_lr: float) -> OptimizerSpec:
    def build(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
        kwargs = adafactor_kwargs(row, warmup, steps, abs_lr)
        return Adafactor(model.parameters(), **kwargs), None

    return OptimizerSpec(f"{row.key} {'warmup' if warmup else 'no warmup'}", build)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, steps=FULL["steps"], size=FULL["model_size"], output="runs/reproduce"
    )
    # None marks "not given", so --quick can pick its own defaults and explicit options still win.
    parser.set_defaults(steps=None, model_size=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['steps']} steps on the {QUICK['model_size']} model, absolute-step peak "
        f"{QUICK['abs_lr']:g} (minutes on a CPU); explicit --steps / --model-size / --abs-lr "
        "still win",
    )
    parser.add_argument(
        "--abs-lr",
        type=positive_float,
        metavar="LR",
        help=f"peak step size of the absolute-step rows A-I (default {FULL['abs_lr']:g}, the "
        f"paper's; {QUICK['abs_lr']:g} with --quick)",
    )
    parser.add_argument(
        "--rows",
        default="".join(_BY_KEY),
        help="which rows to run, e.g. ACJ (default: all, A-J)",
    )


Results = dict[tuple[str, str], RunResult]


def _stable(result: RunResult) -> bool:
    return not result.diverged and math.isfinite(result.final_val_loss)


def _cell(result: RunResult) -> str:
    if result.diverged:
        return f"diverged (step {result.diverged_at})"
    return fmt_loss(result.final_val_loss)


def _table(rows: list[Row], results: Results) -> str:
    header = ["row", "beta1", "beta2", "factored", "clip d", "step"]
    header += [f"val loss, {column}" for column in COLUMNS]
    body = [
        row.describe()
        + [
            _cell(results[row.key, column]) if (row.key, column) in results else "not run"
            for column in COLUMNS
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def _ratio(results: Results, a: tuple[str, str], b: tuple[str, str]) -> float:
    """val loss of a / val loss of b, inf when a is unstable and b is not."""
    ra, rb = results[a], results[b]
    if not _stable(ra):
        return math.inf if _stable(rb) else 1.0
    return ra.final_val_loss / rb.final_val_loss if _stable(rb) else 0.0


def _finding(claim: str, checks: list[tuple[str, bool]]) -> dict[str, Any]:
    return {
        "claim": claim,
        "agrees": all(ok for _, ok in checks),
        "evidence": [e for e, _ in checks],
    }


def _pair(results: Results, a: tuple[str, str], b: tuple[str, str], want: str) -> tuple[str, bool]:
    ratio = _ratio(results, a, b)
    ok = abs(ratio - 1) <= MATCH if want == "match" else ratio > 1 + MATCH
    return f"{a[0]} {a[1]} / {b[0]} {b[1]} = {ratio:.3f} (want {want})", ok


def findings(results: Results) -> list[dict[str, Any]]:
    """The paper's qualitative findings, each checked against this run's numbers."""
    have = {key for key, _ in results}
    out = []
    factored = [
        _pair(results, (f, c), (u, c), "match")
        for u, f in (("A", "B"), ("C", "D"), ("F", "G"))
        for c in COLUMNS
        if {u, f} <= have
    ]
    if factored:
        out.append(_finding("factored second moments match unfactored ones", factored))
    if {"A", "C"} <= have:
        checks = [
            _pair(results, ("C", "no warmup"), ("C", "warmup"), "worse"),
            _pair(results, ("C", "warmup"), ("A", "warmup"), "match"),
        ]
        out.append(
            _finding("beta1=0 with beta2=0.999 is unstable without warmup, fine with it", checks)
        )
    repairs = [
        _pair(results, (r, "no warmup"), ("A", "no warmup"), "match") for r in "EF" if r in have
    ]
    if repairs and "A" in have:
        out.append(
            _finding(
                "update clipping or the 1-t^-0.8 decay repairs beta1=0 without warmup", repairs
            )
        )
    if {"A", "J"} <= have:
        checks = [_pair(results, ("J", c), ("A", c), "match") for c in COLUMNS]
        out.append(_finding("full Adafactor (row J) matches Adam (row A)", checks))
    return out


def _findings_text(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        lines.append(f"- {'AGREES' if item['agrees'] else 'DISAGREES'}: {item['claim']}")
        lines += [f"  - {evidence}" for evidence in item["evidence"]]
    return "\n".join(lines)


def _parse_rows(text: str) -> list[Row]:
    unknown = sorted(set(text.upper()) - _BY_KEY.keys())
    if unknown or not text:
        raise ValueError(f"--rows {text!r}: unknown row {''.join(unknown)}; use letters of A-J")
    return [row for row in ROWS if row.key in text.upper()]


def _train_all(
    args: argparse.Namespace,
    rows: list[Row],
    size: ModelSize,
    corpus: Corpus,
    steps: int,
    abs_lr: float,
    device: Any,
) -> tuple[Results, bool]:
    """Train every row in both columns; on Ctrl-C, return the finished runs and True."""
    results: Results = {}
    total = len(rows) * len(COLUMNS)
    for row in rows:
        for column in COLUMNS:
            spec = _spec(row, column == "warmup", abs_lr)
            label = f"[{len(results) + 1}/{total}] {spec.name}"
            try:
                results[row.key, column] = train_run(
                    spec, size, corpus, steps=steps, seed=args.seed, device=device, label=label
                )
            except KeyboardInterrupt:
                return results, True
    return results, False


def _run(args: argparse.Namespace, size: ModelSize, steps: int, abs_lr: float) -> int:
    started = time.perf_counter()
    rows = _parse_rows(args.rows)
    device = setup_device(args.device, args.threads)
    corpus = load_corpus(args.data, size.context)
    output = Path(args.output)  # checked when the options were parsed (output_dir)
    make_output_dir(output)
    results, interrupted = _train_all(args, rows, size, corpus, steps, abs_lr, device)
    if interrupted and not results:
        print(
            f"adafactor reproduce: interrupted before any run finished; nothing written to "
            f"{output}",
            file=sys.stderr,
        )
        return INTERRUPTED
    planned = len(rows) * len(COLUMNS)
    rows = [row for row in rows if any((row.key, c) in results for c in COLUMNS)]
    # The findings compare the two columns of a row, so they use complete rows only.
    complete = {k: r for k, r in results.items() if all((k[0], c) in results for c in COLUMNS)}
    table = _table(rows, results)
    checked = findings(complete)
    report = (
        f"{table}\n\nFindings of the paper, checked against this run:\n\n{_findings_text(checked)}"
    )
    if interrupted:
        report = f"interrupted after {len(results)} of {planned} runs (Ctrl-C)\n\n{report}"
    else:
        print(f"\n{report}\n")
    (output / "table.md").write_text(report + "\n")
    panels = [
        (row.label(), [results[row.key, c] for c in COLUMNS if (row.key, c) in results])
        for row in rows
    ]
    title = f"Table 2 ablation, {steps} steps, absolute-step peak {abs_lr:g}"
    plot_grid(panels, output / "loss_curves.png", title)
    payload = {
        "command": "reproduce",
        "config": {
            "steps": steps,
            "model": asdict(size),
            "abs_lr": abs_lr,
            "seed": args.seed,
            "device": str(device),
        },
        "interrupted": interrupted,
        "rows": {
            row.key: {
                "config": asdict(row),
                "runs": {
                    c: run_record(results[row.key, c]) for c in COLUMNS if (row.key, c) in results
                },
            }
            for row in rows
        },
        "findings": checked,
        "total_wall_s": time.perf_counter() - started,
    }
    write_json(output / "results.json", payload)
    if interrupted:
        count = f"{len(results)} finished run{'s' if len(results) > 1 else ''}"
        print(
            f"adafactor reproduce: interrupted: kept results of {count} in {output}",
            file=sys.stderr,
        )
        return INTERRUPTED
    print(f"wrote {output / 'results.json'}, {output / 'table.md'}, {output / 'loss_curves.png'}")
    return 0


def run(args: argparse.Namespace) -> int:
    mode = QUICK if args.quick else FULL
    steps = args.steps or mode["steps"]
    abs_lr = args.abs_lr or mode["abs_lr"]
    try:
        return _run(args, MODEL_SIZES[args.model_size or mode["model_size"]], steps, abs_lr)
    except (DataError, ValueError, ModuleNotFoundError, OSError) as exc:
        return error("reproduce", str(exc))
