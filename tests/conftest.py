"""Shared fixtures: parameter sets covering every rank and edge case the optimizer must handle."""

from __future__ import annotations

import pytest
import torch

# name -> shape: 0-d, size-1 dims, 1xn / nx1, odd sizes, 3-D with last2 != largest2, conv OIHW.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "vec1": (1,),
    "vec5": (5,),
    "mat1x1": (1, 1),
    "row1x7": (1, 7),
    "col7x1": (7, 1),
    "mat5x3": (5, 3),
    "mat24x40": (24, 40),
    "t16x4x8": (16, 4, 8),
    "conv8x4x3x3": (8, 4, 3, 3),
    "empty0x4": (0, 4),
}


def make_params(
    dtype: torch.dtype = torch.float32, seed: int = 0, shapes: dict | None = None
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    return [
        torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes.values()
    ]


def make_grads(
    params: list[torch.Tensor], step: int, seed: int = 0, scale: float = 1e-2
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
