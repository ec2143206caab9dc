"""``adafactor reproduce``: the paper's Table 2 ablation at small scale.

Each row is one Adafactor configuration (beta1, the second-moment decay, factoring, update
clipping, relative or absolute step), trained with and without learning-rate warmup on the
demo's model and data. The paper's step-size schedules span 100k steps with a 10k-step warmup;
here time is rescaled so that a run of N steps follows the same curves: s(t) = s_paper(t * 1e5 /
N), peak 1e-2. Relative-step rows use rho = s(t), as in the paper. Absolute-step rows use
lr = abs_lr * s(t) / 1e-2: the paper's abs_lr is 1e-3 (Adam's peak in its setup, the full mode's
default); the quick mode uses 1e-2, the best peak for row A (Adam) on its small model, so that
the Adam baseline is tuned and the unstable rows are probed at a learning rate that matters.

Rows K and L repeat rows I and J (absolute and relative step) on the paper's unscaled-embedding
model (Tensor2Tensor's ``afx_unscale``: embedding standard deviation 1, no ``sqrt(d_model)``
multiplier, untied softmax), the paper's test of the relative step size. Every finding is checked
against the paper point by point: the paper's claim, this run's numbers, a verdict.

``--search`` looks for the paper's instability (beta1 = 0, beta2 = 0.999, no warmup; rows C and
D) over settings where it may appear: larger step sizes, a deeper and a wider model, longer runs,
the paper's own (unrescaled) schedule, unscaled embeddings and bfloat16 parameters. Each setting
trains rows A, C and D (with and without warmup where that matters) and the repairs E, F and H
without warmup, and the report says for each setting whether C/D are worse without warmup and
whether E/F/H repair them. Each finished setting is saved, so a stopped search resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
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

__all__ = [
    "ROWS",
    "SEARCH_RUNS",
    "SETTINGS",
    "Row",
    "Setting",
    "add_arguments",
    "findings",
    "paper_schedule",
    "run",
    "search_verdict",
]

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
    unscaled: bool = False  # the unscaled-embedding model (afx_unscale)

    def describe(self) -> list[str]:
        return [
            self.key,
            f"{self.beta1:g}",
            f"{self.beta2:g}" if self.beta2 is not None else "1-t^-0.8",
            "yes" if self.factored else "no",
            f"{self.clip:g}" if self.clip is not None else "off",
            "relative" if self.relative else "absolute",
            "unscaled" if self.unscaled else "scaled",
        ]

    def label(self) -> str:
        _, beta1, beta2, factored, clip, step, embedding = self.describe()
        full = "factored" if factored == "yes" else "full V"
        label = f"{self.key}: beta1 {beta1}, beta2 {beta2}, {full}, clip {clip}, {step} step"
        return label + (", unscaled emb." if embedding == "unscaled" else "")


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
    Row("K", 0.0, None, True, 1.0, False, unscaled=True),  # I with unscaled embeddings
    Row("L", 0.0, None, True, 1.0, True, unscaled=True),  # J with unscaled embeddings
]
_BY_KEY = {row.key: row for row in ROWS}
COLUMNS = ("warmup", "no warmup")


def paper_schedule(steps: int, warmup: bool, paper_time: bool = False) -> Callable[[int], float]:
    """The paper's s_t, min(1e-6 t, 1/sqrt t) or min(1e-2, 1/sqrt t), squeezed into ``steps``;
    with ``paper_time``, not squeezed: the paper's first ``steps`` steps."""
    scale = 1.0 if paper_time else PAPER_STEPS / steps

    def schedule(index: int) -> float:  # Adafactor passes the 0-based update index
        t = (index + 1) * scale
        return min(1e-6 * t if warmup else 1e-2, t**-0.5)

    return schedule


