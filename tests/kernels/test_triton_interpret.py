"""The Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``: parity, launches, determinism.

The interpreter must be selected before triton is imported, so the checks
(:mod:`tests.kernels._interpret_checks`) run in one subprocess, shared by the tests below. They
cover every sample of ``tests/optim_inputs.OPTIM_INPUTS`` through ``Adafactor.step(impl="triton")``
against the reference on block-boundary shapes ((1,), (4097,), (1, 4097), (4097, 1), (5, 31, 37)),
factor layouts other than the last two dims, a GPT-2-small-shaped step (148 tensors) in at most a
dozen launches, bitwise run-to-run determinism, capturable mode with a masked skip, saturation
without update clipping (``no_clip``), and gradients whose squares overflow float32 (``overflow``:
1e19 to 3e38 on factored and unfactored tensors, the overflow path decided on the device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adafactor.kernels import HAS_TRITON

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interpret_checks"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name",
    ["table", "layouts", "launches", "determinism", "capturable", "lr_zero", "no_clip", "overflow"],
)
def test_interpreted_kernels(report: dict[str, Any], name: str) -> None:
    failures = report[name]["failures"]
    assert not failures, "\n".join(failures)


def test_gpt2_step_launch_count(report: dict[str, Any]) -> None:
    counts = report["extra"]["launches"]
    # two buckets (factored matrices, vectors): 6 + 5 launches
    assert sum(counts.values()) == 11, counts
    assert counts["_factors"] == 1 and counts["_apply_2d"] == 1 and counts["_apply_1d"] == 1
