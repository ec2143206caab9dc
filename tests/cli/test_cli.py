"""The ``adafactor`` command as a newcomer meets it: help texts, a missing extra, a bad --output,
progress on non-terminal output, Ctrl-C, and what the loss plots show."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adafactor.cli import _report, _train, bench, build_parser, demo, main, reproduce
from adafactor.cli._train import RunResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--model-size", "tiny", "--steps", "2"]


def _no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the training function of both commands (and bench's process spawner) by one
    that records the call, so a test can assert that no work started."""
    started: list[str] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        started.append("work")
        raise AssertionError("work started")

    monkeypatch.setattr(demo, "train_run", record)
    monkeypatch.setattr(reproduce, "train_run", record)
    monkeypatch.setattr(bench, "_spawn", record)
    return started


# --- help texts ---------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_plain_help_text() -> None:
    parsers = list(_parsers(build_parser()))
    assert [p.prog for p in parsers] == [
        "adafactor",
        "adafactor demo",
        "adafactor reproduce",
        "adafactor bench",
        "adafactor quality",
    ]
    for parser in parsers:
        text = parser.format_help()  # also raises on a stray % in a help text
        assert "`" not in text, f"{parser.prog} --help shows markup"
        assert parser.description and "`" not in parser.description
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                helps = [choice.help for choice in action._choices_actions]
                assert len(helps) == 4 and all(h and "`" not in h for h in helps)
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help text"
            assert "`" not in action.help, where


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "adafactor.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: adafactor ")