def adafactor_kwargs(
    row: Row, warmup: bool, steps: int, abs_lr: float = FULL["abs_lr"], paper_time: bool = False
) -> dict[str, Any]:
    """The Adafactor options that implement ``row`` in the ``warmup`` column.

    Absolute-step rows follow s(t) scaled to the peak ``abs_lr`` (the paper: 1e-3, 0.1 s_t).
    """
    schedule = paper_schedule(steps, warmup, paper_time)
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


def _spec(
    row: Row, warmup: bool, abs_lr: float, paper_time: bool = False, **extra: Any
) -> OptimizerSpec:
    def build(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
        kwargs = adafactor_kwargs(row, warmup, steps, abs_lr, paper_time)
        return Adafactor(model.parameters(), **kwargs, **extra), None

    return OptimizerSpec(f"{row.key} {'warmup' if warmup else 'no warmup'}", build)


def _setting_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _SETTING_BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setting {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(_SETTING_BY_NAME)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, steps=FULL["steps"], size=FULL["model_size"], output="runs/reproduce"
    )
    # None marks "not given", so --quick can pick its own defaults and explicit options still win.
    parser.set_defaults(steps=None, model_size=None, output=None)
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
        help=f"peak step size of the absolute-step rows A-I and K (default {FULL['abs_lr']:g}, "
        f"the paper's; {QUICK['abs_lr']:g} with --quick or --search)",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="which rows to run, e.g. ACJ (default: all, A-L; K and L are I and J on the "
        "unscaled-embedding model)",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="instead of the table, search settings for the paper's instability (rows C/D "
        "without warmup) and its repairs (E/F/H), starting from the quick mode's model, length "
        "and step size (--steps, --model-size and --abs-lr move that starting point); output "
        "in runs/reproduce-search by default, resumable",
    )
    parser.add_argument(
        "--settings",
        type=_setting_list,
        metavar="NAMES",
        help="with --search: comma-separated settings to run, in order (default: all of "
        f"{', '.join(_SETTING_BY_NAME)})",
    )


Results = dict[tuple[str, str], RunResult]


def _stable(result: RunResult) -> bool:
    return not result.diverged and math.isfinite(result.final_val_loss)


def _cell(result: RunResult) -> str:
    if result.diverged:
        return f"diverged (step {result.diverged_at})"
    return fmt_loss(result.final_val_loss)


def _table(rows: list[Row], results: Results) -> str:
    header = ["row", "beta1", "beta2", "factored", "clip d", "step", "embedding"]
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


def _name(run: tuple[str, str]) -> str:
    return f"{run[0]} {'w' if run[1] == 'warmup' else 'nw'}"


def _pair(results: Results, a: tuple[str, str], b: tuple[str, str], want: str) -> tuple[str, bool]:
    """One comparison: ``want`` is "match" (within 3%), "worse" (a more than 3% above b) or
    "not worse" (a at most 3% above b)."""
    ratio = _ratio(results, a, b)
    if want == "match":
        ok = abs(ratio - 1) <= MATCH
    elif want == "worse":
        ok = ratio > 1 + MATCH
    else:
        ok = ratio <= 1 + MATCH
    return f"{_name(a)} / {_name(b)} = {ratio:.3f} ({want}: {'yes' if ok else 'no'})", ok


REPRODUCES, PARTLY, NOT_REPRODUCED, NOT_TESTABLE = (
    "reproduces",
    "partly",
    "does not reproduce",
    "not testable",
)
# The paper's claims (Shazeer & Stern 2018, Table 2 and the relative-step experiment), in words.
PAPER_CLAIMS = {
    "factored": "factored second moments train as well as full ones (B vs A, D vs C, G vs F)",
    "instability": "beta1 = 0 with beta2 = 0.999 is unstable without warmup (C, D) and trains "
    "like Adam with warmup",
    "repair": "update clipping (E), the increasing decay 1 - t^-0.8 (F) or both (H) make "
    "beta1 = 0 train without warmup",
    "adam": "full Adafactor (J) trains about as well as Adam (A)",
    "relative": "with unscaled embeddings the absolute step trains much worse (K) and the "
    "relative step is unaffected (L vs J)",
}


