r"""The readable Adafactor math: one tensor, one step, in the paper's order.

This module is the specification every other path (fused kernels, sharded tensors) must match.
It follows Algorithms 4 (matrices) and 5 (vectors) of Shazeer & Stern (2018), with the options
every public implementation added, and is organised in the three passes over the tensor that the
algorithm needs (each sum below is taken over the whole tensor, so a pass must finish before the
next can start):

.. code-block:: text

    pass 1  statistics   sums of g^2 per row and per column (factored) and of x^2 and g^2
            -- small-tensor work: clip factor of g, moving averages R and C, step size alpha --
    pass 2  update RMS   U = g / sqrt(V_hat)   (the full second moment V is updated here)
    pass 3  apply        X <- decay(X) - alpha * U / max(1, RMS(U) / d)   (momentum here)

A distributed driver runs pass 1 of every tensor, all-reduces the partial sums once, and so on;
the single-device driver :func:`adafactor_tensor_step` chains the passes directly.

Notation: ``t`` is the 1-based step, ``g`` the gradient, ``x`` the parameter; all arithmetic runs
in float32 (float64 for float64 parameters) whatever the storage dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .factoring import FactorDims, factor_dims

__all__ = [
    "GradSums",
    "TensorStep",
    "adafactor_tensor_step",
    "apply_update",
    "beta2_at",
    "compute_dtype",
    "grad_square_sums",
    "relative_step_size",
    "stochastic_round_to_bf16",
    "update_factors",
    "update_square_sum",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def beta2_at(
    t: int, beta2_decay: float, beta2_cap: float | None, beta2: float | None = None
) -> float:
    r"""Second-moment decay :math:`\hat\beta_{2t}` of step ``t``, computed in float64.

    Default: :math:`1 - t^{c}` (``c = beta2_decay``), optionally capped by ``beta2_cap``. With a
    fixed ``beta2`` it is Adam's decay with the bias correction folded in (the paper's section 7,
    T2T's ``adafactor_decay_rate_adam``): :math:`\beta_2(1-\beta_2^{t-1})/(1-\beta_2^t)`.
    Either way it is 0 at t = 1 and never rounds to 1 early (tf_keras computes it in the
    parameter dtype, which freezes bf16 training at t ~ 3000).
    """
    if beta2 is not None:
        decay = beta2 * (1.0 - beta2 ** (t - 1)) / (1.0 - beta2**t)
    else:
        decay = 1.0 - float(t) ** beta2_decay
    return decay if beta2_cap is None else min(beta2_cap, decay)


def relative_step_size(
    lr: float | Tensor, t: int, relative_step: bool, warmup_init: bool
) -> float | Tensor:
    r"""The step size :math:`\rho_t`.

    ``relative_step``: :math:`\rho_t = \min(lr_t, 1/\sqrt{t})` (the paper's
    :math:`\min(10^{-2}, 1/\sqrt t)` at ``lr=1e-2``); ``warmup_init`` also caps it by
    :math:`10^{-6} t` (transformers' linear warm-up). Otherwise :math:`\rho_t = lr_t`.
    """
    if not relative_step:
        return lr
    cap = 1.0 / math.sqrt(t)
    if warmup_init:
        cap = min(cap, 1e-6 * t)
    if isinstance(lr, Tensor):
        return lr.clamp(max=cap)
    return min(lr, cap)


class GradSums:
    """Pass-1 partial sums of one tensor; a sharded driver all-reduces them before use."""

    __slots__ = ("col", "grad_sq", "param_sq", "row")

    def __init__(self, grad_sq: Tensor, param_sq: Tensor, row: Tensor | None, col: Tensor | None):
        self.grad_sq = grad_sq  # sum of g^2 over the tensor (0-d)
        self.param_sq = param_sq  # sum of x^2 over the tensor (0-d)
        self.row = row  # sum of g^2 over col_dim, keepdim (factored only)
        self.col = col  # sum of g^2 over row_dim, keepdim (factored only)


@dataclass
class TensorStep:
    """Everything one tensor's step needs, resolved from its param group and state."""

    param: Tensor
    grad: Tensor  # float32 (float64) gradient after maximize and clipvalue, before norm clipping
    state: dict[str, Any]
    group: dict[str, Any]
    dims: FactorDims | None
    numel: int  # elements of the whole (unsharded) tensor
    shape: tuple[int, ...]  # shape of the whole (unsharded) tensor
    t: int
    lr: float | Tensor  # lr_t: the scheduled learning rate of this step
    beta2: float
    rho: float | Tensor
    grad_scale: float | Tensor = 1.0  # clipnorm / global_clipnorm factor, set after pass 1
    alpha: float | Tensor = 0.0  # step size alpha_t, set after pass 1
    update: Tensor | None = None  # U (or momentum-based numerator / sqrt(V_hat)), pass 2
    update_rms: Tensor | None = None  # RMS(U) before clipping, set after pass 2
    row_var_mean: Tensor | None = None  # mean of R over rows; a sharded driver sets the reduced one


def prepare(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    lr: float | Tensor,
    shape: tuple[int, ...] | None = None,
) -> TensorStep:
    """Resolve the scalars of this step (t, beta2_t, rho_t) and the effective gradient.

    ``state['step']`` must already be incremented. ``shape`` is the unsharded shape (defaults to
    ``param.shape``).
    """
    shape = tuple(param.shape) if shape is None else tuple(shape)
    t = int(state["step"].item())
    g = grad.to(compute_dtype(param.dtype))
    if group["maximize"]:
        g = -g
    if group["clipvalue"] is not None:
        g = g.clamp(-group["clipvalue"], group["clipvalue"])
    return TensorStep(
        param=param,
        grad=g,
        state=state,
        group=group,
        dims=factor_dims(
            shape, group["factor_dims"], group["min_dim_size_to_factor"], group["factored"]
        ),
        numel=math.prod(shape),
        shape=shape,
        t=t,
        lr=lr,
        beta2=beta2_at(t, group["beta2_decay"], group["beta2_cap"], group["beta2"]),
        rho=relative_step_size(lr, t, group["relative_step"], group["warmup_init"]),
    )


# ---------------------------------------------------------------------------------------------
# pass 1: statistics
# ---------------------------------------------------------------------------------------------
def grad_square_sums(ts: TensorStep) -> GradSums:
    """Pass 1: local sums of g^2 (per row and column when factored) and of x^2."""
    g_sq = ts.grad.square()
    x = ts.param.to(ts.grad.dtype)
    row = col = None
    if ts.dims is not None:
        row = g_sq.sum(ts.dims.col_dim, keepdim=True)
        col = g_sq.sum(ts.dims.row_dim, keepdim=True)
    return GradSums(g_sq.sum(), x.square().sum(), row, col)


def norm_clip_factor(sq_sum: Tensor, max_norm: float) -> Tensor:
    """``max_norm / max(||g||, max_norm)``: Keras' clip_by_norm / clip_by_global_norm factor."""
    return max_norm / sq_sum.sqrt().clamp(min=max_norm)


def step_size(ts: TensorStep, param_sq: Tensor) -> float | Tensor:
    r"""alpha_t = max(eps2, RMS(x)) * rho_t with ``scale_parameter``, else rho_t.

    Under ``weight_decay_mode='lr_before'`` (Keras) x is decayed before the step, so RMS is
    measured on the decayed tensor: RMS((1 - lr wd) x) = |1 - lr wd| RMS(x).
    """
    group = ts.group
    if not group["scale_parameter"]:
        return ts.rho
    param_rms = (param_sq / max(ts.numel, 1)).sqrt()
    if group["weight_decay_mode"] == "lr_before" and group["weight_decay"]:
        param_rms = param_rms * abs(1 - ts.lr * group["weight_decay"])
    return param_rms.clamp(min=group["eps2"]) * ts.rho


def update_factors(ts: TensorStep, sums: GradSums) -> None:
    r"""Moving averages of the row and column means of g^2 (+ eps1):

    :math:`R_t = \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\mathrm{mean}_{cols}(G^2+\epsilon_1)`
    and likewise :math:`C_t` over rows. Means, not the paper's sums: V_hat = R C / mean(R) is the
    same, and means do not grow with the tensor size.
    """
    assert ts.dims is not None and sums.row is not None and sums.col is not None
    eps1 = _eps1(ts) if ts.group["eps1_mode"] == "add" else 0.0
    scale_sq = _square(ts.grad_scale)
    row_mean = sums.row * (scale_sq / ts.shape[ts.dims.col_dim]) + eps1
    col_mean = sums.col * (scale_sq / ts.shape[ts.dims.row_dim]) + eps1
    weight = 1.0 - ts.beta2
    ts.state["row_var"].lerp_(row_mean.to(ts.state["row_var"].dtype), weight)
    ts.state["col_var"].lerp_(col_mean.to(ts.state["col_var"].dtype), weight)


# ---------------------------------------------------------------------------------------------
# pass 2: the normalised update U and its RMS
# ---------------------------------------------------------------------------------------------
def update_square_sum(ts: TensorStep) -> Tensor:
    r"""Pass 2: U = G / sqrt(V_hat) and the local sum of U^2.

    Factored: :math:`\hat V = R C / \mathrm{mean}_{rows}(R)`; otherwise the full moving average
    :math:`V_t = \hat\beta_{2t} V_{t-1} + (1-\hat\beta_{2t})(G^2 + \epsilon_1)` is updated here.
    With ``momentum_kind='grad'`` the numerator is the moving average of the gradient instead of G.
    """
    group, state = ts.group, ts.state
    g = ts.grad * ts.grad_scale
    clamp = group["eps1_mode"] == "clamp"
    eps1 = _eps1(ts)
    if ts.dims is not None:
        row_var = state["row_var"].to(g.dtype)
        col_var = state["col_var"].to(g.dtype)
        row_mean = ts.row_var_mean
        if row_mean is None:  # a shard's rows alone would give a local mean
            row_mean = row_var.mean(ts.dims.row_dim, keepdim=True)
        if clamp:  # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            v_hat = (row_var * col_var / row_mean.clamp(min=eps1)).clamp(min=eps1 * eps1)
        else:
            v_hat = row_var / row_mean * col_var
    else:
        variance = state["variance"]
        new_sq = g.square() if clamp else g.square() + eps1
        variance.lerp_(new_sq.to(variance.dtype), 1.0 - ts.beta2)
        v_hat = variance.to(g.dtype)
        if clamp:
            v_hat = v_hat.clamp(min=eps1 * eps1)
    numerator = g
    if _momentum(group) == "grad":
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(g.to(exp_avg.dtype), 1.0 - group["beta1"])
        numerator = exp_avg.to(g.dtype)
    ts.update = numerator * v_hat.rsqrt()
    return ts.update.square().sum()


# ---------------------------------------------------------------------------------------------
# pass 3: clip, momentum, weight decay, write
# ---------------------------------------------------------------------------------------------
def apply_update(ts: TensorStep, update_sq_sum: Tensor, generator: torch.Generator | None) -> None:
    r"""Pass 3: :math:`\hat U = U / \max(1, \mathrm{RMS}(U)/d)`, then
    :math:`X_t = \mathrm{decay}(X_{t-1}) - \alpha_t \hat U` (or the momentum of it)."""
    group, state = ts.group, ts.state
    assert ts.update is not None
    ts.update_rms = (update_sq_sum / max(ts.numel, 1)).sqrt()
    update = ts.update
    if group["clip_threshold"] is not None:
        update = update / (ts.update_rms / group["clip_threshold"]).clamp(min=1.0)
    momentum = _momentum(group)
    if momentum == "normalized_update":  # big_vision: momentum of U_hat, before the step size
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(update.to(exp_avg.dtype), 1.0 - group["beta1"])
        update = exp_avg.to(update.dtype)
    update = update * ts.alpha
    if momentum == "update":  # Tensor2Tensor / transformers / optax: momentum of alpha U_hat
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(update.to(exp_avg.dtype), 1.0 - group["beta1"])
        update = exp_avg.to(update.dtype)

    x = ts.param.to(update.dtype)  # a copy for low-precision parameters
    wd = group["weight_decay"]
    if wd:
        mode = group["weight_decay_mode"]
        if mode == "lr":  # torch.optim: x.mul_(1 - lr wd)
            x = x * (1 - ts.lr * wd)
        elif mode == "lr_before":  # Keras: x - x wd lr (1 - 1e-5 would round in float32)
            x = x - x * (ts.lr * wd)
        elif mode == "alpha":
            x = x - x * (ts.alpha * wd)
        else:  # "unscaled"
            x = x - x * wd
    x = x - update
    if ts.param.dtype == torch.bfloat16 and group["stochastic_rounding"]:
        ts.param.copy_(stochastic_round_to_bf16(x, generator))
    else:
        ts.param.copy_(x)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 ``x`` to bfloat16 up or down with probability given by the remainder.

    Adds a uniform random 16-bit integer to the low half of each float32 bit pattern and truncates,
    so E[round(x)] = x: small updates survive on average instead of being rounded away.
    """
    bits = x.to(torch.float32).view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    rounded = (bits + noise) & -65536  # clear the low 16 bits
    return rounded.view(torch.float32).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# one tensor, all passes
# ---------------------------------------------------------------------------------------------
def adafactor_tensor_step(
    ts: TensorStep,
    global_grad_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Run the three passes on one unsharded tensor (the single-device reference path)."""
    sums = grad_square_sums(ts)
    finish_statistics(ts, sums, global_grad_scale)
    apply_update(ts, update_square_sum(ts), generator)


def finish_statistics(ts: TensorStep, sums: GradSums, global_grad_scale: Tensor | None) -> None:
    """Between passes 1 and 2: gradient clip factor, step size, factored moving averages."""
    if ts.group["clipnorm"] is not None:
        ts.grad_scale = norm_clip_factor(sums.grad_sq, ts.group["clipnorm"])
    elif global_grad_scale is not None:
        ts.grad_scale = global_grad_scale
    ts.alpha = step_size(ts, sums.param_sq)
    if ts.dims is not None:
        update_factors(ts, sums)


def _eps1(ts: TensorStep) -> float:
    eps1 = ts.group["eps1"]
    if eps1 is None:  # torch.optim.Adafactor: machine epsilon of the parameter dtype
        return torch.finfo(ts.param.dtype).eps
    return float(eps1)


def _momentum(group: dict[str, Any]) -> str | None:
    return group["momentum_kind"] if group["beta1"] else None


def _square(value: float | Tensor) -> float | Tensor:
    return value * value
