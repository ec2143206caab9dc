"""``adafactor quality``: a resumable training-quality sweep of Adafactor configurations.

The demo's byte-level Transformer is trained at several run lengths and seeds for each of

- ``paper``: ``Adafactor(preset="paper")``, nothing tuned, no schedule;
- ``relative_schedule``: the paper's relative step with AdamW's warmup + cosine schedule applied
  to ``lr``, the cap of the relative step: rho_t = min(1e-2 * m_t, 1/sqrt t);
- ``absolute_schedule``: absolute steps (``relative_step=False, scale_parameter=False``): each
  element moves by lr * m_t * (clipped normalised update), AdamW's own peak lr (the best of its
  sweep at that length) and schedule;
- ``momentum_fp32`` and ``momentum_bf16``: the better of the two schedules (at that length, on
  the tuning seed) with beta1 = 0.9, its first moment in float32 or bfloat16;
- ``adamw``: AdamW as the demo trains it, its peak lr the best of a small sweep (run on the
  tuning seed at each length and reused for the other seeds).

Every (configuration, length, seed) cell is one training run written to its own JSON file as soon
as it finishes, so the sweep can be stopped at any time (Ctrl-C, ``--stop-after``, a kill) and
resumed by running the same command again: finished cells are skipped. The report (``report.md``,
``summary.json`` and ``ratio_vs_length.png``) is built from whatever cells exist and lists the
missing ones, with an estimate of the time they need from the measured step times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from adafactor import Adafactor

from . import INTERRUPTED
from ._data import Corpus, DataError, load_corpus
from ._model import MODEL_SIZES, ModelSize
from ._report import error, fmt_bytes, markdown_table, write_json
from ._train import (
    OptimizerSpec,
    make_output_dir,
    output_dir,
    positive_float,
    positive_int,
    setup_device,
    train_run,
)

__all__ = ["CONFIGS", "add_arguments", "build_report", "optimizer_spec", "plan_cells", "run"]

DEFAULT_LENGTHS = (600, 1500, 3000)
DEFAULT_SEEDS = (0, 1)
DEFAULT_ADAMW_LRS = (5e-4, 1e-3, 2e-3)  # around the demo's 1e-3, a factor of 2 apart
PAPER_LR = 1e-2  # the paper's cap of the relative step
MOMENTUM = 0.9

CONFIGS = (
    "paper",
    "relative_schedule",
    "absolute_schedule",
    "momentum_fp32",
    "momentum_bf16",
    "adamw",
)
DESCRIPTIONS = {
    "paper": "(a) preset='paper': rho_t = min(1e-2, 1/sqrt t), no schedule, no momentum",
    "relative_schedule": "(b) relative step, AdamW's warmup + cosine on the cap lr = 1e-2",
    "absolute_schedule": "(c) absolute step (relative_step=False, scale_parameter=False), "
    "AdamW's tuned peak lr and schedule",
    "momentum_fp32": "(d) best of (b)/(c) + beta1 = 0.9, float32 momentum",
    "momentum_bf16": "(e) best of (b)/(c) + beta1 = 0.9, bfloat16 momentum",
    "adamw": "(f) AdamW, peak lr tuned per length on the tuning seed, warmup + cosine",
}


# --- the optimizers ------------------------------------------------------------------------------


def adamw_schedule(step: int, steps: int) -> float:
    """The demo's multiplier of the peak lr at 0-based ``step``: 5% warmup, cosine to 10%."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _scheduled(optimizer: Optimizer, steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: adamw_schedule(step, steps))


def _adafactor_kwargs(schedule: str, absolute_lr: float | None) -> dict[str, Any]:
    if schedule == "relative":
        return {"preset": "paper", "lr": PAPER_LR, "relative_step": True}
    assert absolute_lr is not None
    return {
        "preset": "paper",
        "lr": absolute_lr,
        "relative_step": False,
        "scale_parameter": False,
    }


