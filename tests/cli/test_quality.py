"""``adafactor quality`` on a tiny model: the cells, resuming after a stop, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adafactor.cli import build_parser, main, quality

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]
LRS = ["1e-3", "4e-3"]
# One length, two seeds, every configuration: 2 swept AdamW lrs + 5 Adafactor runs on the tuning
# seed, the tuned AdamW + 5 on the other: 13 cells of 3 steps.
CELLS = 13


def _text_file(path: Path, size: int = 30_000) -> Path:
    words = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(size // 30)]
    path.write_text("".join(words)[:size])
    return path


def _argv(tmp_path: Path, *extra: str, lengths: tuple[str, ...] = ("3",)) -> list[str]:
    data = _text_file(tmp_path / "corpus.txt")
    return [
        "quality",
        "--model-size",
        "tiny",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "sweep"),
        "--lengths",
        *lengths,
        "--adamw-lrs",
        *LRS,
        "--threads",
        "1",
        *extra,
    ]


def _count_runs(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[str]:
    """Record every training run (by label); with ``stop_at``, Ctrl-C at that run."""
    labels: list[str] = []
    real = quality.train_run

    def counted(*args: Any, **kwargs: Any) -> Any:
        labels.append(kwargs["label"])
        if stop_at is not None and len(labels) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs, progress=False)

    monkeypatch.setattr(quality, "train_run", counted)
    return labels


def _cells(root: Path) -> list[Path]:
    return sorted((root / "cells").glob("L*/seed*/*.json"))


def test_sweep_stops_resumes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "sweep"
    argv = _argv(tmp_path)

    # 1. Ctrl-C during the 4th run: the three finished cells are kept, the report lists the rest.
    runs = _count_runs(monkeypatch, stop_at=4)
    assert main(argv) == 130
    assert "interrupted: kept the finished cells" in capsys.readouterr().err
    assert len(runs) == 4 and len(_cells(root)) == 3
    names = {p.stem for p in _cells(root)}
    # AdamW at the middle swept lr and the two configurations that need no tuned value first.
    assert names == {"adamw_lr1e-03", "paper", "relative_schedule"}
    summary = json.loads((root / "summary.json").read_text())
    assert len(summary["cells"]) == 3 and len(summary["missing"]) == CELLS - 3
    report = (root / "report.md").read_text()
    assert "- adamw_lr4e-03 at 3 steps, seed 0" in report
    assert "3: 0.001 (sweep incomplete)" in report
    assert summary["cells"][1]["ratio"] is not None  # against the provisional reference
    assert summary["estimated_remaining_s"] > 0

    # 2. The same command again runs only the missing cells.
    monkeypatch.undo()
    runs = _count_runs(monkeypatch)
    assert main(argv) == 0
    assert len(runs) == CELLS - 3
    assert runs[0].startswith("[4/13] adamw_lr4e-03 L3 seed0")  # the interrupted one
    assert not any(label.startswith(("[1/", "[2/", "[3/")) for label in runs)
    assert len(_cells(root)) == CELLS
    stamps = {p: p.stat().st_mtime_ns for p in _cells(root)}

    # 3. And once more: nothing left to train, no cell rewritten.
    monkeypatch.undo()
    runs = _count_runs(monkeypatch)
    assert main(argv) == 0
    assert runs == [] and {p: p.stat().st_mtime_ns for p in _cells(root)} == stamps
    printed = capsys.readouterr().out
    assert "cells finished: 13; missing: 0" in printed

    _check_report(root)


def _check_report(root: Path) -> None:
    summary = json.loads((root / "summary.json").read_text())
    assert summary["missing"] == []
    cells = {(c["key"], c["seed"]): c for c in summary["cells"]}
    assert len(cells) == CELLS
    # AdamW's lr is tuned on seed 0 and reused for seed 1; it is every ratio's reference.
    swept = [cells[(f"adamw_lr{float(lr):.0e}", 0)] for lr in LRS]
    best = min(swept, key=lambda c: c["val_loss"])
    tuned = best["params"]["lr"]
    assert summary["adamw_tuned_lr"] == {"3": tuned}
    assert best["role"] == "reference" and best["ratio"] == pytest.approx(1.0)
    assert cells[("adamw_tuned", 1)]["params"] == {"lr": tuned}
    for seed in (0, 1):
        ref = best if seed == 0 else cells[("adamw_tuned", 1)]
        paper = cells[("paper", seed)]
        assert paper["ratio"] == pytest.approx(paper["val_loss"] / ref["val_loss"])
        assert cells[("absolute_schedule", seed)]["params"] == {"schedule": "absolute", "lr": tuned}
        assert cells[("relative_schedule", seed)]["params"] == {"schedule": "relative", "lr": 1e-2}
        # The momentum runs use the better of (b) and (c) on seed 0.
        rel, absolute = cells[("relative_schedule", 0)], cells[("absolute_schedule", 0)]
        better = "relative" if rel["val_loss"] <= absolute["val_loss"] else "absolute"
        assert summary["best_schedule"] == {"3": better}
        for name in ("momentum_fp32", "momentum_bf16"):
            assert cells[(name, seed)]["params"]["schedule"] == better
        # State: no momentum < bf16 momentum < fp32 momentum < AdamW.
        states = [cells[(n, seed)]["state_ratio"] for n in ("paper", "momentum_bf16")]
        states.append(cells[("momentum_fp32", seed)]["state_ratio"])
        assert states == sorted(states) and states[-1] < 1
        assert (
            cells[("paper", seed)]["state_bytes"]
            == cells[("absolute_schedule", seed)]["state_bytes"]
        )
    # Every configuration has a mean ratio over both seeds.
    for config in quality.CONFIGS:
        assert summary["mean_ratio"][config]["3"]["seeds"] == [0, 1]
    report = (root / "report.md").read_text()
    assert "None: every planned cell has finished." in report
    paper_mean = summary["mean_ratio"]["paper"]["3"]["mean_ratio"]
    assert f"| paper | {paper_mean:.4f} (0,1) |" in report
    assert (root / "ratio_vs_length.png").read_bytes().startswith(PNG_MAGIC)
    record = json.loads((root / "cells" / "L3" / "seed1" / "paper.json").read_text())
    for field in ("val_loss", "state_bytes", "step_time_s", "wall_s", "val_curve", "settings"):
        assert record[field] is not None


def test_report_only_lists_missing_lengths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _argv(tmp_path, "--seeds", "0", "--configs", "paper")
    runs = _count_runs(monkeypatch)
    assert main(argv) == 0 and len(runs) == 1
    root = tmp_path / "sweep"
    # Only the AdamW reference is missing: paper's ratio is unknown, and a longer length too.
    report_argv = _argv(tmp_path, "--seeds", "0", "--configs", "paper,adamw", "--report-only")
    report_argv[report_argv.index("--lengths") + 1] = "3"
    report_argv.insert(report_argv.index("--lengths") + 2, "5")
    assert main(report_argv) == 0 and len(runs) == 1  # trained nothing
    summary = json.loads((root / "summary.json").read_text())
    missing = {(m["key"], m["length"]) for m in summary["missing"]}
    assert missing == {
        ("adamw_lr1e-03", 3),
        ("adamw_lr4e-03", 3),
        ("paper", 5),
        ("adamw_lr1e-03", 5),
        ("adamw_lr4e-03", 5),
    }
    assert summary["cells"][0]["ratio"] is None
    report = (root / "report.md").read_text()
    assert "| paper | no AdamW reference | missing |" in report
    assert "- paper at 5 steps, seed 0" in report


def test_the_report_covers_every_finished_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming a few cells (one length, one configuration) rebuilds the report from all of
    them: it replaced the whole report with the resumed part."""
    runs = _count_runs(monkeypatch)
    assert main(_argv(tmp_path, "--seeds", "0", "--configs", "paper")) == 0
    argv = _argv(tmp_path, "--seeds", "1", "--configs", "relative_schedule", lengths=("4",))
    assert main(argv) == 0 and len(runs) == 2
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["lengths"] == [3, 4] and summary["seeds"] == [0, 1]
    assert summary["configs"] == ["paper", "relative_schedule"]
    assert {(c["key"], c["length"], c["seed"]) for c in summary["cells"]} == {
        ("paper", 3, 0),
        ("relative_schedule", 4, 1),
    }
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| config | 3 steps | 4 steps |" in report


def test_cells_that_need_the_sweep_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seed 1 alone: its AdamW and absolute-step runs need the lr tuned on seed 0.
    argv = _argv(tmp_path, "--seeds", "1", "--configs", "paper,absolute_schedule,adamw")
    runs = _count_runs(monkeypatch)
    assert main(argv) == 0
    assert runs == ["[2/3] paper L3 seed1"]
    printed = capsys.readouterr().out
    assert "adamw_tuned L3 seed1: skipped: needs AdamW's lr sweep at length 3, seed 0" in printed


def test_another_sweep_in_the_same_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _count_runs(monkeypatch)
    assert main(_argv(tmp_path, "--seeds", "0", "--configs", "paper")) == 0
    argv = _argv(tmp_path, "--seeds", "0", "--configs", "paper")
    argv[argv.index("tiny")] = "small"
    assert main(argv) == 2
    assert "holds cells of another sweep" in capsys.readouterr().err
    assert len(runs) == 1


def test_registered_and_wrapped() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "quality" in sub.choices  # type: ignore[operator]
    with pytest.raises(SystemExit):
        main(["quality", "--configs", "nonsense"])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "--report-only" in done.stdout
