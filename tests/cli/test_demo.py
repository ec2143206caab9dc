"""``adafactor demo`` end to end in a tiny configuration, and its error messages."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch

from adafactor import Adafactor
from adafactor.cli import demo, main, quality
from adafactor.cli._model import MODEL_SIZES, ByteTransformer
from adafactor.cli._train import RunResult
from adafactor.cli.demo import (
    ADAMW_PEAK_LR,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    OPTIMIZERS,
    QUALITY_TARGET,
    add_arguments,
)

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
    assert list(results["runs"]) == ["adafactor", "adafactor_abs", "adamw"]
    for name, run in results["runs"].items():
        cells = dict(zip(header, rows[name]))
        assert cells["train loss"] == f"{run['final_train_loss']:.4f}"
        assert cells["val loss"] == f"{run['final_val_loss']:.4f}"
        assert cells["val bits/byte"] == f"{run['final_val_loss'] / 0.6931471805599453:.4f}"
        assert len(run["train_curve"]) == 3
        assert [step for step, _ in run["val_curve"]] == [0, 1, 2, 3]
        assert run["val_curve"][-1][1] == pytest.approx(run["final_val_loss"])
        assert run["state_bytes"] > 0 and not run["diverged"]

    adamw = results["runs"]["adamw"]
    comparison = results["comparison"]
    assert comparison["target"] == QUALITY_TARGET
    assert set(comparison["verdicts"]) == {"adafactor", "adafactor_abs"}
    for name, verdict in comparison["verdicts"].items():
        run = results["runs"][name]
        ratio = run["final_val_loss"] / adamw["final_val_loss"]
        assert verdict["val_loss_ratio"] == pytest.approx(ratio)
        assert verdict["passed"] == (ratio <= QUALITY_TARGET)
        assert verdict["state_ratio"] == pytest.approx(run["state_bytes"] / adamw["state_bytes"])
        # Factored second moments without momentum: far less state than AdamW's two moments.
        assert verdict["state_ratio"] < 0.1
        line = re.search(
            rf"^verdict {name} \([^)]*\): (PASS|FAIL): val loss / AdamW's = ([0-9.]+) "
            rf"\(target <= {QUALITY_TARGET}\)$",
            printed,
            re.MULTILINE,
        )
        assert line is not None, printed
        assert line.group(1) == ("PASS" if verdict["passed"] else "FAIL")
        assert line.group(2) == f"{verdict['val_loss_ratio']:.4f}"
        state = re.search(
            rf"optimizer state: {name} / AdamW = ([0-9.]+) \(1/(\d+); ([0-9,]+) vs ", printed
        )
        assert state is not None
        assert state.group(1) == f"{verdict['state_ratio']:.5f}"
        assert state.group(2) == f"{1 / verdict['state_ratio']:.0f}"
        assert state.group(3) == f"{run['state_bytes']:,}"
    assert "wall time: " in printed and results["total_wall_s"] > 0
    assert results["config"]["steps"] == 3 and results["config"]["model_size"] == "tiny"
    assert results["config"]["adamw_peak_lr"] == ADAMW_PEAK_LR["tiny"]


def _run(name: str, loss: float, state: int = 100, diverged_at: int | None = None) -> RunResult:
    return RunResult(name=name, final_val_loss=loss, state_bytes=state, diverged_at=diverged_at)


def test_demo_verdict_per_configuration() -> None:
    adamw = _run("adamw", 2.0, state=10_000)
    fields, lines = demo._comparison(
        {
            "adafactor": _run("adafactor", 2.0 * 1.05),  # 5% behind AdamW: FAIL
            "adafactor_abs": _run("adafactor_abs", 2.0 * 1.02),  # 2% behind: PASS
            "adamw": adamw,
        }
    )
    verdicts = fields["verdicts"]
    assert verdicts["adafactor"]["passed"] is False
    assert verdicts["adafactor_abs"]["passed"] is True
    assert verdicts["adafactor"]["val_loss_ratio"] == pytest.approx(1.05)
    assert verdicts["adafactor_abs"]["state_ratio"] == pytest.approx(0.01)
    assert lines[0].startswith("verdict adafactor (the paper's defaults): FAIL: ")
    assert lines[1].startswith("verdict adafactor_abs (")
    assert ": PASS: val loss / AdamW's = 1.0200 (target <= 1.03)" in lines[1]
    # A diverged run fails whatever its last loss, and the line says where it stopped.
    fields, lines = demo._comparison(
        {"adafactor": _run("adafactor", 1.0, diverged_at=17), "adamw": adamw}
    )
    assert fields["verdicts"]["adafactor"]["passed"] is False
    assert lines[0].endswith("(target <= 1.03), diverged at step 17")
    # A diverged AdamW is no reference: no verdicts rather than a PASS against it.
    fields, lines = demo._comparison(
        {"adafactor": _run("adafactor", 2.0), "adamw": _run("adamw", 9.0, diverged_at=5)}
    )
    assert fields["verdicts"] == {} and fields["adamw_diverged"] is True
    assert lines == ["no verdicts: AdamW, the reference, diverged at step 5"]
    # Without AdamW (or without an Adafactor run) there is nothing to judge.
    assert demo._comparison({"adafactor": _run("adafactor", 2.0)}) == ({}, [])
    assert demo._comparison({"adamw": adamw}) == ({}, [])


def test_recommended_configuration_is_the_quality_sweeps_absolute_schedule() -> None:
    """adafactor_abs is built by quality.py's own definition of (c), at AdamW's peak lr."""
    torch.manual_seed(0)
    model = ByteTransformer(MODEL_SIZES["tiny"])
    optimizer, scheduler = demo._spec("adafactor_abs", 2e-3).build(model, 100)
    reference, _ = quality.optimizer_spec(
        "absolute_schedule", {"schedule": "absolute", "lr": 2e-3}
    ).build(model, 100)
    assert isinstance(optimizer, Adafactor) and scheduler is not None
    group, expected = optimizer.param_groups[0], reference.param_groups[0]
    assert group["relative_step"] is False and group["scale_parameter"] is False
    assert {k: v for k, v in group.items() if k != "params"} == {
        k: v for k, v in expected.items() if k != "params"
    }
    # AdamW's schedule on lr: 5% warmup, then cosine down to 10% of the peak at the last step.
    (schedule,) = scheduler.lr_lambdas
    assert [schedule(k) for k in range(100)] == [quality.adamw_schedule(k, 100) for k in range(100)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 5)  # the first warmup step
    assert max(2e-3 * schedule(k) for k in range(100)) == pytest.approx(2e-3)
    assert schedule(99) == pytest.approx(0.1, rel=0.01)
    assert demo._spec("adafactor", 2e-3).build(model, 100)[1] is None  # the paper: no schedule


def test_demo_defaults_and_adamw_lr(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.model_size, defaults.steps) == (DEFAULT_SIZE, DEFAULT_STEPS)
    assert defaults.adamw_lr is None  # resolved per model size when the demo runs
    assert set(ADAMW_PEAK_LR) == set(MODEL_SIZES)

    assert defaults.optimizers == list(OPTIMIZERS) == ["adafactor", "adafactor_abs", "adamw"]

    argv = ["demo", "--model-size", "tiny", "--steps", "1", "--optimizers", "adamw"]
    assert main([*argv, "--adamw-lr", "2e-3", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["adamw_peak_lr"] == 2e-3


def test_demo_same_batches_and_init_for_every_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _text_file(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    argv = ["demo", "--model-size", "tiny", "--steps", "2", "--data", str(data)]
    order = "adamw,adafactor_abs,adafactor"
    assert main([*argv, "--output", str(out), "--optimizers", order]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["adamw", "adafactor_abs", "adafactor"]
    # Same initial model and same first batch: identical first losses.
    for name in ("adafactor_abs", "adafactor"):
        assert runs[name]["train_curve"][0] == runs["adamw"]["train_curve"][0]
        assert runs[name]["val_curve"][0] == runs["adamw"]["val_curve"][0]
    # ... and different optimizers after that
    assert runs["adafactor_abs"]["train_curve"][1] != runs["adafactor"]["train_curve"][1]
    assert results["config"]["data"] == str(data)
    capsys.readouterr()

    single = tmp_path / "single"
    assert main([*argv, "--output", str(single), "--optimizers", "adafactor"]) == 0
    assert "verdict" not in capsys.readouterr().out
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
