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

from . import _fused_cpu, ops  # (ops registers torch.ops.adafactor.step_)
from ._plan import GroupPlan, Momentum, plan_of
from ._reference import norm_clip_factor, rounding_noise
from ._validation import resolve_lr
from .distributed import has_dtensor
from .factoring import FactorDims, factor_dims

__all__ = [
    "GroupResult",
    "MissingStateError",
    "adafactor",
    "found_inf",
    "global_grad_scale",
    "group_op_args",
    "group_plan",
    "step_lr",
]


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
    index (Keras' convention; the group's first stepped tensor's counter, read on the host,
    or passed as a tensor while torch.compile traces)."""
    if callable(lr) and not isinstance(lr, Tensor):
        if torch.compiler.is_compiling() and states:
            # traced, the schedule gets the counter as a 0-d tensor (as Keras passes its
            # iteration): a schedule written with torch ops traces without a host read
            return resolve_lr(lr, states[0]["step"] + 0)
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
    if impl == "fused" and any(p.device.type == "cpu" for p in params):
        _fused_cpu.load()  # raises FusedUnavailableError naming the cause and the fix
    if has_dtensor(params):  # sharded parameters: local passes plus batched collectives
        from .distributed.dtensor import sharded_adafactor_step

        _state_lists(params, states, _dims_list(params, group), plan)  # before anything changes
        lr_t = step_lr(group["lr"], states)
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
    op = group_op_args(
        params,
        grads,
        states,
        group,
        plan,
        grad_scale=global_grad_scale,
        found_inf=found_inf,
        generator=generator,
    )
    alpha, update_rms = torch.ops.adafactor.step_(*op, *plan.as_args())
    return GroupResult(op.lr, alpha, update_rms)


def group_op_args(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    plan: GroupPlan,
    *,
    lr: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ops.OpArgs:
    """The tensor arguments of ``torch.ops.adafactor.step_`` for one group's step (its plan's
    options, ``plan.as_args()``, follow them): the state lists the plan needs, the factored
    dims, lr_t (``lr``, or the group's lr or schedule: :func:`step_lr`) and with stochastic
    rounding the noise for bf16 parameters, drawn from ``generator``. Raises
    :class:`MissingStateError` (nothing changed, nothing drawn) when a state tensor the options
    need is missing."""
    dims = _dims_list(params, group)
    steps, row_vars, col_vars, variances, exp_avgs, emas, kahan_comps = _state_lists(
        params, states, dims, plan
    )
    if lr is None:
        lr = _as_tensor(step_lr(group["lr"], states))
    noise: list[Tensor] = []
    if plan.stochastic_rounding and any(p.dtype == torch.bfloat16 for p in params):
        noise = [_noise(p, generator) for p in params]
    return ops.OpArgs(
        params=params,
        grads=grads,
        steps=steps,
        row_vars=row_vars,
        col_vars=col_vars,
        variances=variances,
        exp_avgs=exp_avgs,
        emas=emas,
        noise=noise,
        kahan_comps=kahan_comps,
        factor_dims=[i for d in dims for i in (d if d is not None else (-1, -1))],
        lr=lr,
        grad_scale=grad_scale,
        found_inf=found_inf,
        skipped_steps=group["skipped_steps"],
    )


def global_grad_scale(grads: list[Tensor], max_norm: float) -> Tensor | None:
    """The factor min(1, max_norm / ||g||) of global_clipnorm over every gradient (a 0-d tensor,
    no host read); None without gradients. DTensor shards: local sums, one all-reduce."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return None
    if has_dtensor(grads):
        from .distributed import grad_square_sum

        sq_sum = grad_square_sum(grads)
    else:
        # float64 accumulation: finite gradients never overflow the norm (and no fp32 copies)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        sq_sum = torch.stack(norms).square().sum()
    return norm_clip_factor(sq_sum, max_norm)


def found_inf(grads: list[Tensor]) -> Tensor:
    """A bool tensor: some gradient holds inf or NaN (the max-abs norm is not finite; no sync).
    DTensor shards: decided alike on every rank, so all skip the same steps."""
    if has_dtensor(grads):
        from .distributed import found_inf as sharded_found_inf

        return sharded_found_inf(grads)
    grads = [g for g in grads if g.numel()]  # (an empty max-abs norm has no value)
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm(grads, float("inf"))
    return torch.stack(norms).isfinite().all().logical_not()


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


class MissingStateError(KeyError):
    """A state tensor the group's options need is missing (raised before anything changed):
    an option was turned on after the first step, or the state was never created."""


def _state_lists(
    params: list[Tensor],
    states: list[dict[str, Any]],
    dims: list[FactorDims | None],
    plan: GroupPlan,
) -> tuple[list[Tensor], ...]:
    """The op's state lists: steps, row_vars, col_vars, variances, exp_avgs, emas, kahan_comps."""
    try:
        steps = [st["step"] for st in states]
        variances = [st["variance"] for d, st in zip(dims, states) if d is None]
        factored = [st for d, st in zip(dims, states) if d is not None]
        row_vars = [st["row_var"] for st in factored]
        col_vars = [st["col_var"] for st in factored]
        exp_avgs = [st["exp_avg"] for st in states] if plan.momentum != Momentum.NONE else []
        emas = [st["ema"] for st in states] if plan.use_ema else []
        kahan_comps: list[Tensor] = []
        if plan.kahan_summation and any(p.dtype == torch.bfloat16 for p in params):
            kahan_comps = [_comp(p, st) for p, st in zip(params, states)]
    except KeyError as exc:
        raise MissingStateError(*exc.args) from None
    return steps, row_vars, col_vars, variances, exp_avgs, emas, kahan_comps


def _comp(p: Tensor, state: dict[str, Any]) -> Tensor:
    # non-bf16 parameters keep no compensation: a fresh empty tensor (mutated lists must not alias)
    if p.dtype == torch.bfloat16:
        return state["kahan_comp"]
    return p.new_empty(0, dtype=torch.bfloat16)


# factoring options -> parameter shape -> factored dims (a lookup per tensor per step)
_DIMS: dict[tuple[Any, ...], dict[torch.Size, FactorDims | None]] = {}


def _dims_list(params: list[Tensor], group: dict[str, Any]) -> list[FactorDims | None]:
    options = (group["factor_dims"], group["min_dim_size_to_factor"], group["factored"])
    by_shape = _DIMS.setdefault(options, {})
    shapes = [p.shape for p in params]
    try:
        return list(map(by_shape.__getitem__, shapes))
    except KeyError:  # a shape seen for the first time
        for shape in shapes:
            if shape not in by_shape:
                by_shape[shape] = factor_dims(tuple(shape), *options)
        return list(map(by_shape.__getitem__, shapes))


def _dims_of(p: Tensor, group: dict[str, Any]) -> FactorDims | None:
    return _dims_list([p], group)[0]
