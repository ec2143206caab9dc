"""``adafactor_step``: step the tensors of one param group; chooses the implementation, no math.

The math lives in :mod:`adafactor._reference`. This module resolves per-tensor scalars (step,
scheduled learning rate), runs the chosen implementation, and applies the weight EMA.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _fused_cpu
from . import _reference as ref
from ._validation import resolve_lr
from .distributed import has_dtensor
from .kernels import triton_module

__all__ = ["GroupResult", "adafactor_step", "advance_steps"]


class GroupResult(NamedTuple):
    """Per-tensor diagnostics of one group's step (device tensors; no host sync to build)."""

    lr: float | Tensor  # lr_t of the step
    alphas: list[Tensor | float]  # alpha_t of each tensor that was stepped (float: host value)
    update_rms: list[Tensor | float]  # RMS(U) before clipping, same order


def adafactor_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    *,
    global_grad_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
    carry_param_rms: bool = False,
) -> GroupResult:
    """One Adafactor step for ``params`` (all in ``group``) with state already initialised.

    ``global_grad_scale`` is the global_clipnorm factor shared by all tensors, if any;
    ``carry_param_rms`` lets the fused CPU path reuse the previous step's sum of x^2.
    """
    if has_dtensor(params):  # sharded parameters: local passes plus batched collectives
        from .distributed.dtensor import sharded_adafactor_step

        out = sharded_adafactor_step(
            params, grads, states, group, global_grad_scale, generator, _use_fused(impl)
        )
        return GroupResult(*out)
    use_fused = _use_fused(impl)
    alphas: list[Tensor | float] = []
    update_rms: list[Tensor | float] = []
    lr_t: float | Tensor = 0.0
    stale: list[tuple[tuple[int, ...], float]] = []  # carried RMS(x) that proved stale
    advance_steps(states)
    for p, g, state in zip(params, grads, states):
        lr_t = resolve_lr(group["lr"], int(state["step"].item()) - 1)
        if p.numel() == 0:
            continue
        if use_fused and _fused_cpu.supports(p, g, state):
            fs = _fused_cpu.tensor_step(
                p, g, state, group, lr_t, global_grad_scale, generator, carry_param_rms
            )
            alphas.append(fs.alpha)
            update_rms.append(fs.update_rms)
            if fs.stale_rms is not None:
                stale.append((tuple(p.shape), fs.stale_rms))
        elif impl == "triton" and global_grad_scale is None and _triton_ok(p, g, state, group):
            alpha_t, rms_t = triton_module().tensor_step(p, g, state, group, lr_t)
            alphas.append(alpha_t)
            update_rms.append(rms_t)
        else:
            ts = ref.prepare(p, g, state, group, lr_t)
            ref.adafactor_tensor_step(ts, global_grad_scale, generator)
            assert ts.update_rms is not None
            alphas.append(ts.alpha)  # float32 when the optimizer stacks the stats
            update_rms.append(ts.update_rms)
        if group["use_ema"]:
            update_ema(p, state, group)
    if stale:
        _fused_cpu.warn_stale_rms(stale)
    return GroupResult(lr_t, alphas, update_rms)


def advance_steps(states: list[dict[str, Any]]) -> None:
    """t <- t + 1 for every tensor of a group in one call (a per-tensor ``+= 1`` costs ~2 us)."""
    if states:
        torch._foreach_add_([state["step"] for state in states], 1.0)


def _use_fused(impl: str) -> bool:
    """impl='fused' insists on the C kernel (clear error if it cannot build); 'auto' uses it when it
    builds, except while torch.compile traces (the traced reference stays graph-friendly)."""
    if impl == "reference" or torch.compiler.is_compiling():
        return False
    if impl == "fused":
        _fused_cpu.load()  # raises FusedUnavailableError naming the cause and the fix
        return True
    return _fused_cpu.available()


def _triton_ok(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
    # impl="triton" is opt-in until the kernels have been timed on a GPU; CUDA tensors only
    return (
        p.is_cuda
        and not torch.compiler.is_compiling()
        and triton_module().supports(p, g, state, group)
    )


def update_ema(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """ema <- m * ema + (1 - m) * x; every ``ema_overwrite_frequency`` steps x <- ema (Keras)."""
    ema, momentum = state["ema"], group["ema_momentum"]
    # tf_keras' expression (two products and a sum), so the EMA rounds as it does there.
    ema.copy_(ema * momentum + p.to(ema.dtype) * (1 - momentum))
    freq = group["ema_overwrite_frequency"]
    if freq is not None and int(state["step"].item()) % freq == 0:
        p.copy_(ema)