# --- the [cli] extra ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "reproduce"])
@pytest.mark.parametrize("missing", [["matplotlib"], ["tqdm"], ["matplotlib", "tqdm"]])
def test_missing_extra_stops_before_any_work(
    command: str,
    missing: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = _no_training(monkeypatch)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = tmp_path / "out"
    assert main([command, *TINY, "--output", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"adafactor {command}: error: ")
    assert "pip install 'adafactor[cli]'" in lines[0]
    for name in ["matplotlib", "tqdm"]:
        assert (name in lines[0]) == (name in missing)
    assert "Traceback" not in captured.out + captured.err
    assert not started and not out.exists()


def test_broken_extra_names_what_it_cannot_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = _no_training(monkeypatch)
    real_import = importlib.import_module

    def import_module(name: str, *args: Any) -> Any:
        if name == "matplotlib":  # as when numpy is missing under matplotlib
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert main(["demo", *TINY, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "adafactor demo: error: matplotlib is installed but cannot import numpy; the command "
        "needs its extras: pip install 'adafactor[cli]' (in a source checkout: "
        "pip install '.[cli]')\n"
    )
    assert not started


def test_bench_needs_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(bench, "run", lambda args: calls.append(args) or 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["bench", "--dtype", "fp32"]) == 0
    assert len(calls) == 1


# --- bad paths and numbers ----------------------------------------------------------------------


def _bad_output(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    if case == "under a file":
        return file / "out", f"{file} is a file"
    if case == "a file":
        return file, "is a file, not a folder"
    # Root writes anywhere, so unwritability is simulated.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    return tmp_path / "new" / "out", f"{tmp_path} is not writable"


@pytest.mark.parametrize("command", ["demo", "reproduce"])
@pytest.mark.parametrize("case", ["under a file", "a file", "unwritable"])
def test_bad_output_names_the_option_before_any_work(
    command: str,
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = _no_training(monkeypatch)
    value, reason = _bad_output(tmp_path, case, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main([command, *TINY, "--output", str(value)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert line.startswith(f"adafactor {command}: error: argument --output: {value}")
    assert reason in line and "pass " in line  # the value, what is wrong, the fix
    assert not started


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--output", "{file}/bench.json"],
            "argument --output: {file}/bench.json: {file} is a file",
        ),
        (["--output", "{dir}"], "argument --output: {dir} is a folder; pass a file name"),
        (["--output", "{dir}/bench.md"], "argument --output: {dir}/bench.md: pass a .json or .csv"),
        (["--steps", "-3"], "argument --steps: must be >= 1, got -3"),
        (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
        (["--threads", "two"], "argument --threads: must be an integer >= 1, got 'two'"),
    ],
)
def test_bench_bad_options(
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = _no_training(monkeypatch)
    file = tmp_path / "notes.txt"
    file.write_text("x")
    fill = {"file": str(file), "dir": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *(e.format(**fill) for e in extra)])
    assert exit_info.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert not started


# --- progress -----------------------------------------------------------------------------------

_PROGRESS = re.compile(
    r"^\[(\d)/3\] (\w+): step (\d+)/20 \((\d+)%\), loss (\d+\.\d{4}), "
    r"elapsed (?:\d+m\d\ds|\d+(?:\.\d)?s), ETA (?:\d+m\d\ds|\d+(?:\.\d)?s)$"
)


def test_progress_lines_on_non_terminal_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--model-size", "tiny", "--steps", "20", "--output", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()  # capsys is not a terminal
    lines = [m for m in map(_PROGRESS.match, captured.out.splitlines()) if m]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    for index, name in enumerate(["adafactor", "adafactor_abs", "adamw"], start=1):
        mine = [m for m in lines if m.group(2) == name]
        assert [int(m.group(1)) for m in mine] == [index] * 10
        assert [int(m.group(3)) for m in mine] == list(range(2, 21, 2))  # every 10%
        assert [int(m.group(4)) for m in mine] == list(range(10, 101, 10))
        assert float(mine[-1].group(5)) == pytest.approx(runs[name]["train_curve"][-1], abs=1e-4)
    assert "step/s" not in captured.err and "20/20" not in captured.err  # no tqdm bar


def test_progress_bar_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_train, "_interactive", lambda: True)
    argv = ["demo", "--model-size", "tiny", "--steps", "20", "--optimizers", "adamw"]
    assert main([*argv, "--output", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert not [line for line in captured.out.splitlines() if _PROGRESS.match(line)]
    assert "20/20" in captured.err and "step/s" in captured.err  # tqdm's bar, on stderr


# --- Ctrl-C -------------------------------------------------------------------------------------


def _interrupt_after(module: Any, finished: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Let ``finished`` runs train, then raise KeyboardInterrupt as Ctrl-C would."""
    real = module.train_run
    names: list[str] = []

    def train_run(spec: Any, *args: Any, **kwargs: Any) -> RunResult:
        if len(names) == finished:
            raise KeyboardInterrupt
        names.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(module, "train_run", train_run)
    return names


def _main(argv: list[str]) -> int:
    """``main``, with a Ctrl-C that escapes it failing the test instead of ending pytest."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped: Ctrl-C would print a traceback")


def test_demo_ctrl_c_keeps_the_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    finished = _interrupt_after(demo, 1, monkeypatch)
    out = tmp_path / "out"
    assert _main(["demo", *TINY, "--output", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"adafactor demo: interrupted: kept results of 1 finished run in {out}"
    ]
    assert "Traceback" not in captured.out and "| optimizer" not in captured.out
    assert finished == ["adafactor"]
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] is True
    assert list(results["runs"]) == ["adafactor"] and results["comparison"] == {}
    table = (out / "table.md").read_text()
    assert "| adafactor |" in table and "| adamw |" not in table
    assert "interrupted after 1 of 3 runs" in table
    assert (out / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_demo_ctrl_c_before_any_run_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _interrupt_after(demo, 0, monkeypatch)
    out = tmp_path / "out"
    assert _main(["demo", *TINY, "--output", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"adafactor demo: interrupted before any run finished; nothing written to {out}"
    ]
    assert not (out / "results.json").exists()


def test_reproduce_ctrl_c_keeps_the_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    finished = _interrupt_after(reproduce, 3, monkeypatch)
    argv = ["reproduce", *TINY, "--rows", "AJ", "--output", str(tmp_path)]
    assert _main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"adafactor reproduce: interrupted: kept results of 3 finished runs in {tmp_path}"
    ]
    assert "Traceback" not in captured.out and "| row |" not in captured.out
    assert finished == ["A warmup", "A no warmup", "J warmup"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True
    assert {key: list(row["runs"]) for key, row in results["rows"].items()} == {
        "A": ["warmup", "no warmup"],
        "J": ["warmup"],
    }
    assert results["findings"] == []  # no row has both columns but A: nothing to compare
    table = (tmp_path / "table.md").read_text()
    assert re.search(r"^\| J \|.*\| not run \|$", table, re.MULTILINE)
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_ctrl_c_keeps_the_finished_dtypes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {"impl": "adafactor", "median_s": 0.01, "min_s": 0.009, "first_s": 0.02}
    row |= {"first_cold_s": None, "state_MiB": 1.0, "transient_MiB": 2.0, "model_GB": 0.5}
    row |= {"roofline_s": 0.005, "roofline_pct": 50.0, "bandwidth_GBps": 10.0}

    def bench_dtype(args: argparse.Namespace, dtype: str, impls: list[str]) -> list[Any]:
        if dtype == "bf16":
            raise KeyboardInterrupt
        return [{**row, "dtype": dtype}]

    monkeypatch.setattr(bench, "_bench_dtype", bench_dtype)
    output = tmp_path / "bench.json"
    argv = ["bench", "--impls", "adafactor", "--dtype", "fp32", "bf16", "--output", str(output)]
    assert _main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"adafactor bench: interrupted: kept results of fp32 in {output} and above"
    ]
    assert [r["dtype"] for r in json.loads(output.read_text())] == ["fp32"]
    assert "| adafactor | fp32 |" in output.with_suffix(".md").read_text()
    assert "| adafactor | fp32 |" in captured.out


# --- plots --------------------------------------------------------------------------------------


def _fake_run(name: str, start: float, end: float, diverged_at: int | None = None) -> RunResult:
    steps = 40 if diverged_at is None else diverged_at
    train = [end + (start - end) * math.exp(-i / 4) for i in range(steps)]
    if diverged_at is not None:
        train[-1] = math.inf
    val = [(s, end + (start - end) * math.exp(-s / 4)) for s in range(0, steps, 4)]
    return RunResult(name=name, train_curve=train, val_curve=val, diverged_at=diverged_at)


def _check_axes(axes: Any, legend: Any) -> None:
    """Every curve of ``axes`` has a label, and ``legend`` shows it."""
    lines = axes.get_lines()
    assert lines and legend is not None
    shown = {text.get_text() for text in legend.get_texts()}
    for line in lines:
        label = line.get_label()
        assert label and not label.startswith("_"), "a curve without a label"
        assert label in shown, f"{label!r} missing from the legend"


def test_demo_plot_shows_step_zero_and_labels_every_curve() -> None:
    results = [_fake_run("adafactor", 12.0, 1.9), _fake_run("adamw", 12.0, 2.0)]
    fig = _report.curves_figure(results, "test")
    full = fig.axes[0]
    assert full.get_xlim()[0] <= 0 <= full.get_xlim()[1]
    low, high = full.get_ylim()
    for result in results:
        assert all(low <= loss <= high for _, loss in result.val_curve)  # 12.0 at step 0 too
        assert result.train_curve[0] <= high
    labels = {line.get_label() for axes in fig.axes for line in axes.get_lines()}
    assert {"adafactor train (smoothed)", "adafactor validation"} <= labels
    assert {"adamw train (smoothed)", "adamw validation"} <= labels
    full_run, zoom = fig.axes  # one legend, on the zoom, for the same curves in both panels
    _check_axes(full_run, zoom.get_legend())
    _check_axes(zoom, zoom.get_legend())


def test_grid_plot_shows_step_zero_and_labels_every_curve() -> None:
    panels = [
        ("A", [_fake_run("A warmup", 6.0, 2.0), _fake_run("A no warmup", 6.0, 2.1)]),
        ("C", [_fake_run("C warmup", 6.0, 2.0), _fake_run("C no warmup", 6.0, 2.0, 9)]),
    ]
    fig = _report.grid_figure(panels, "test")
    used = [axes for axes in fig.axes if axes.get_lines()]
    assert len(used) == 2
    for axes, (_, results) in zip(used, panels):
        assert axes.get_xlim()[0] <= 0 <= axes.get_xlim()[1]
        low, high = axes.get_ylim()
        assert all(low <= loss <= high for r in results for _, loss in r.val_curve)
        _check_axes(axes, axes.get_legend())
    labels = {line.get_label() for line in used[1].get_lines()}
    assert "C no warmup diverged at step 9" in labels
