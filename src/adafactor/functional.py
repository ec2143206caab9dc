"""``adafactor``: one param group's step, as one call of the registered op; no math here.

The math lives in :mod:`adafactor._reference` and the kernels. This module turns a group into
the op's arguments (its plan, the tensor lists, the learning rate of the step) and calls
``torch.ops.adafactor.step_``, or the sharded driver for DTensor parameters. It reads no device
tensor on the host, so it traces under ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import (
    _fused_cpu,
    ops,  # noqa: F401  (registers torch.ops.adafactor.step_)
)
from ._plan import GroupPlan, Momentum, plan_of
from ._reference import rounding_noise
from ._validation import resolve_lr
from .distributed import has_dtensor
from .factoring import FactorDims, factor_dims

__all__ = ["GroupResult", "adafactor", "group_plan", "step_lr"]


class GroupResult(NamedTuple):
    """Per-tensor diagnostics of one group's step (tensors; no host sync to build)."""

    lr: Tensor  # lr_t of the step (0-d float64; a tensor so a changing lr never recompiles)
    alpha: Tensor  # alpha_t of each tensor that was stepped (float32)
    update_rms: Tensor  # RMS(U) before clipping, same order


def group_plan(group: dict[str, Any], impl: str, carry_param_rms: bool) -> GroupPlan:
    """The plan of ``group``: its options and the implementation to run."""
    return plan_of(group, impl=impl, carry_param_rms=carry_param_rms)


def step_lr(lr: Any, states: list[dict[str, Any]]) -> float | Tensor:
    """lr_t of the coming step: the float or tensor itself, or a schedule of the 0-based update
    index (Keras' convention; the group's first stepped tensor's counter, read on the host)."""
    if callable(lr) and not isinstance(lr, Tensor):
        return resolve_lr(lr, int(states[0]["step"]) if states else 0)
    return lr


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    *,
    global_grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
    carry_param_rms: bool = True,
) -> GroupResult:
    """One Adafactor step for ``params`` (all in ``group``), whose state is initialised.

    ``global_grad_scale`` is the global_clipnorm factor shared by all tensors, if any;
    ``found_inf`` (a bool tensor) skips the step when true (``skip_nonfinite``), counting it in
    ``group["skipped_steps"]``; ``generator`` drives stochastic rounding.
    """
    plan = group_plan(group, impl, carry_param_rms)
    lr_t = step_lr(group["lr"], states)
    if impl == "fused" and any(p.device.type == "cpu" for p in params):
        _fused_cpu.load()  # raises FusedUnavailableError naming the cause and the fix
    if has_dtensor(params):  # sharded parameters: local passes plus batched collectives
        from .distributed.dtensor import sharded_adafactor_step

        if plan.kahan_summation and any(p.dtype == torch.bfloat16 for p in params):
            raise NotImplementedError(
                "kahan_summation=True is not implemented for DTensor (sharded) parameters yet; "
                "use stochastic_rounding=True for bf16 parameters under FSDP2 / tensor parallel"
            )
        if found_inf is not None and bool(found_inf):  # decided alike on every rank
            group["skipped_steps"] += 1
            zeros = torch.zeros(len(params), dtype=torch.float32)
            return GroupResult(_as_tensor(lr_t), zeros, zeros)
        _, alpha, rms = sharded_adafactor_step(
            params, grads, states, group, plan, lr_t, global_grad_scale, generator
        )
        return GroupResult(_as_tensor(lr_t), alpha, rms)
    dims = [_dims_of(p, group) for p in params]
    row_vars, col_vars, variances = [], [], []
    for d, state in zip(dims, states):
        if d is None:
            variances.append(state["variance"])
        else:
            row_vars.append(state["row_var"])
            col_vars.append(state["col_var"])
    noise: list[Tensor] = []
    if plan.stochastic_rounding and any(p.dtype == torch.bfloat16 for p in params):
        noise = [_noise(p, generator) for p in params]
    kahan_comps: list[Tensor] = []
    if plan.kahan_summation and any(p.dtype == torch.bfloat16 for p in params):
        kahan_comps = [_comp(p, state) for p, state in zip(params, states)]
    lr_tensor = _as_tensor(lr_t)
    alpha, update_rms = torch.ops.adafactor.step_(
        params,
        grads,
        [state["step"] for state in states],
        row_vars,
        col_vars,
        variances,
        [state["exp_avg"] for state in states] if plan.momentum != Momentum.NONE else [],
        [state["ema"] for state in states] if plan.use_ema else [],
        noise,
        kahan_comps,
        [i for d in dims for i in (d if d is not None else (-1, -1))],
        lr_tensor,
        global_grad_scale,
        found_inf,
        group["skipped_steps"],
        *plan.as_args(),
    )
    return GroupResult(lr_tensor, alpha, update_rms)


def _as_tensor(lr: float | Tensor) -> Tensor:
    # A product keeps a float lr symbolic under torch.compile, so a new lr reuses the graph;
    # torch.tensor(lr) or torch.full((), lr) would bake the value in and recompile.
    if isinstance(lr, Tensor):
        return lr.reshape(())
    return torch.ones((), dtype=torch.float64) * lr


_EMPTY_NOISE = torch.empty(0, dtype=torch.int32)


def _noise(p: Tensor, generator: torch.Generator | None) -> Tensor:
    # the reference's draws, in parameter order; float32 parameters are never rounded
    return rounding_noise(p, generator) if p.dtype == torch.bfloat16 else _EMPTY_NOISE


def _comp(p: Tensor, state: dict[str, Any]) -> Tensor:
    # non-bf16 parameters keep no compensation: a fresh empty tensor (mutated lists must not alias)
    comp = state.get("kahan_comp")
    return comp if comp is not None else p.new_empty(0, dtype=torch.bfloat16)


_DIMS: dict[tuple[Any, ...], FactorDims | None] = {}


def _dims_of(p: Tensor, group: dict[str, Any]) -> FactorDims | None:
    key = (p.shape, group["factor_dims"], group["min_dim_size_to_factor"], group["factored"])
    if key not in _DIMS:
        _DIMS[key] = factor_dims(tuple(p.shape), *key[1:])
    return _DIMS[key]
