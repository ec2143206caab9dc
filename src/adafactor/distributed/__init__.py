"""Sharded parameters: DTensor (FSDP2, tensor parallel, DeviceMesh) support for Adafactor.

All DTensor-specific code of the package lives here (see :mod:`adafactor.distributed.dtensor` and
docs/distributed.md). This file stays import-light: ``torch.distributed.tensor`` is loaded only
once a DTensor exists, which already implies it was imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_mesh",
    "found_inf",
    "grad_square_sum",
    "has_dtensor",
    "load_state_tensor",
    "new_state_buffer",
    "sharded_adafactor_step",
]

_LAZY = (
    "check_mesh",
    "found_inf",
    "grad_square_sum",
    "load_state_tensor",
    "new_state_buffer",
    "sharded_adafactor_step",
)


def has_dtensor(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor, without importing torch.distributed.tensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(
        issubclass(k, module.DTensor) for k in set(map(type, tensors))
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(".dtensor", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
