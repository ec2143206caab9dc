"""``adafactor bench``: the paired timing loop and the roofline byte model (the full run spawns
processes over 124M parameters; it lives in docs/performance.md, not in the tests)."""

from __future__ import annotations

import pytest

from adafactor.cli import bench


def test_paired_steps_every_implementation_once_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.SHAPE_SETS, "tiny", lambda: [(8, 4), (5,)])
    impls = ["adafactor", "adafactor_reference", "adamw_fused"]
    spec = {"shapes": "tiny", "dtype": "fp32", "threads": 1, "steps": 3, "impls": impls}
    out = bench._paired(spec)
    assert list(out["times"]) == impls
    assert all(len(t) == 3 and min(t) > 0 for t in out["times"].values())


def test_model_bytes_counts_the_passes() -> None:
    shapes = [(1000, 10), (7,)]
    # factored: g read 3x, x read + written (RMS(x) carried); vector: + V read, written, read
    assert bench.model_bytes("adafactor", shapes, "fp32") == 10000 * 20 + 7 * (20 + 12)
    assert bench.model_bytes("adafactor", shapes, "bf16") == 10000 * 10 + 7 * (10 + 12)
    assert bench.model_bytes("adafactor_mom_bf16", shapes, "fp32") == 10000 * 24 + 7 * 36
    assert bench.model_bytes("adamw_fused", shapes, "fp32") == 10007 * 28