def _verdict(checks: list[tuple[str, bool]]) -> str:
    oks = [ok for _, ok in checks]
    return REPRODUCES if all(oks) else PARTLY if any(oks) else NOT_REPRODUCED


def _finding(key: str, verdict: str, checks: list[tuple[str, bool]]) -> dict[str, Any]:
    return {
        "finding": key,
        "claim": PAPER_CLAIMS[key],
        "verdict": verdict,
        "agrees": verdict == REPRODUCES,
        "evidence": [text for text, _ in checks],
    }


def findings(results: Results) -> list[dict[str, Any]]:
    """The paper's findings, each checked against this run's numbers, with a verdict."""
    have = {key for key, _ in results}
    out = []
    factored = [
        _pair(results, (f, c), (u, c), "match")
        for u, f in (("A", "B"), ("C", "D"), ("F", "G"))
        for c in COLUMNS
        if {u, f} <= have
    ]
    if factored:
        out.append(_finding("factored", _verdict(factored), factored))
    # The instability: a row without warmup more than 3% worse than (or diverged, unlike) itself
    # with warmup.
    unstable = [_pair(results, (r, "no warmup"), (r, "warmup"), "worse") for r in "CD" if r in have]
    appears = any(ok for _, ok in unstable)
    if unstable and "A" in have and "C" in have:
        like_adam = _pair(results, ("C", "warmup"), ("A", "warmup"), "match")
        checks = [*unstable, like_adam]
        verdict = (REPRODUCES if like_adam[1] else PARTLY) if appears else NOT_REPRODUCED
        out.append(_finding("instability", verdict, checks))
    repairs = [r for r in "EFH" if r in have]
    if repairs and "C" in have:
        # A repair: without warmup within 3% of (or below) C with warmup, the stable reference.
        checks = [_pair(results, (r, "no warmup"), ("C", "warmup"), "not worse") for r in repairs]
        if appears:
            out.append(_finding("repair", _verdict(checks), checks))
        else:
            checks.insert(0, ("nothing to repair: C/D are not worse without warmup", False))
            out.append(_finding("repair", NOT_TESTABLE, checks))
    if {"A", "J"} <= have:
        checks = [_pair(results, ("J", c), ("A", c), "match") for c in COLUMNS]
        out.append(_finding("adam", _verdict(checks), checks))
    if {"K", "L"} <= have:
        checks = [_pair(results, ("K", c), ("L", c), "worse") for c in COLUMNS]
        if "I" in have:
            checks += [_pair(results, ("K", c), ("I", c), "worse") for c in COLUMNS]
        if "J" in have:
            checks += [_pair(results, ("L", c), ("J", c), "match") for c in COLUMNS]
        out.append(_finding("relative", _verdict(checks), checks))
    return out


def findings_table(items: list[dict[str, Any]]) -> str:
    """The point-by-point comparison with the paper: finding, paper's claim, ours, verdict."""
    body = [
        [
            item["finding"],
            item["claim"],
            "; ".join(item["evidence"]),
            f"**{item['verdict']}**",
        ]
        for item in items
    ]
    return markdown_table(["finding", "the paper", "this run", "verdict"], body)


def _parse_rows(text: str) -> list[Row]:
    unknown = sorted(set(text.upper()) - _BY_KEY.keys())
    if unknown or not text:
        raise ValueError(
            f"--rows {text!r}: unknown row {''.join(unknown)}; use letters of "
            f"{ROWS[0].key}-{ROWS[-1].key}"
        )
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
                    spec,
                    size,
                    corpus,
                    steps=steps,
                    seed=args.seed,
                    device=device,
                    label=label,
                    unscaled_embedding=row.unscaled,
                )
            except KeyboardInterrupt:
                return results, True
    return results, False


