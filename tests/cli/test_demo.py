"""``adafactor demo`` end to end in a tiny configuration, and its error messages."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch

from adafactor.cli import main
from adafactor.cli._model import MODEL_SIZES
from adafactor.cli.demo import ADAMW_PEAK_LR, DEFAULT_SIZE, DEFAULT_STEPS, add_arguments

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _text_file(path: Path, size: int = 30_000) -> Path:
    words = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(size // 30)]
    path.write_text("".join(words)[:size])
    return path


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell (the header row included)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_demo_outputs_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["demo", "--model-size", "tiny", "--steps", "3", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)
    table_md = (out / "table.md").read_text()
    assert table_md.split("\n\n")[0] in printed  # the file holds the printed table

    rows = _table_rows(printed)
    header = rows["optimizer"]
    assert set(results["runs"]) == {"adafactor", "adamw"}
    for name, run in results["runs"].items():
        cells = dict(zip(header, rows[name]))
        assert cells["train loss"] == f"{run['final_train_loss']:.4f}"
        assert cells["val loss"] == f"{run['final_val_loss']:.4f}"
        assert cells["val bits/byte"] == f"{run['final_val_loss'] / 0.6931471805599453:.4f}"
        assert len(run["train_curve"]) == 3
        assert [step for step, _ in run["val_curve"]] == [0, 1, 2, 3]
        assert run["val_curve"][-1][1] == pytest.approx(run["final_val_loss"])
        assert run["state_bytes"] > 0 and not run["diverged"]

    ada, adamw = results["runs"]["adafactor"], results["runs"]["adamw"]
    comparison = results["comparison"]
    assert comparison["val_loss_ratio"] == pytest.approx(
        ada["final_val_loss"] / adamw["final_val_loss"]
    )
    assert comparison["state_ratio"] == pytest.approx(ada["state_bytes"] / adamw["state_bytes"])
    # Factored second moments without momentum: far less state than AdamW's two full moments.
    assert comparison["state_ratio"] < 0.1
    verdict = "PASS" if comparison["passed"] else "FAIL"
    line = re.search(r"quality target: (PASS|FAIL): .* = ([0-9.]+) ", printed)
    assert line is not None
    assert line.group(1) == verdict
    assert line.group(2) == f"{comparison['val_loss_ratio']:.4f}"
    state_line = r"optimizer state: Adafactor / AdamW = ([0-9.]+) \(1/(\d+); ([0-9,]+) vs "
    state = re.search(state_line, printed)
    assert state is not None
    assert state.group(1) == f"{comparison['state_ratio']:.5f}"
    assert state.group(2) == f"{1 / comparison['state_ratio']:.0f}"
    assert state.group(3) == f"{ada['state_bytes']:,}"
    assert "wall time: " in printed and results["total_wall_s"] > 0
    assert results["config"]["steps"] == 3 and results["config"]["model_size"] == "tiny"
    assert results["config"]["adamw_peak_lr"] == ADAMW_PEAK_LR["tiny"]


def test_demo_defaults_and_adamw_lr(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.model_size, defaults.steps) == (DEFAULT_SIZE, DEFAULT_STEPS)
    assert defaults.adamw_lr is None  # resolved per model size when the demo runs
    assert set(ADAMW_PEAK_LR) == set(MODEL_SIZES)

    argv = ["demo", "--model-size", "tiny", "--steps", "1", "--optimizers", "adamw"]
    assert main([*argv, "--adamw-lr", "2e-3", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["adamw_peak_lr"] == 2e-3


def test_demo_same_batches_and_init_for_both_optimizers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _text_file(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    argv = ["demo", "--model-size", "tiny", "--steps", "2", "--data", str(data)]
    assert main([*argv, "--output", str(out), "--optimizers", "adamw,adafactor"]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["adamw", "adafactor"]
    # Same initial model and same first batch: identical first losses.
    assert runs["adamw"]["train_curve"][0] == runs["adafactor"]["train_curve"][0]
    assert runs["adamw"]["val_curve"][0] == runs["adafactor"]["val_curve"][0]
    assert results["config"]["data"] == str(data)
    capsys.readouterr()

    single = tmp_path / "single"
    assert main([*argv, "--output", str(single), "--optimizers", "adafactor"]) == 0
    assert "quality target" not in capsys.readouterr().out
    assert list(json.loads((single / "results.json").read_text())["runs"]) == ["adafactor"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
        (["--steps", "many"], "argument --steps: must be an integer >= 1, got 'many'"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer sgd"),
        (["--model-size", "huge"], "argument --model-size: invalid choice: 'huge'"),
        (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
        (["--adamw-lr", "0"], "argument --adamw-lr: must be a finite number > 0, got 0"),
        (["--adamw-lr", "fast"], "argument --adamw-lr: must be a number > 0, got 'fast'"),
    ],
)
def test_demo_bad_options(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _bad_data(tmp_path: Path, kind: str) -> tuple[Path, str]:
    if kind == "missing":
        return tmp_path / "nope.txt", "no such file or folder"
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "the folder holds no files"
    if kind == "empty file":
        (tmp_path / "empty.txt").write_text("")
        return tmp_path / "empty.txt", "0 bytes is too little text"
    return _text_file(tmp_path / "short.txt", 100), "100 bytes is too little text"


@pytest.mark.parametrize("kind", ["missing", "empty folder", "empty file", "short file"])
def test_demo_bad_data(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, message = _bad_data(tmp_path, kind)
    argv = ["demo", "--model-size", "tiny", "--steps", "1", "--data", str(path)]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adafactor demo: error: --data ")
    assert message in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_demo_unreadable_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _text_file(tmp_path / "secret.txt")
    path.chmod(0)
    argv = ["demo", "--model-size", "tiny", "--steps", "1", "--data", str(path)]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_demo_gradient_release_same_numbers_and_a_memory_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["demo", "--model-size", "tiny", "--steps", "3"]
    assert main([*argv, "--output", str(tmp_path / "plain"), "--optimizers", "adafactor"]) == 0
    assert "gradient release" not in capsys.readouterr().out
    out = tmp_path / "release"
    assert main([*argv, "--output", str(out), "--gradient-release"]) == 0
    printed = capsys.readouterr().out
    line = re.search(
        r"memory: Adafactor with gradient release held at most one complete gradient \(the "
        r"largest, ([0-9.]+ KiB)\) instead of all of them \(([0-9.]+ KiB)\); peak memory "
        r"[0-9.]+ [KMG]i?B \(AdamW [0-9.]+ [KMG]i?B\)",
        printed,
    )
    assert line is not None, printed
    assert line.group(1) == "32.0 KiB"  # the tiny model's 256 x 32 embedding (float32)
    release = json.loads((out / "results.json").read_text())
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert release["config"]["gradient_release"] is True
    assert "gradient_release" not in plain["config"]
    # stepped inside backward or by opt.step(): the same numbers
    for key in ("train_curve", "val_curve", "final_val_loss", "state_bytes"):
        assert release["runs"]["adafactor"][key] == plain["runs"]["adafactor"][key], key
