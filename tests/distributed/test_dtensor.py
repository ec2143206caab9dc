"""Sharded training on gloo CPU processes equals single-process training (1e-5 relative).

Scenarios are grouped per spawn to pay the process start-up once; see ``_scenarios``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from . import _scenarios as sc
from ._common import spawn

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def test_two_ranks_equal_single_process(tmp_path: Path) -> None:
    """Placements x options, constant collectives, FSDP2, tensor parallel, DDP, full-state load."""
    spawn(sc.run_two, 2, tmp_path)


def test_two_ranks_errors(tmp_path: Path) -> None:
    """FSDP1 flat parameters, Partial or plain gradients, from_keras with a foreign mesh."""
    spawn(sc.run_errors, 2, tmp_path)


def test_two_ranks_overflow_takes_float64_path(tmp_path: Path) -> None:
    """A finite gradient overflowing float32 on one rank's shard: float64 on every rank."""
    spawn(sc.overflow_goes_float64, 2, tmp_path)


def test_four_ranks_then_reshard_to_two(tmp_path: Path) -> None:
    """Empty shards, FSDP x TP on a 2x2 mesh, DCP save on 4 ranks, load on 2, same numbers."""
    spawn(sc.run_four, 4, tmp_path, str(tmp_path))
    spawn(sc.run_resume_two, 2, tmp_path, str(tmp_path))