def _run(args: argparse.Namespace, size: ModelSize, steps: int, abs_lr: float) -> int:
    started = time.perf_counter()
    rows = _parse_rows(args.rows or "".join(_BY_KEY))
    device = setup_device(args.device, args.threads)
    corpus = load_corpus(args.data, size.context)
    output = Path(args.output or "runs/reproduce")  # checked when parsed (output_dir)
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
        f"{table}\n\nThe paper's findings, point by point, against this run (w: with warmup, "
        f"nw: without; match: within {MATCH:.0%}; worse: more than {MATCH:.0%} above, or "
        "diverged):\n\n"
    )
    report += findings_table(checked) if checked else "(no finding has all its rows)"
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


# --- the search for the instability ------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One place to look for the instability: changes to the quick mode's starting point."""

    name: str
    what: str
    lr_factor: float = 1.0  # times the starting absolute-step peak
    depth_factor: int = 1  # times the starting number of layers
    width_factor: int = 1  # times the starting d_model (and heads, so head width stays)
    length_factor: int = 1  # times the starting number of steps
    paper_time: bool = False  # the paper's schedule unrescaled: no warmup = the peak all along
    unscaled: bool = False  # the unscaled-embedding model
    bf16: bool = False  # bfloat16 parameters, stochastic rounding

    def size(self, start: ModelSize) -> ModelSize:
        return replace(
            start,
            n_layers=start.n_layers * self.depth_factor,
            d_model=start.d_model * self.width_factor,
            n_heads=start.n_heads * self.width_factor,
        )


SETTINGS = (
    Setting("start", "the starting point (the quick mode)"),
    Setting("lr x3", "absolute-step peak x3", lr_factor=3.0),
    Setting("lr x10", "absolute-step peak x10", lr_factor=10.0),
    Setting("unscaled", "unscaled embeddings (afx_unscale)", unscaled=True),
    Setting("bf16", "bfloat16 parameters (stochastic rounding)", bf16=True),
    Setting("deep", "3x the layers", depth_factor=3),
    Setting("wide", "4x d_model (and heads)", width_factor=4),
    Setting("long", "3x the steps, the schedule rescaled to them", length_factor=3),
    Setting(
        "paper time",
        "3x the steps of the paper's schedule, not rescaled (without warmup: the peak all run)",
        length_factor=3,
        paper_time=True,
    ),
    Setting(
        "combined",
        "lr x3, 3x the layers, unscaled embeddings, bfloat16",
        lr_factor=3.0,
        depth_factor=3,
        unscaled=True,
        bf16=True,
    ),
)
_SETTING_BY_NAME = {setting.name: setting for setting in SETTINGS}
# What each setting trains: Adam without warmup, the suspects with and without, the repairs.
SEARCH_RUNS = (
    ("A", "no warmup"),
    ("C", "warmup"),
    ("C", "no warmup"),
    ("D", "warmup"),
    ("D", "no warmup"),
    ("E", "no warmup"),
    ("F", "no warmup"),
    ("H", "no warmup"),
)


def _percent(ratio: float) -> str:
    return "diverged" if math.isinf(ratio) else f"{100 * (ratio - 1):+.1f}%"


