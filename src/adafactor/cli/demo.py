"""``adafactor demo``: train a byte-level Transformer with two Adafactor configurations beside
AdamW and compare.

Every configuration trains the same initial model on the same batches in the same order:

- ``adafactor``: the paper's defaults (``preset="paper"``, nothing tuned, no schedule);
- ``adafactor_abs``: the configuration docs/which-configuration.md recommends, exactly as
  ``adafactor quality`` defines its (c) ``absolute_schedule``: absolute steps
  (``relative_step=False, scale_parameter=False``) with AdamW's peak lr and AdamW's schedule;
- ``adamw``: AdamW as people tune it for small language models: a 5% linear warmup to its peak
  lr, cosine decay to 10% of the peak, weight decay 0.01 and gradient-norm clipping at 1, with
  the peak lr picked by a sweep on the default model (``ADAMW_PEAK_LR``; docs/demo.md).

The default model is one wide layer (d_model 512), because Adafactor's memory saving grows with
the width of the matrices. The demo prints a table, writes ``results.json``, ``table.md`` and
``loss_curves.png`` into ``--output``, and gives each Adafactor configuration a verdict: PASS
when its final validation loss is at most 1.03 times AdamW's (the paper's claim that Adafactor
matches Adam), with the ratio of its optimizer state to AdamW's.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from adafactor import Adafactor

from . import INTERRUPTED, quality
from ._data import Corpus, DataError, load_corpus
from ._model import MODEL_SIZES, ByteTransformer, ModelSize
from ._report import error, fmt_bytes, fmt_loss, markdown_table, plot_curves, run_record, write_json
from ._train import (
    OptimizerSpec,
    RunResult,
    add_common_arguments,
    make_output_dir,
    positive_float,
    setup_device,
    train_run,
)

__all__ = ["add_arguments", "run"]

QUALITY_TARGET = 1.03  # Adafactor's final validation loss at most 3% above AdamW's
STATE_TARGET = 1e-3  # the memory the paper promises: about 1/1000 of AdamW's optimizer state
# 300 steps: three runs of the wide model fit about 3 minutes on 2 cores (docs/demo.md).
DEFAULT_STEPS = 300
DEFAULT_SIZE = "wide"
# AdamW's peak lr per model size. "wide" (the default): best of {5e-4, 7e-4, 1e-3, 1.4e-3, 2e-3,
# 4e-3, 8e-3} at 600 steps (docs/demo.md). The narrower sizes keep 4e-3, which beat 2e-3 on
# "base" at 600 steps; --adamw-lr overrides.
ADAMW_PEAK_LR = {"tiny": 4e-3, "small": 4e-3, "base": 4e-3, "wide": 1e-3, "large": 4e-3}


def _adafactor(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
    return Adafactor(model.parameters(), preset="paper"), None


def _adafactor_release(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
    # each parameter is stepped inside backward; step() and zero_grad() are then no-ops
    return Adafactor(model.parameters(), preset="paper", gradient_release=True), None


def adamw_schedule(step: int, steps: int) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, then cosine to 10%."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw_spec(peak_lr: float) -> OptimizerSpec:
    def build(model: nn.Module, steps: int) -> tuple[Optimizer, LRScheduler | None]:
        optimizer = AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
        return optimizer, LambdaLR(optimizer, lambda step: adamw_schedule(step, steps))

    return OptimizerSpec("adamw", build, grad_clip_norm=1.0)


OPTIMIZERS = ("adafactor", "adafactor_abs", "adamw")
ADAFACTORS = ("adafactor", "adafactor_abs")  # the configurations that get a verdict
DESCRIPTIONS = {
    "adafactor": "the paper's defaults",
    "adafactor_abs": "recommended: absolute step, AdamW's lr and schedule",
    "adamw": "AdamW, tuned peak lr",
}


def _spec(name: str, adamw_lr: float, release: bool = False) -> OptimizerSpec:
    if name == "adafactor":
        return OptimizerSpec("adafactor", _adafactor_release if release else _adafactor)
    if name == "adafactor_abs":
        # The same definition as the quality sweep's (c), so the two commands measure one thing.
        params = {"schedule": "absolute", "lr": adamw_lr}
        return replace(quality.optimizer_spec("absolute_schedule", params), name=name)
    return _adamw_spec(adamw_lr)


def _optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(OPTIMIZERS)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, steps=DEFAULT_STEPS, size=DEFAULT_SIZE, output="runs/demo")
    parser.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(OPTIMIZERS),
        metavar="NAMES",
        help="comma-separated configurations to train, in run order: adafactor (the paper's "
        "defaults), adafactor_abs (the recommended configuration: absolute step with AdamW's "
        "peak lr and schedule), adamw (default: all three)",
    )
    parser.add_argument(
        "--adamw-lr",
        type=positive_float,
        metavar="LR",
        help="AdamW's peak learning rate, also the peak lr of adafactor_abs (default: the "
        f"tuned value for --model-size, {ADAMW_PEAK_LR[DEFAULT_SIZE]:g} for {DEFAULT_SIZE})",
    )
    parser.add_argument(
        "--gradient-release",
        action="store_true",
        help="step the paper-default Adafactor run's parameters inside backward and free each "
        "gradient at once (Adafactor(gradient_release=True): the same numbers, less memory; "
        "docs/memory.md), and print a memory line",
    )


def _table(results: list[RunResult]) -> str:
    header = ["optimizer", "configuration", "train loss", "val loss", "val bits/byte"]
    header += ["step ms", "tokens/s", "optimizer state", "peak memory", "status"]
    rows = [
        [
            r.name,
            DESCRIPTIONS[r.name],
            fmt_loss(r.final_train_loss),
            fmt_loss(r.final_val_loss),
            fmt_loss(r.val_bits_per_byte),
            f"{r.step_time_s * 1e3:.1f}",
            f"{r.tokens_per_s:.0f}",
            fmt_bytes(r.state_bytes),
            fmt_bytes(r.peak_memory_bytes),
            f"diverged at step {r.diverged_at}" if r.diverged else "ok",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def _comparison(by_name: dict[str, RunResult]) -> tuple[dict[str, Any], list[str]]:
    """Each Adafactor configuration's verdict against AdamW and its state ratio, as JSON fields
    and as printed lines; empty without an AdamW run or without an Adafactor run."""
    names = [name for name in ADAFACTORS if name in by_name]
    if "adamw" not in by_name or not names:
        return {}, []
    adamw = by_name["adamw"]
    if adamw.diverged:  # no reference to judge against
        line = f"no verdicts: AdamW, the reference, diverged at step {adamw.diverged_at}"
        return {"target": QUALITY_TARGET, "verdicts": {}, "adamw_diverged": True}, [line]
    verdicts: dict[str, Any] = {}
    lines, state_lines = [], []
    for name in names:
        run = by_name[name]
        loss_ratio = run.final_val_loss / adamw.final_val_loss
        state_ratio = run.state_bytes / adamw.state_bytes
        passed = bool(loss_ratio <= QUALITY_TARGET) and not run.diverged
        verdicts[name] = {
            "val_loss_ratio": loss_ratio,
            "passed": passed,
            "state_ratio": state_ratio,
            "state_bytes": run.state_bytes,
        }
        diverged = f", diverged at step {run.diverged_at}" if run.diverged else ""
        lines.append(
            f"verdict {name} ({DESCRIPTIONS[name]}): {'PASS' if passed else 'FAIL'}: val loss / "
            f"AdamW's = {loss_ratio:.4f} (target <= {QUALITY_TARGET}){diverged}"
        )
        state_lines.append(
            f"optimizer state: {name} / AdamW = {state_ratio:.5f} (1/{1 / state_ratio:.0f}; "
            f"{run.state_bytes:,} vs {adamw.state_bytes:,} bytes; aim: about "
            f"1/{1 / STATE_TARGET:.0f})"
        )
    lines += state_lines
    fields = {"target": QUALITY_TARGET, "state_target": STATE_TARGET, "verdicts": verdicts}
    return fields, lines


def _train_all(
    args: argparse.Namespace, size: ModelSize, corpus: Corpus, adamw_lr: float, device: Any
) -> tuple[list[RunResult], bool]:
    """Train every optimizer in turn; on Ctrl-C, return the finished runs and True."""
    results: list[RunResult] = []
    for index, name in enumerate(args.optimizers, start=1):
        try:
            results.append(
                train_run(
                    _spec(name, adamw_lr, args.gradient_release),
                    size,
                    corpus,
                    steps=args.steps,
                    seed=args.seed,
                    device=device,
                    label=f"[{index}/{len(args.optimizers)}] {name}",
                )
            )
        except KeyboardInterrupt:
            return results, True
    return results, False


def _gradient_bytes(size: ModelSize) -> tuple[int, int]:
    """Bytes of all the model's gradients and of its largest one (float32, as the params)."""
    with torch.device("meta"):
        sizes = [p.numel() * p.element_size() for p in ByteTransformer(size).parameters()]
    return sum(sizes), max(sizes)


