"""``adafactor_step``: step the tensors of one param group; chooses the implementation, no math.

The math lives in :mod:`adafactor._reference`. This module resolves per-tensor scalars (step,
scheduled learning rate), runs the chosen implementation, and applies the weight EMA.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _reference as ref
from ._validation import resolve_lr

__all__ = ["GroupResult", "adafactor_step"]


class GroupResult(NamedTuple):
    """Per-tensor diagnostics of one group's step (device tensors; no host sync to build)."""

    lr: float | Tensor  # lr_t of the step
    alphas: list[Tensor]  # alpha_t of each tensor that was stepped
    update_rms: list[Tensor]  # RMS(U) before clipping, same order


def adafactor_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    *,
    global_grad_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> GroupResult:
    """One Adafactor step for ``params`` (all in ``group``) with state already initialised.

    ``global_grad_scale`` is the global_clipnorm factor shared by all tensors, if any.
    """
    alphas: list[Tensor] = []
    update_rms: list[Tensor] = []
    lr_t: float | Tensor = 0.0
    for p, g, state in zip(params, grads, states):
        state["step"] += 1
        lr_t = resolve_lr(group["lr"], int(state["step"].item()) - 1)
        if p.numel() == 0:
            continue
        ts = ref.prepare(p, g, state, group, lr_t)
        ref.adafactor_tensor_step(ts, global_grad_scale, generator)
        assert ts.update_rms is not None
        alphas.append(torch.as_tensor(ts.alpha, dtype=torch.float32))
        update_rms.append(ts.update_rms.float())
        if group["use_ema"]:
            update_ema(p, state, group)
    return GroupResult(lr_t, alphas, update_rms)


def update_ema(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """ema <- m * ema + (1 - m) * x; every ``ema_overwrite_frequency`` steps x <- ema (Keras)."""
    ema, momentum = state["ema"], group["ema_momentum"]
    # tf_keras' expression (two products and a sum), so the EMA rounds as it does there.
    ema.copy_(ema * momentum + p.to(ema.dtype) * (1 - momentum))
    freq = group["ema_overwrite_frequency"]
    if freq is not None and int(state["step"].item()) % freq == 0:
        p.copy_(ema)