def search_verdict(results: Results) -> dict[str, Any]:
    """Whether C/D are worse without warmup than with it (more than 3%, or diverged) and, where
    they are, which of E/F/H (without warmup) end within 3% of C with warmup."""
    worse = {
        r: _ratio(results, (r, "no warmup"), (r, "warmup"))
        for r in "CD"
        if {(r, "no warmup"), (r, "warmup")} <= results.keys()
    }
    unstable = [r for r, ratio in worse.items() if ratio > 1 + MATCH]
    diverged = [r for r in "CD" if (r, "no warmup") in results and results[r, "no warmup"].diverged]
    repair = {
        r: _ratio(results, (r, "no warmup"), ("C", "warmup"))
        for r in "EFH"
        if {(r, "no warmup"), ("C", "warmup")} <= results.keys()
    }
    vs_adam = {
        r: _ratio(results, (r, "no warmup"), ("A", "no warmup"))
        for r in "CDEFH"
        if {(r, "no warmup"), ("A", "no warmup")} <= results.keys()
    }
    if diverged:
        instability = f"diverged: {', '.join(diverged)}"
    elif unstable:
        instability = "worse: " + ", ".join(f"{r} {_percent(worse[r])}" for r in unstable)
    else:
        instability = "no: " + ", ".join(f"{r} {_percent(ratio)}" for r, ratio in worse.items())
    if unstable:
        repaired = [r for r, ratio in repair.items() if ratio <= 1 + MATCH]
        repairs = ", ".join(
            f"{r} {'yes' if r in repaired else 'no'} ({_percent(ratio)})"
            for r, ratio in repair.items()
        )
    else:
        repaired, repairs = [], "nothing to repair"
    return {
        "unstable": unstable,
        "diverged": diverged,
        "repaired_by": repaired,
        "no_warmup_vs_warmup": worse,
        "repair_vs_c_warmup": repair,
        "no_warmup_vs_adam": vs_adam,
        "instability": instability,
        "repairs": repairs,
    }


def _setting_config(
    setting: Setting, start: ModelSize, steps: int, abs_lr: float, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "setting": asdict(setting),
        "model": asdict(setting.size(start)),
        "steps": steps * setting.length_factor,
        "abs_lr": abs_lr * setting.lr_factor,
        "seed": args.seed,
        "device": args.device,
        "data": args.data,
        "runs": [list(run) for run in SEARCH_RUNS],
    }


def _run_setting(
    setting: Setting,
    config: dict[str, Any],
    corpus: Corpus,
    device: Any,
    seed: int,
    index: str,
) -> Results:
    size = ModelSize(**config["model"])
    extra = {"stochastic_rounding": True} if setting.bf16 else {}
    results: Results = {}
    for n, (key, column) in enumerate(SEARCH_RUNS, start=1):
        spec = _spec(
            _BY_KEY[key], column == "warmup", config["abs_lr"], setting.paper_time, **extra
        )
        results[key, column] = train_run(
            spec,
            size,
            corpus,
            steps=config["steps"],
            seed=seed,
            device=device,
            label=f"{index} {setting.name}: [{n}/{len(SEARCH_RUNS)}] {spec.name}",
            unscaled_embedding=setting.unscaled,
            param_dtype=torch.bfloat16 if setting.bf16 else None,
        )
    return results