def _release_line(by_name: dict[str, RunResult], size: ModelSize) -> str:
    """What gradient release held, and the peak memory beside AdamW's."""
    every, largest = _gradient_bytes(size)
    line = (
        "memory: Adafactor with gradient release held at most one complete gradient (the "
        f"largest, {fmt_bytes(largest)}) instead of all of them ({fmt_bytes(every)})"
    )
    if "adafactor" in by_name:
        line += f"; peak memory {fmt_bytes(by_name['adafactor'].peak_memory_bytes)}"
        if "adamw" in by_name:
            line += f" (AdamW {fmt_bytes(by_name['adamw'].peak_memory_bytes)})"
    return line


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = setup_device(args.device, args.threads)
    size = MODEL_SIZES[args.model_size]
    adamw_lr = args.adamw_lr or ADAMW_PEAK_LR[args.model_size]
    corpus = load_corpus(args.data, size.context)
    output = Path(args.output)  # checked when the options were parsed (output_dir)
    make_output_dir(output)
    print(
        f"data: {corpus.source}: {corpus.files} files, {len(corpus.train)} train bytes, "
        f"{len(corpus.val)} validation bytes",
        flush=True,
    )
    results, interrupted = _train_all(args, size, corpus, adamw_lr, device)
    if interrupted and not results:
        print(
            f"adafactor demo: interrupted before any run finished; nothing written to {output}",
            file=sys.stderr,
        )
        return INTERRUPTED
    table = _table(results)
    comparison, lines = _comparison({r.name: r for r in results})
    if args.gradient_release:
        lines.append(_release_line({r.name: r for r in results}, size))
    params = results[0].param_count
    wall = time.perf_counter() - started
    lines.append(f"wall time: {wall:.1f} s (data, training, evaluation; not Python start-up)")
    if interrupted:
        lines.insert(0, f"interrupted after {len(results)} of {len(args.optimizers)} runs (Ctrl-C)")
    else:
        print(
            f"\nmodel {args.model_size} (d_model {size.d_model}, {size.n_layers} layer(s)): "
            f"{params:,} parameters, {args.steps} steps of {size.batch_size} x {size.context} "
            f"bytes on {device}; AdamW peak lr {adamw_lr:g} (also adafactor_abs's)\n"
        )
        print(table + "\n")
        print("\n".join(lines))
    (output / "table.md").write_text(table + "\n\n" + "\n".join(lines) + "\n")
    plot_curves(results, output / "loss_curves.png", f"byte-level LM, {args.model_size} model")
    config = {
        "steps": args.steps,
        "model_size": args.model_size,
        "model": asdict(size),
        "parameters": params,
        "seed": args.seed,
        "optimizers": list(args.optimizers),
        "adamw_peak_lr": adamw_lr,
        "device": str(device),
        "threads": args.threads,
        "data": corpus.source,
        "files": corpus.files,
        "train_bytes": len(corpus.train),
        "val_bytes": len(corpus.val),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if args.gradient_release:  # the default run's file stays as it was
        config["gradient_release"] = True
    payload = {
        "command": "demo",
        "config": config,
        "interrupted": interrupted,
        "runs": {r.name: run_record(r) for r in results},
        "comparison": comparison,
        "total_wall_s": time.perf_counter() - started,
    }
    write_json(output / "results.json", payload)
    if interrupted:
        count = f"{len(results)} finished run{'s' if len(results) > 1 else ''}"
        print(f"adafactor demo: interrupted: kept results of {count} in {output}", file=sys.stderr)
        return INTERRUPTED
    print(f"wrote {output / 'results.json'}, {output / 'table.md'}, {output / 'loss_curves.png'}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (DataError, ValueError, ModuleNotFoundError, OSError) as exc:
        return error("demo", str(exc))