def optimizer_spec(name: str, params: dict[str, Any]) -> OptimizerSpec:
    """The run's optimizer for configuration ``name`` with its resolved ``params``."""
    if name == "adamw":
        lr = params["lr"]

        def build_adamw(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
            optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            return optimizer, _scheduled(optimizer, steps)

        return OptimizerSpec(name, build_adamw, grad_clip_norm=1.0)

    kwargs: dict[str, Any] = {"preset": "paper"}
    scheduled = name != "paper"
    if scheduled:
        kwargs = _adafactor_kwargs(params["schedule"], params.get("lr"))
    if name.startswith("momentum_"):
        kwargs["beta1"] = MOMENTUM
        kwargs["momentum_dtype"] = torch.bfloat16 if name == "momentum_bf16" else torch.float32

    def build(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
        optimizer = Adafactor(model.parameters(), **kwargs)
        return optimizer, (_scheduled(optimizer, steps) if scheduled else None)

    return OptimizerSpec(name, build)


# --- the cells -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One training run of the sweep; ``key`` names its file (AdamW has one per swept lr)."""

    config: str
    length: int
    seed: int
    key: str

    def path(self, root: Path) -> Path:
        return root / "cells" / f"L{self.length}" / f"seed{self.seed}" / f"{self.key}.json"


def _lr_key(lr: float) -> str:
    return f"adamw_lr{lr:.0e}"


def plan_cells(
    lengths: list[int], seeds: list[int], configs: list[str], adamw_lrs: list[float], tune_seed: int
) -> list[Cell]:
    """Every cell the sweep consists of, in run order: shortest length first; at each length the
    tuning seed first, then the other seeds.

    On the tuning seed: AdamW at the middle swept lr, (a) and (b), which need no tuned value,
    then the rest of AdamW's sweep, then (c), (d) and (e), which need its result or (b)'s and
    (c)'s. So a sweep stopped early has the paper's defaults against AdamW at every length it
    reached. The other seeds run AdamW at the tuned lr, then the configurations in order.
    """
    ordered = sorted(adamw_lrs)
    anchor = ordered[(len(ordered) - 1) // 2] if ordered else None
    tuned_keys = [_lr_key(anchor)] if anchor is not None else []
    rest_keys = [_lr_key(lr) for lr in adamw_lrs if lr != anchor]
    cells = []
    for length in sorted(set(lengths)):
        for seed in sorted(seeds, key=lambda s: (s != tune_seed, s)):
            if seed == tune_seed:
                keys = [*tuned_keys, "paper", "relative_schedule", *rest_keys]
                keys += ["absolute_schedule", "momentum_fp32", "momentum_bf16"]
            else:
                keys = ["adamw_tuned", *(c for c in CONFIGS if c != "adamw")]
            for key in keys:
                config = "adamw" if key.startswith("adamw") else key
                if config in configs:
                    cells.append(Cell(config, length, seed, key))
    return cells


def read_cells(root: Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``root`` (files that do not parse are ignored)."""
    records = []
    for path in sorted((root / "cells").glob("L*/seed*/*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return records


class _Index:
    """The finished cells, looked up by (config, length, seed)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def get(self, config: str, length: int, seed: int) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["config"] == config and r["length"] == length and r["seed"] == seed
        ]

    def tuned_adamw_lr(self, length: int, tune_seed: int) -> float | None:
        """AdamW's best swept peak lr at ``length`` on the tuning seed (lowest val loss)."""
        swept = [r for r in self.get("adamw", length, tune_seed) if _ok(r)]
        if not swept:
            return None
        return min(swept, key=lambda r: r["val_loss"])["params"]["lr"]

    def adamw(self, length: int, seed: int, tune_seed: int) -> dict[str, Any] | None:
        """The AdamW run at the tuned lr, the reference of every ratio at (length, seed)."""
        lr = self.tuned_adamw_lr(length, tune_seed)
        for r in self.get("adamw", length, seed):
            if lr is not None and math.isclose(r["params"]["lr"], lr):
                return r
        return None

    def best_schedule(self, length: int, tune_seed: int) -> str | None:
        """'relative' or 'absolute': the better of (b) and (c) at ``length`` on the tuning seed."""
        found = {}
        for config, schedule in (
            ("relative_schedule", "relative"),
            ("absolute_schedule", "absolute"),
        ):
            runs = self.get(config, length, tune_seed)
            if runs:
                loss = runs[0]["val_loss"]
                found[schedule] = loss if loss is not None and _ok(runs[0]) else math.inf
        if len(found) < 2:
            return None
        return "relative" if found["relative"] <= found["absolute"] else "absolute"


def _ok(record: dict[str, Any]) -> bool:
    return not record["diverged"] and record["val_loss"] is not None


def resolve_params(cell: Cell, index: _Index, adamw_lrs: list[float], tune_seed: int) -> Any:
    """The cell's hyperparameters from the finished cells it depends on, or a string saying which
    cell is missing."""
    lr = index.tuned_adamw_lr(cell.length, tune_seed)
    needs_lr = f"AdamW's lr sweep at length {cell.length}, seed {tune_seed}"
    if cell.config == "adamw":
        if cell.key != "adamw_tuned":
            return {"lr": next(x for x in adamw_lrs if _lr_key(x) == cell.key)}
        return {"lr": lr} if lr is not None else f"needs {needs_lr}"
    if cell.config == "paper":
        return {}
    if cell.config == "relative_schedule":
        return {"schedule": "relative", "lr": PAPER_LR}
    if cell.config == "absolute_schedule":
        return {"schedule": "absolute", "lr": lr} if lr is not None else f"needs {needs_lr}"
    schedule = index.best_schedule(cell.length, tune_seed)
    if schedule is None:
        return f"needs (b) and (c) at length {cell.length}, seed {tune_seed}"
    if schedule == "relative":
        return {"schedule": "relative", "lr": PAPER_LR}
    return {"schedule": "absolute", "lr": lr} if lr is not None else f"needs {needs_lr}"


# --- running ---------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, size: ModelSize, corpus: Corpus) -> dict[str, Any]:
    """What every cell of one sweep must share; a resumed sweep checks it."""
    digest = hashlib.sha256(corpus.train.numpy().tobytes())
    digest.update(corpus.val.numpy().tobytes())
    return {
        "model_size": args.model_size,
        "model": asdict(size),
        "data": corpus.source,
        "train_bytes": len(corpus.train),
        "data_sha256": digest.hexdigest()[:16],
        "tune_seed": args.tune_seed,
    }


# What two cells of one sweep must agree on ("data", a path, may differ between machines that
# read the same text; the digest may be absent from cells written before it was recorded).
_SAME = ("model_size", "model", "train_bytes", "data_sha256", "tune_seed")


def _same_sweep(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(old[k] == new[k] for k in _SAME if k in old and k in new)


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    write_json(partial, payload)
    os.replace(partial, path)


def _record(
    cell: Cell, params: dict[str, Any], result: Any, settings: dict[str, Any], args: Any
) -> dict[str, Any]:
    return {
        "config": cell.config,
        "key": cell.key,
        "length": cell.length,
        "seed": cell.seed,
        "params": params,
        "val_loss": result.final_val_loss,
        "train_loss": result.final_train_loss,
        "diverged": result.diverged,
        "diverged_at": result.diverged_at,
        "val_curve": result.val_curve,
        "state_bytes": result.state_bytes,
        "param_count": result.param_count,
        "step_time_s": result.step_time_s,
        "wall_s": result.wall_s,
        "settings": settings,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_settings(root: Path, settings: dict[str, Any]) -> None:
    for record in read_cells(root):
        if not _same_sweep(record.get("settings") or {}, settings):
            raise ValueError(
                f"--output {root}: holds cells of another sweep (model {record['settings']}, "
                f"this one {settings}); pass another --output to start a new sweep"
            )
        return


def _sweep(
    args: argparse.Namespace, size: ModelSize, corpus: Corpus, device: torch.device
) -> tuple[int, str | None]:
    """Run the missing cells in order; returns (cells run, why it stopped early or None)."""
    root = Path(args.output)
    settings = _settings(args, size, corpus)
    _check_settings(root, settings)
    cells = plan_cells(args.lengths, args.seeds, args.configs, args.adamw_lrs, args.tune_seed)
    started = time.perf_counter()
    done = 0
    for number, cell in enumerate(cells, start=1):
        if cell.path(root).exists():
            continue
        if args.stop_after is not None and time.perf_counter() - started >= args.stop_after:
            return done, f"--stop-after {args.stop_after:g} s reached"
        params = resolve_params(cell, _Index(read_cells(root)), args.adamw_lrs, args.tune_seed)
        label = f"[{number}/{len(cells)}] {cell.key} L{cell.length} seed{cell.seed}"
        if isinstance(params, str):
            print(f"{label}: skipped: {params}", flush=True)
            continue
        spec = optimizer_spec(cell.config, params)
        result = train_run(
            spec, size, corpus, steps=cell.length, seed=cell.seed, device=device, label=label
        )
        _write_atomic(cell.path(root), _record(cell, params, result, settings, args))
        done += 1
        print(
            f"{label}: val loss {result.final_val_loss:.4f}, step {result.step_time_s * 1e3:.1f} "
            f"ms, wall {result.wall_s:.0f} s -> {cell.path(root)}",
            flush=True,
        )
    return done, None


# --- the report ----------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _seconds_per_step(records: list[dict[str, Any]]) -> dict[str, float]:
    """Measured wall seconds per training step (evaluations included), per configuration, and
    over all cells under the key '*'."""
    per: dict[str, list[float]] = {}
    for r in records:
        steps = r["diverged_at"] or r["length"]
        if r["wall_s"]:
            per.setdefault(r["config"], []).append(r["wall_s"] / steps)
            per.setdefault("*", []).append(r["wall_s"] / steps)
    return {k: statistics.median(v) for k, v in per.items()}


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _cell_rows(
    records: list[dict[str, Any]], index: _Index, tune_seed: int
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], dict[str, Any]]]:
    refs = {}
    rows = []

    def order(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["length"], r["seed"], CONFIGS.index(r["config"]), r["params"].get("lr", 0))

    for r in sorted(records, key=order):
        ref = index.adamw(r["length"], r["seed"], tune_seed)
        if ref is not None:
            refs[(r["length"], r["seed"])] = ref
        if r["config"] == "adamw" and ref is not None and r is not ref:
            role = "sweep"
        elif r["config"] == "adamw":
            role = "reference" if ref is not None else "sweep"
        else:
            role = "config"
        ratio = None
        if ref is not None and r["val_loss"] is not None and ref["val_loss"]:
            ratio = r["val_loss"] / ref["val_loss"]
        state_ratio = None
        if ref is not None and ref["state_bytes"]:
            state_ratio = r["state_bytes"] / ref["state_bytes"]
        rows.append(
            {**_summary_fields(r), "role": role, "ratio": ratio, "state_ratio": state_ratio}
        )
    return rows, refs


def _summary_fields(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("config", "key", "length", "seed", "params", "val_loss", "train_loss", "diverged")
    keep += ("diverged_at", "state_bytes", "step_time_s", "wall_s", "load_average")
    return {k: r.get(k) for k in keep}


def _params_text(row: dict[str, Any]) -> str:
    params = row["params"] or {}
    parts = []
    if "schedule" in params:
        parts.append(params["schedule"])
    if "lr" in params:
        parts.append(f"lr {params['lr']:g}")
    return ", ".join(parts) or "-"


def build_report(
    root: Path,
    *,
    lengths: list[int],
    seeds: list[int],
    configs: list[str],
    adamw_lrs: list[float],
    tune_seed: int,
    plot: bool = True,
) -> dict[str, Any]:
    """Write ``report.md``, ``summary.json`` and (with ``plot``) ``ratio_vs_length.png`` under
    ``root`` from the finished cells; return the summary. It covers the given lengths, seeds and
    configurations and those of every finished cell in ``root``."""
    records = read_cells(root)
    # every finished cell, not only this invocation's (a resume of a few cells keeps the rest)
    lengths = sorted(set(lengths) | {r["length"] for r in records})
    seeds = sorted(set(seeds) | {r["seed"] for r in records})
    configs = [c for c in CONFIGS if c in configs or any(r["config"] == c for r in records)]
    index = _Index(records)
    rows, _ = _cell_rows(records, index, tune_seed)
    planned = plan_cells(lengths, seeds, configs, adamw_lrs, tune_seed)
    missing = [c for c in planned if not c.path(root).exists()]
    per_step = _seconds_per_step(records)
    fallback = per_step.get("*")
    remaining_s = None
    if fallback is not None:
        remaining_s = sum(c.length * per_step.get(c.config, fallback) for c in missing)
    full_s = None
    if fallback is not None:
        full_s = sum(c.length * per_step.get(c.config, fallback) for c in planned)

    pivot: dict[str, dict[str, Any]] = {}
    for config in configs:
        pivot[config] = {}
        for length in lengths:
            ratios = {
                row["seed"]: row["ratio"]
                for row in rows
                if row["config"] == config
                and row["length"] == length
                and row["role"] != "sweep"
                and row["ratio"] is not None
            }
            measured = {
                row["seed"]
                for row in rows
                if row["config"] == config and row["length"] == length and row["role"] != "sweep"
            }
            pivot[config][str(length)] = {
                "ratios": {str(s): v for s, v in sorted(ratios.items())},
                "mean_ratio": _mean(list(ratios.values())),
                "seeds": sorted(ratios),
                "measured_seeds": sorted(measured),
            }
    tuned = {str(n): index.tuned_adamw_lr(n, tune_seed) for n in lengths}
    swept = {
        str(n): sorted(r["params"]["lr"] for r in index.get("adamw", n, tune_seed)) for n in lengths
    }
    complete = {
        n: all(any(math.isclose(lr, x) for x in v) for lr in adamw_lrs) for n, v in swept.items()
    }
    best = {str(n): index.best_schedule(n, tune_seed) for n in lengths}
    summary = {
        "lengths": lengths,
        "seeds": seeds,
        "configs": configs,
        "descriptions": {c: DESCRIPTIONS[c] for c in configs},
        "adamw_lrs_swept": adamw_lrs,
        "tune_seed": tune_seed,
        "adamw_tuned_lr": tuned,
        "adamw_lrs_measured": swept,
        "adamw_sweep_complete": complete,
        "best_schedule": best,
        "cells": rows,
        "mean_ratio": pivot,
        "missing": [asdict(c) for c in missing],
        "seconds_per_step": per_step,
        "estimated_remaining_s": remaining_s,
        "estimated_full_sweep_s": full_s,
        "settings": records[0]["settings"] if records else None,
    }
    write_json(root / "summary.json", summary)
    (root / "report.md").write_text(_markdown(summary, rows, missing))
    if plot:
        _plot(summary, rows, root / "ratio_vs_length.png")
    return summary


def _markdown(summary: dict[str, Any], rows: list[dict[str, Any]], missing: list[Cell]) -> str:
    lengths, configs = summary["lengths"], summary["configs"]
    out = ["# Training quality by run length", ""]
    if summary["settings"]:
        s = summary["settings"]
        out += [
            f"Model `{s['model_size']}` ({s['model']}), data {s['data']}; tuning seed "
            f"{summary['tune_seed']}. Ratio = final validation loss / AdamW's (tuned lr) at the "
            "same length and seed; below 1 is better than AdamW.",
            "",
        ]
    out += ["## Mean ratio to AdamW (seeds measured)", ""]
    header = ["config", *(f"{n} steps" for n in lengths)]
    table = []
    for config in configs:
        line = [config]
        for n in lengths:
            entry = summary["mean_ratio"][config][str(n)]
            seeds = ",".join(str(s) for s in entry["seeds"])
            if entry["seeds"]:
                line.append(f"{_fmt(entry['mean_ratio'])} ({seeds})")
            else:
                line.append("no AdamW reference" if entry["measured_seeds"] else "missing")
        table.append(line)
    out += [markdown_table(header, table), ""]
    out += [
        "AdamW's tuned peak lr per length (best of the swept lrs measured on the tuning seed; "
        "provisional where the sweep is incomplete): "
        + ", ".join(
            f"{n}: {_fmt(lr, 'g')}"
            + ("" if summary["adamw_sweep_complete"][n] else " (sweep incomplete)")
            for n, lr in summary["adamw_tuned_lr"].items()
        ),
        "Better schedule of (b)/(c) per length (momentum runs use it): "
        + ", ".join(f"{n}: {b or '-'}" for n, b in summary["best_schedule"].items()),
        "",
        "## Every cell",
        "",
    ]
    header = ["config", "params", "length", "seed", "val loss", "ratio", "state", "state ratio"]
    header += ["step ms", "wall s", "note"]
    table = [
        [
            row["key"] if row["config"] == "adamw" else row["config"],
            _params_text(row),
            str(row["length"]),
            str(row["seed"]),
            _fmt(row["val_loss"]),
            _fmt(row["ratio"]),
            fmt_bytes(row["state_bytes"]),
            _fmt(row["state_ratio"], ".4f"),
            _fmt(row["step_time_s"] * 1e3 if row["step_time_s"] else None, ".1f"),
            _fmt(row["wall_s"], ".0f"),
            (f"diverged at step {row['diverged_at']}" if row["diverged"] else "")
            + (" (lr sweep)" if row["role"] == "sweep" else "")
            + (" (reference)" if row["role"] == "reference" else ""),
        ]
        for row in rows
    ]
    out += [markdown_table(header, table) if rows else "No cell has finished yet.", ""]
    out += ["## Missing cells", ""]
    if missing:
        out += [f"- {c.key} at {c.length} steps, seed {c.seed}" for c in missing]
    else:
        out += ["None: every planned cell has finished."]
    est = summary["estimated_remaining_s"]
    full = summary["estimated_full_sweep_s"]
    if est is not None:
        out += [
            "",
            f"Estimated time for the missing cells: {est / 3600:.2f} h; for the whole sweep: "
            f"{full / 3600:.2f} h (measured wall seconds per step of each configuration, "
            "evaluations included, times the steps of each cell).",
        ]
    return "\n".join(out) + "\n"


def _plot(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.ticker import NullFormatter

    from ._report import _figure

    fig = _figure(figsize=(10, 5))
    axes = fig.subplots()
    markers = "osD^v<>"
    seeds = sorted({row["seed"] for row in rows})
    for i, config in enumerate(summary["configs"]):
        if config == "adamw":  # the reference: the dashed line at 1
            continue
        color = f"C{i}"
        means = [
            (int(n), entry["mean_ratio"])
            for n, entry in summary["mean_ratio"][config].items()
            if entry["mean_ratio"] is not None
        ]
        if not means:
            continue
        xs, ys = zip(*means)
        style = "--" if config == "momentum_bf16" else "-"  # it may lie on top of fp32's line
        axes.plot(
            xs, ys, style, marker="x", color=color, lw=1.5, label=f"{config} (x: mean over seeds)"
        )
        for row in rows:
            if row["config"] == config and row["role"] != "sweep" and row["ratio"] is not None:
                marker = markers[seeds.index(row["seed"]) % len(markers)]
                axes.plot(row["length"], row["ratio"], marker, color=color, ms=6, mfc="none")
    for j, seed in enumerate(seeds):
        axes.plot([], [], markers[j % len(markers)], color="gray", mfc="none", label=f"seed {seed}")
    axes.axhline(1.0, color="black", lw=0.8, ls="--", label="AdamW (tuned lr)")
    if not any(row["ratio"] is not None for row in rows):
        axes.text(0.5, 0.6, "no ratio yet: no AdamW reference", transform=axes.transAxes)
    axes.set_xlim(min(summary["lengths"]) / 1.3, max(summary["lengths"]) * 1.3)
    axes.set_xscale("log")
    axes.set_xticks(summary["lengths"])
    axes.set_xticklabels([str(n) for n in summary["lengths"]])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set(
        xlabel="training steps",
        ylabel="final val loss / AdamW's (same length, seed)",
        title="Adafactor configurations against tuned AdamW",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the command -------------------------------------------------------------------------------


def _config_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(CONFIGS)} (comma-separated)"
        )
    return [c for c in CONFIGS if c in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default="wide",
        help="model and batch shape (default wide, the demo's)",
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
        default="runs/quality",
        help="sweep folder: cells/ and the report (default runs/quality); rerun to resume",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads for torch (default 2)"
    )
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="N",
        help="run lengths in steps, run shortest first (default 600 1500 3000)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        metavar="S",
        help="seeds (default 0 1)",
    )
    parser.add_argument(
        "--tune-seed",
        type=int,
        default=0,
        help="seed whose runs pick AdamW's lr and the better schedule (default 0)",
    )
    parser.add_argument(
        "--configs",
        type=_config_list,
        default=list(CONFIGS),
        metavar="NAMES",
        help=f"comma-separated configurations (default all: {','.join(CONFIGS)})",
    )
    parser.add_argument(
        "--adamw-lrs",
        type=positive_float,
        nargs="+",
        default=list(DEFAULT_ADAMW_LRS),
        metavar="LR",
        help="AdamW peak lrs swept at each length on the tuning seed (default 5e-4 1e-3 2e-3)",
    )
    parser.add_argument(
        "--stop-after",
        type=positive_float,
        metavar="SECONDS",
        help="start no new cell after this many seconds (default: run every missing cell)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; build the report from the finished cells",
    )


def _iter_lines(summary: dict[str, Any]) -> Iterator[str]:
    done = len(summary["cells"])
    yield f"cells finished: {done}; missing: {len(summary['missing'])}"
    if summary["estimated_remaining_s"] is not None:
        minutes = summary["estimated_remaining_s"] / 60
        yield f"estimated time for the missing cells: {minutes:.0f} min"


def _run(args: argparse.Namespace) -> int:
    root = Path(args.output)
    make_output_dir(root)
    report_args = {
        "lengths": sorted(set(args.lengths)),
        "seeds": args.seeds,
        "configs": args.configs,
        "adamw_lrs": args.adamw_lrs,
        "tune_seed": args.tune_seed,
    }
    interrupted = False
    stopped = None
    if not args.report_only:
        device = setup_device(args.device, args.threads)
        size = MODEL_SIZES[args.model_size]
        corpus = load_corpus(args.data, size.context)
        print(
            f"data: {corpus.source}: {len(corpus.train)} train bytes; model {args.model_size}; "
            f"results in {root}",
            flush=True,
        )
        try:
            _, stopped = _sweep(args, size, corpus, device)
        except KeyboardInterrupt:
            interrupted = True
    summary = build_report(root, **report_args)
    for line in _iter_lines(summary):
        print(line)
    if stopped:
        print(f"stopped: {stopped}")
    print(f"wrote {root / 'report.md'}, {root / 'summary.json'}, {root / 'ratio_vs_length.png'}")
    if interrupted:
        print(
            f"adafactor quality: interrupted: kept the finished cells in {root / 'cells'}",
            file=sys.stderr,
        )
        return INTERRUPTED
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (DataError, ValueError, ModuleNotFoundError, OSError) as exc:
        return error("quality", str(exc))


def main(argv: list[str] | None = None) -> int:
    """``python -m adafactor.cli.quality`` / ``benchmarks/bench_quality.py``, without the
    ``adafactor`` command's subcommand registry."""
    parser = argparse.ArgumentParser(prog="adafactor quality", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