def _load_setting(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A finished setting saved by an earlier search with the same configuration, or None."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if saved.get("config") == config else None


def _search_row(name: str, record: dict[str, Any]) -> list[str]:
    runs = record["runs"]
    config = record["config"]
    model = config["model"]
    cells = [
        name,
        f"d {model['d_model']}, {model['n_layers']} layer{'s' * (model['n_layers'] != 1)}, "
        f"{config['steps']} steps, "
        f"abs lr {config['abs_lr']:g}",
    ]
    for key, column in SEARCH_RUNS:
        run = runs[f"{key} {column}"]
        if run["diverged"]:
            cells.append(f"diverged (step {run['diverged_at']})")
        else:
            cells.append(
                fmt_loss(run["final_val_loss"] if run["final_val_loss"] is not None else math.nan)
            )
    verdict = record["verdict"]
    cells += [verdict["instability"], verdict["repairs"], f"{record['wall_s']:.0f}"]
    return cells


def search_table(records: dict[str, dict[str, Any]]) -> str:
    header = ["setting", "model, steps, step size"]
    header += [f"{key} {'nw' if column == 'no warmup' else 'w'}" for key, column in SEARCH_RUNS]
    header += ["C/D worse without warmup?", "repaired (E/F/H nw vs C w)?", "wall s"]
    return markdown_table(header, [_search_row(name, r) for name, r in records.items()])


def _search(args: argparse.Namespace, start: ModelSize, steps: int, abs_lr: float) -> int:
    started = time.perf_counter()
    device = setup_device(args.device, args.threads)
    corpus = load_corpus(args.data, start.context)
    output = Path(args.output or "runs/reproduce-search")  # checked when parsed (output_dir)
    make_output_dir(output)
    names = args.settings or list(_SETTING_BY_NAME)
    records: dict[str, dict[str, Any]] = {}
    interrupted = False
    for number, name in enumerate(names, start=1):
        setting = _SETTING_BY_NAME[name]
        config = _setting_config(setting, start, steps, abs_lr, args)
        path = output / "settings" / f"{name.replace(' ', '_')}.json"
        saved = _load_setting(path, config)
        if saved is not None:
            print(f"[{number}/{len(names)}] {name}: finished earlier, read from {path}", flush=True)
            records[name] = saved
            continue
        tick = time.perf_counter()
        try:
            results = _run_setting(
                setting, config, corpus, device, args.seed, f"[{number}/{len(names)}]"
            )
        except KeyboardInterrupt:
            interrupted = True
            break
        records[name] = {
            "config": config,
            "runs": {f"{k} {c}": run_record(r) for (k, c), r in results.items()},
            "verdict": search_verdict(results),
            "wall_s": time.perf_counter() - tick,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, records[name])
    if interrupted and not records:
        print(
            "adafactor reproduce: interrupted before any setting finished; nothing written to "
            f"{output}",
            file=sys.stderr,
        )
        return INTERRUPTED
    found = [name for name, r in records.items() if r["verdict"]["unstable"]]
    summary = (
        f"instability (C/D more than {MATCH:.0%} worse without warmup, or diverged) in "
        f"{len(found)} of {len(records)} settings: {', '.join(found) or 'none'}"
    )
    legend = "\n".join(f"- {name}: {_SETTING_BY_NAME[name].what}" for name in records)
    columns = (
        "Columns: final validation loss of each row, w with warmup, nw without; the verdicts "
        f"compare without and with warmup (worse: more than {MATCH:.0%} above, or diverged) and "
        f"E/F/H without warmup with C with warmup (a repair: at most {MATCH:.0%} above)."
    )
    report = f"{search_table(records)}\n\n{columns}\n\n{legend}\n\n{summary}"
    if interrupted:
        report = f"interrupted after {len(records)} of {len(names)} settings (Ctrl-C)\n\n{report}"
    else:
        print(f"\n{report}\n")
    (output / "table.md").write_text(report + "\n")
    write_json(
        output / "results.json",
        {
            "command": "reproduce --search",
            "interrupted": interrupted,
            "settings": records,
            "found": found,
            "total_wall_s": time.perf_counter() - started,
        },
    )
    if interrupted:
        count = f"{len(records)} finished setting{'s' if len(records) > 1 else ''}"
        print(
            f"adafactor reproduce: interrupted: kept results of {count} in {output}",
            file=sys.stderr,
        )
        return INTERRUPTED
    print(f"wrote {output / 'results.json'}, {output / 'table.md'}")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    if args.search and args.rows is not None:
        raise ValueError(
            "--rows does not apply to --search, which trains rows "
            f"{', '.join(sorted({key for key, _ in SEARCH_RUNS}))}; drop --rows or --search"
        )
    if args.settings is not None and not args.search:
        raise ValueError("--settings chooses the settings of --search; add --search")


def run(args: argparse.Namespace) -> int:
    mode = QUICK if args.quick or args.search else FULL
    steps = args.steps or mode["steps"]
    abs_lr = args.abs_lr or mode["abs_lr"]
    size = MODEL_SIZES[args.model_size or mode["model_size"]]
    try:
        _check_options(args)
        if args.search:
            return _search(args, size, steps, abs_lr)
        return _run(args, size, steps, abs_lr)
    except (DataError, ValueError, ModuleNotFoundError, OSError) as exc:
        return error("reproduce", str(exc))
