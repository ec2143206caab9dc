"""``adafactor reproduce`` end to end in a tiny configuration, its findings, divergence checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adafactor.cli import main
from adafactor.cli._data import load_corpus
from adafactor.cli._model import MODEL_SIZES
from adafactor.cli._train import OptimizerSpec, RunResult, train_run
from adafactor.cli.reproduce import (
    COLUMNS,
    FULL,
    QUICK,
    ROWS,
    adafactor_kwargs,
    findings,
    paper_schedule,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cells(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_reproduce_outputs_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reproduce", "--steps", "2", "--model-size", "tiny", "--output", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "table.md").read_text()
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert table.strip() in printed

    cells = _cells(table)
    assert list(results["rows"]) == [row.key for row in ROWS]
    for key, row in results["rows"].items():
        for column, cell in zip(COLUMNS, cells[key][-2:]):
            run = row["runs"][column]
            assert cell == f"{run['final_val_loss']:.4f}"
            assert len(run["train_curve"]) == 2 and not run["diverged"]
    assert results["config"]["steps"] == 2
    assert results["config"]["abs_lr"] == FULL["abs_lr"]
    claims = [item["claim"] for item in results["findings"]]
    assert len(claims) == 4
    for item in results["findings"]:
        verdict = "AGREES" if item["agrees"] else "DISAGREES"
        assert f"- {verdict}: {item['claim']}" in table


def test_reproduce_rows_and_quick_defaults(tmp_path: Path) -> None:
    # --quick picks its own steps and size, but explicit options still win.
    argv = ["reproduce", "--quick", "--steps", "1", "--model-size", "tiny", "--rows", "aj"]
    assert main([*argv, "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["rows"]) == ["A", "J"]
    assert results["config"]["steps"] == 1
    assert results["config"]["model"] == vars(MODEL_SIZES["tiny"])
    assert results["config"]["abs_lr"] == QUICK["abs_lr"]
    assert [f["claim"] for f in results["findings"]] == [
        "full Adafactor (row J) matches Adam (row A)"
    ]


def test_reproduce_abs_lr_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reproduce", "--quick", "--steps", "1", "--model-size", "tiny", "--rows", "A"]
    assert main([*argv, "--abs-lr", "3e-3", "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["abs_lr"] == 3e-3
    with pytest.raises(SystemExit):
        main([*argv, "--abs-lr", "-1", "--output", str(tmp_path)])
    assert "argument --abs-lr: must be a finite number > 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("warmup", [True, False])
def test_absolute_rows_follow_the_schedule_scaled_to_abs_lr(warmup: bool) -> None:
    schedule = paper_schedule(1000, warmup)
    absolute, relative = ROWS[0], ROWS[-1]
    assert not absolute.relative and relative.relative
    for abs_lr in (1e-3, 1e-2):
        kwargs = adafactor_kwargs(absolute, warmup, 1000, abs_lr)
        for index in (0, 99, 500, 999):
            assert kwargs["lr"](index) == pytest.approx(abs_lr / 1e-2 * schedule(index))
        # Relative rows keep the paper's rho_t = s_t whatever the absolute peak.
        assert adafactor_kwargs(relative, warmup, 1000, abs_lr)["lr"](7) == schedule(7)
    assert adafactor_kwargs(absolute, warmup, 1000)["lr"](999) == pytest.approx(
        0.1 * schedule(999)  # the paper's alpha_t = 0.1 s_t by default
    )


def test_reproduce_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--rows", "AZ", "--output", str(tmp_path)]) == 2
    assert "reproduce: error: --rows 'AZ': unknown row Z" in capsys.readouterr().err


def test_paper_schedule_is_the_papers_curve_rescaled() -> None:
    warm, flat = paper_schedule(1000, warmup=True), paper_schedule(1000, warmup=False)
    # 1000 steps stand for 100k: step t here is step 100 t in the paper.
    assert warm(0) == pytest.approx(1e-6 * 100)
    assert warm(99) == pytest.approx(1e-2)  # the end of the 10k-step warmup
    assert flat(0) == pytest.approx(1e-2)
    assert warm(999) == flat(999) == pytest.approx(1e5**-0.5)


def _result(name: str, loss: float, diverged_at: int | None = None) -> RunResult:
    return RunResult(name=name, final_val_loss=loss, diverged_at=diverged_at)


def test_findings_follow_the_numbers() -> None:
    results = {(row.key, c): _result(row.key, 2.0) for row in ROWS for c in COLUMNS}
    results["C", "no warmup"] = _result("C", math.nan, diverged_at=7)
    results["D", "no warmup"] = _result("D", math.nan, diverged_at=9)
    verdicts = {f["claim"].split()[0]: f["agrees"] for f in findings(results)}
    assert verdicts == {"factored": True, "beta1=0": True, "update": True, "full": True}

    results["J", "warmup"] = _result("J", 2.2)  # 10% worse than Adam
    results["F", "no warmup"] = _result("F", math.nan, diverged_at=3)  # no repair
    verdicts = {f["claim"].split()[0]: f["agrees"] for f in findings(results)}
    assert verdicts == {"factored": False, "beta1=0": True, "update": False, "full": False}


def test_divergence_is_detected(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("abcdefghij" * 3000)
    size = MODEL_SIZES["tiny"]
    corpus = load_corpus(str(data), size.context)

    def build(model: torch.nn.Module, steps: int) -> tuple[torch.optim.Optimizer, None]:
        return torch.optim.SGD(model.parameters(), lr=1e4), None

    result = train_run(
        OptimizerSpec("sgd", build), size, corpus, steps=50, seed=0, device=torch.device("cpu")
    )
    assert result.diverged
    assert result.diverged_at is not None and result.diverged_at < 50
    assert len(result.train_curve) == result.diverged_at
