"""Triton kernels (CUDA). ``import triton`` happens only when a kernel is first needed.

``HAS_TRITON`` says whether triton is importable; :func:`triton_module` returns
:mod:`adafactor.kernels.adafactor_triton` (raising a clear error without triton).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

__all__ = ["HAS_TRITON", "triton_module"]

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def triton_module() -> ModuleType:
    """The kernel module, imported on first use."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the Triton kernels need the 'triton' package: pip install 'adafactor[triton]', "
            "or use impl='reference'"
        )
    from . import adafactor_triton

    return adafactor_triton
