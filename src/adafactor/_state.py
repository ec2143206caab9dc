"""Per-parameter optimizer state: which tensors a parameter needs under its group's options, and
creating or completing them (options can be turned on after the first step)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from . import distributed
from ._reference import compute_dtype
from .factoring import factor_dims

__all__ = ["STATE_KEYS", "STATE_OPTIONS", "complete_state", "expected_state", "state_options"]

# Every tensor key the optimizer may keep per parameter (torch.optim.Adafactor's names first).
STATE_KEYS = ("step", "row_var", "col_var", "variance", "exp_avg", "ema", "kahan_comp")

# The group options that decide which state tensors exist and how they are laid out.
STATE_OPTIONS = (
    "beta1",
    "use_ema",
    "kahan_summation",
    "factored",
    "factor_dims",
    "min_dim_size_to_factor",
    "state_dtype",
    "momentum_dtype",
)


def state_options(group: dict[str, Any]) -> tuple[Any, ...]:
    """The values of :data:`STATE_OPTIONS` in ``group`` (a change means: complete the state)."""
    return tuple(group.get(key) for key in STATE_OPTIONS)


def expected_state(p: Tensor, group: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Key -> (shape, dtype) of every state tensor ``p`` gets under ``group``'s options."""
    shape = tuple(p.shape)
    sdtype = group["state_dtype"] or compute_dtype(p.dtype)
    dims = factor_dims(
        shape, group["factor_dims"], group["min_dim_size_to_factor"], group["factored"]
    )
    out: dict[str, tuple[Any, Any]] = {"step": ((), torch.float64)}
    if dims is not None:
        row, col = list(shape), list(shape)
        row[dims.col_dim], col[dims.row_dim] = 1, 1
        out["row_var"] = (tuple(row), sdtype)
        out["col_var"] = (tuple(col), sdtype)
    else:
        out["variance"] = (shape, sdtype)
    if group["beta1"]:
        out["exp_avg"] = (shape, group["momentum_dtype"] or sdtype)
    if group["use_ema"]:
        out["ema"] = (shape, sdtype)
    if group.get("kahan_summation") and p.dtype == torch.bfloat16:
        out["kahan_comp"] = (shape, torch.bfloat16)
    return out


def complete_state(
    state: MutableMapping[Tensor, dict[str, Any]], p: Tensor, group: dict[str, Any]
) -> dict[str, Any]:
    """``p``'s state with every tensor ``group``'s options need (new ones zero, the EMA a copy
    of ``p``), and without those they no longer need."""
    st = state[p]
    expected = expected_state(p, group)
    for key in [k for k in st if k in STATE_KEYS and k not in expected]:
        del st[key]
    for key, (shape, dtype) in expected.items():
        if key in st:
            continue
        if key == "step":
            st[key] = torch.zeros((), dtype=dtype)
        elif key == "ema":  # tf_keras starts the average at the weights' current value
            st[key] = _saturated(p.detach(), dtype).to(dtype=dtype, copy=True)
        elif distributed.has_dtensor([p]):  # shards laid out like p
            st[key] = distributed.new_state_buffer(p, shape, dtype)
        else:
            st[key] = torch.zeros(shape, dtype=dtype, device=p.device)
    return st


def _saturated(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` clamped to ``dtype``'s finite range when that is narrower (as the EMA update does:
    weights near float32's largest value would otherwise start a bf16 average at inf)."""
    big = torch.finfo(dtype).max
    return x.clamp(-big, big) if torch.finfo(x.dtype).max > big else x
