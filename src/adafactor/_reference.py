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

:mod:`adafactor._driver` sequences the passes, for one device and for DTensor shards (which
all-reduce the partial sums between them).

Notation: ``t`` is the 1-based step, ``g`` the gradient, ``x`` the parameter; all arithmetic runs
in float32 (float64 for float64 parameters) whatever the storage dtype, except that the sums over
the tensor accumulate in float64 and the scalars taken from them (the clip factor, alpha_t, the
scale of the row and column means) are computed in float64 and rounded to the math dtype where
they meet a tensor. A finite gradient whose statistics do not fit float32 takes the float64 path
(:meth:`TensorStep.widen`, :func:`beyond_float32`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._plan import Eps1Mode, GroupPlan, Momentum, StepScalars, WeightDecay
from .factoring import FactorDims

__all__ = [
    "GradSums",
    "TensorStep",
    "apply_update",
    "beyond_float32",
    "compute_dtype",
    "grad_square_sums",
    "kahan_round_to_bf16",
    "rounding_noise",
    "stochastic_round_to_bf16",
    "update_factors",
    "update_square_sum",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class GradSums:
    """Pass-1 partial sums of one tensor, float64; a sharded driver all-reduces them before use."""

    __slots__ = ("col", "grad_sq", "param_sq", "row")

    def __init__(self, grad_sq: Tensor, param_sq: Tensor, row: Tensor | None, col: Tensor | None):
        self.grad_sq = grad_sq  # sum of g^2 over the tensor (0-d)
        self.param_sq = param_sq  # sum of x^2 over the tensor (0-d)
        self.row = row  # sum of g^2 over col_dim, keepdim (factored only)
        self.col = col  # sum of g^2 over row_dim, keepdim (factored only)


@dataclass
class TensorStep:
    """Everything one tensor's step needs: its tensors, the group's plan and the step's scalars."""

    param: Tensor
    grad: Tensor  # float32 (float64) gradient after maximize and clipvalue, before norm clipping
    state: dict[str, Any]
    plan: GroupPlan
    dims: FactorDims | None
    numel: int  # elements of the whole (unsharded) tensor
    shape: tuple[int, ...]  # shape of the whole (unsharded) tensor
    scalars: StepScalars  # t, lr_t, beta2_t, rho_t (adafactor._plan.step_scalars)
    grad_scale: float | Tensor = 1.0  # clipnorm / global_clipnorm factor (float64), after pass 1
    alpha: float | Tensor = 0.0  # step size alpha_t (float64), set after pass 1
    update: Tensor | None = None  # U (or momentum-based numerator / sqrt(V_hat)), pass 2
    update_rms: Tensor | None = None  # RMS(U) before clipping, set after pass 2
    row_var_mean: Tensor | None = None  # mean of R over rows; a sharded driver sets the reduced one
    # float64 math with statistics stored narrower (see widen): this step's new statistics,
    # unrounded, by state key (the state keeps them saturated)
    wide: dict[str, Tensor] | None = None

    @property
    def lr(self) -> float | Tensor:
        return self.scalars.lr

    def widen(self) -> None:
        """Float64 math from pass 1 on, for a finite gradient whose statistics overflow float32
        (:func:`beyond_float32`), which would otherwise turn the whole tensor into NaN. Pass 1
        changes nothing, so the driver can decide after it."""
        self.grad, self.wide = self.grad.double(), {}


def prepare(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    plan: GroupPlan,
    scalars: StepScalars,
    dims: FactorDims | None,
    shape: tuple[int, ...] | None = None,
) -> TensorStep:
    """The effective gradient (sign, clipvalue) and the tensor's step record.

    ``shape`` is the unsharded shape (defaults to ``param.shape``); ``dims`` its factored dims.
    """
    shape = tuple(param.shape) if shape is None else tuple(shape)
    stats = [state[k] for k in ("row_var", "col_var", "variance") if k in state]
    dtype = compute_dtype(param.dtype)
    if any(t.dtype == torch.float64 for t in stats):  # float64 statistics: float64 math
        dtype = torch.float64
    g = grad.to(dtype)
    if plan.maximize:
        g = -g
    if plan.clipvalue is not None:
        g = g.clamp(-plan.clipvalue, plan.clipvalue)
    ts = TensorStep(
        param=param,
        grad=g,
        state=state,
        plan=plan,
        dims=dims,
        numel=math.prod(shape),
        shape=shape,
        scalars=scalars,
    )
    if dtype == torch.float64 and any(t.dtype != torch.float64 for t in stats):
        ts.wide = {}  # float64 math, narrower statistics: store them saturated (see _average)
    return ts


# ---------------------------------------------------------------------------------------------
# pass 1: statistics
# ---------------------------------------------------------------------------------------------
def grad_square_sums(ts: TensorStep) -> GradSums:
    """Pass 1: local sums of g^2 (per row and column when factored) and of x^2.

    g^2 is taken in the math dtype (inf where one overflows float32: :func:`beyond_float32`)
    and summed in float64: a float32 sum of finite squares can overflow, and ||g|| need only be
    finite in float64. x^2 is taken in float64, so RMS(x) is the true one (at most max|x|) even
    for weights whose float32 squares overflow."""
    f64 = torch.float64  # (one float64 copy of the squares: sum(dtype=) copies per sum on CPU)
    g_sq = ts.grad.square().to(f64)
    x_sq = ts.param.to(f64).square()
    row = col = None
    if ts.dims is not None:
        row = g_sq.sum(ts.dims.col_dim, keepdim=True)
        col = g_sq.sum(ts.dims.row_dim, keepdim=True)
    return GradSums(g_sq.sum(), x_sq.sum(), row, col)


def beyond_float32(sums: GradSums) -> bool:
    """Whether float32 math cannot take this step's statistics (pass 1's float64 sums): a square
    g^2 beyond float32 (|g| above about 1.8e19: the sum is then inf, as for a non-finite g, which
    the caller tells apart) or a row or column sum of g^2 beyond it (R and C are float32). The
    sum over the whole tensor may exceed float32: only clipnorm uses it, in float64. The C
    kernel's test (``overflowed`` in csrc/adafactor_cpu.c), so both take the same path."""
    big = torch.finfo(torch.float32).max
    total = float(sums.grad_sq)
    if total <= big / 2:  # every row and column sum of the same squares is at most the total
        return False
    if not math.isfinite(total):
        return True
    parts = [t.flatten() for t in (sums.row, sums.col) if t is not None]
    return bool(parts) and not bool((torch.cat(parts) <= big).all())


def norm_clip_factor(sq_sum: Tensor, max_norm: float) -> Tensor:
    """``max_norm / max(||g||, max_norm)``: Keras' clip_by_norm / clip_by_global_norm factor."""
    return max_norm / sq_sum.sqrt().clamp(min=max_norm)


def step_size(ts: TensorStep, param_sq: Tensor) -> float | Tensor:
    r"""alpha_t = max(eps2, RMS(x)) * rho_t with ``scale_parameter``, else rho_t.

    Under ``weight_decay_mode='lr_before'`` (Keras) x is decayed before the step, so RMS is
    measured on the decayed tensor: RMS((1 - lr wd) x) = |1 - lr wd| RMS(x).
    """
    plan, rho = ts.plan, ts.scalars.rho
    if not plan.scale_parameter:
        return rho
    param_rms = (param_sq / max(ts.numel, 1)).sqrt()
    if plan.weight_decay_mode == WeightDecay.LR_BEFORE and plan.weight_decay:
        param_rms = param_rms * abs(1 - ts.lr * plan.weight_decay)
    # RMS(x) saturated at the math dtype's largest value: float64 squares of float64 weights
    # beyond about 1.3e154 overflow, and inf * rho would make alpha_t inf (NaN at lr = 0) where
    # the true RMS(x) <= max|x| is finite
    big = torch.finfo(ts.grad.dtype).max
    return param_rms.clamp(min=plan.eps2, max=big) * rho


def update_factors(ts: TensorStep, sums: GradSums) -> None:
    r"""Moving averages of the row and column means of g^2 (+ eps1):

    :math:`R_t = \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\mathrm{mean}_{cols}(G^2+\epsilon_1)`
    and likewise :math:`C_t` over rows. Means, not the paper's sums: V_hat = R C / mean(R) is the
    same, and means do not grow with the tensor size.
    """
    assert ts.dims is not None and sums.row is not None and sums.col is not None
    dtype = ts.grad.dtype  # the float64 sums and scales are rounded to the math dtype
    eps1 = _eps1(ts) if ts.plan.eps1_mode == Eps1Mode.ADD else 0.0
    scale_sq = _square(ts.grad_scale)
    row_scale = _to(scale_sq / ts.shape[ts.dims.col_dim], dtype)
    col_scale = _to(scale_sq / ts.shape[ts.dims.row_dim], dtype)
    row_mean = sums.row.to(dtype) * row_scale + eps1
    col_mean = sums.col.to(dtype) * col_scale + eps1
    weight = 1.0 - ts.scalars.beta2
    _average(ts, "row_var", row_mean, weight)
    _average(ts, "col_var", col_mean, weight)


def _average(ts: TensorStep, key: str, new: Tensor, weight: float | Tensor) -> Tensor:
    """state[key] <- lerp(state[key], new, weight); returns the average in the math dtype.

    On the float64 path the average is taken in float64 and stored saturated at the state dtype's
    largest value (a statistic beyond float32's range cannot be stored), and this step uses the
    unrounded one."""
    state = ts.state[key]
    if ts.wide is None:
        state.lerp_(new.to(state.dtype), weight)
        return state.to(ts.grad.dtype)
    avg = state.to(new.dtype).lerp(new, weight)
    big = torch.finfo(state.dtype).max
    state.copy_(avg.clamp(-big, big))
    ts.wide[key] = avg
    return avg


# ---------------------------------------------------------------------------------------------
# pass 2: the normalised update U and its RMS
# ---------------------------------------------------------------------------------------------
def update_square_sum(ts: TensorStep) -> Tensor:
    r"""Pass 2: U = G / sqrt(V_hat) and the local sum of U^2.

    Factored: :math:`\hat V = R C / \mathrm{mean}_{rows}(R)`; otherwise the full moving average
    :math:`V_t = \hat\beta_{2t} V_{t-1} + (1-\hat\beta_{2t})(G^2 + \epsilon_1)` is updated here.
    With ``momentum_kind='grad'`` the numerator is the moving average of the gradient instead of G.
    """
    plan, state = ts.plan, ts.state
    g = ts.grad * _to(ts.grad_scale, ts.grad.dtype)
    clamp = plan.eps1_mode == Eps1Mode.CLAMP
    eps1 = _eps1(ts)
    if ts.dims is not None:
        wide = ts.wide or {}
        row_var = wide.get("row_var", state["row_var"]).to(g.dtype)
        col_var = wide.get("col_var", state["col_var"]).to(g.dtype)
        row_mean = ts.row_var_mean
        if row_mean is None:  # a shard's rows alone would give a local mean
            # (in float64: R of a saturated row would overflow a float32 sum)
            row_mean = row_var.mean(ts.dims.row_dim, keepdim=True, dtype=torch.float64)
            row_mean = row_mean.to(g.dtype)
        if clamp:  # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            v_hat = (row_var * col_var / row_mean.clamp(min=eps1)).clamp(min=eps1 * eps1)
        else:
            # 1/sqrt(V_hat) as the product of a per-row and a per-column factor: the same value
            # computed on the small vectors, and no underflow of R C / mean(R) to 0 (which would
            # give U = inf) when the statistics span more than float32's range after an outlier
            inv_row = row_mean.sqrt() / row_var.sqrt()  # R / mean(R) could underflow to 0
            inv_col = col_var.sqrt().reciprocal()
    else:
        new_sq = g.square() if clamp else g.square() + eps1
        v_hat = _average(ts, "variance", new_sq, 1.0 - ts.scalars.beta2)
        if clamp:
            v_hat = v_hat.clamp(min=eps1 * eps1)
    numerator = g
    if plan.momentum == Momentum.GRAD:
        exp_avg = _lerp_finite_(state["exp_avg"], g, 1.0 - _beta1(plan))
        numerator = exp_avg.to(g.dtype)
    if ts.dims is not None and not clamp:
        ts.update = numerator * inv_row * inv_col
    else:
        ts.update = numerator * v_hat.rsqrt()
    # float64 squares: RMS(U) is the true one (at most max|U|) also where U beside an outlier
    # has float32 squares that overflow (without update clipping)
    return ts.update.to(torch.float64).square().sum()


# ---------------------------------------------------------------------------------------------
# pass 3: clip, momentum, weight decay, write
# ---------------------------------------------------------------------------------------------
def apply_update(ts: TensorStep, update_sq_sum: Tensor, noise: Tensor | None = None) -> None:
    r"""Pass 3: :math:`\hat U = U / \max(1, \mathrm{RMS}(U)/d)`, then
    :math:`X_t = \mathrm{decay}(X_{t-1}) - \alpha_t \hat U` (or the momentum of it).

    ``noise``: the stochastic-rounding draws of a bf16 parameter (:func:`rounding_noise`)."""
    plan, state = ts.plan, ts.state
    assert ts.update is not None
    dtype = ts.update.dtype  # the math dtype
    ts.update_rms = (update_sq_sum / max(ts.numel, 1)).sqrt()
    # saturated where the math overflows (_saturate): without update clipping, U of elements far
    # from an outlier can exceed float32; every finite result is kept bit for bit
    update = _saturate(ts.update, dtype)
    if plan.clip_threshold is not None:
        update = update / _to((ts.update_rms / plan.clip_threshold).clamp(min=1.0), dtype)
    if plan.momentum == Momentum.NORMALIZED_UPDATE:  # big_vision: momentum of U_hat, before alpha
        exp_avg = _lerp_finite_(state["exp_avg"], update, 1.0 - _beta1(plan))
        update = exp_avg.to(dtype)
    alpha = _saturate_scalar(_to(ts.alpha, dtype))
    update = _saturate(update * alpha, dtype)
    if plan.momentum == Momentum.UPDATE:  # Tensor2Tensor / transformers / optax: of alpha U_hat
        exp_avg = _lerp_finite_(state["exp_avg"], update, 1.0 - _beta1(plan))
        update = exp_avg.to(dtype)

    x = ts.param.to(update.dtype)  # a copy for low-precision parameters
    wd = plan.weight_decay
    if wd:
        mode = plan.weight_decay_mode
        if mode == WeightDecay.LR:  # torch.optim: x.mul_(1 - lr wd)
            x = x * (1 - ts.lr * wd)
        elif mode == WeightDecay.LR_BEFORE:  # Keras: x - x wd lr (1 - 1e-5 would round in fp32)
            x = x - x * (ts.lr * wd)
        elif mode == WeightDecay.ALPHA:
            x = x - x * _saturate_scalar(alpha * wd)
        else:  # UNSCALED; an lr of 0 still changes nothing (DCP's get_state_dict steps with it)
            x = x - x * (wd * (ts.lr != 0))
    x = x - update  # (+-inf at most: update is finite, so no inf - inf)
    if ts.param.dtype == torch.bfloat16 and plan.stochastic_rounding:
        assert noise is not None, "stochastic rounding needs the draws of rounding_noise()"
        ts.param.copy_(stochastic_round_to_bf16(_saturate(x, torch.bfloat16), noise))
    elif ts.param.dtype == torch.bfloat16 and plan.kahan_summation and "kahan_comp" in state:
        ts.param.copy_(_kahan_round_saturated(x, state["kahan_comp"]))
    else:
        ts.param.copy_(_saturate(x, ts.param.dtype))


def kahan_round_to_bf16(x: Tensor, comp: Tensor) -> Tensor:
    r"""Round float32 ``x`` to bfloat16 with error feedback through the bf16 buffer ``comp``:

    :math:`t = x + c;\ x_{bf16} = \mathrm{round}(t);\ c \leftarrow \mathrm{bf16}(t - x_{bf16})`.
    The part of an update that rounding drops is carried into the next step's write instead of
    being lost, so updates far below one bf16 ulp accumulate. Updates ``comp`` in place."""
    t = x.to(torch.float32) + comp.to(torch.float32)
    rounded = t.to(torch.bfloat16)
    comp.copy_(t - rounded.to(torch.float32))
    return rounded


def rounding_noise(param: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The stochastic-rounding draws of one step of a bf16 parameter: uniform in [0, 2^16)."""
    return torch.randint(
        0, 1 << 16, param.shape, dtype=torch.int32, device=param.device, generator=generator
    )


def stochastic_round_to_bf16(x: Tensor, noise: Tensor) -> Tensor:
    """Round float32 ``x`` to bfloat16 up or down with probability given by the remainder.

    Adds ``noise``, a uniform random 16-bit integer (:func:`rounding_noise`), to the low half of
    each float32 bit pattern and truncates, so E[round(x)] = x: small updates survive on average
    instead of being rounded away.
    """
    bits = x.to(torch.float32).view(torch.int32)
    rounded = (bits + noise) & -65536  # clear the low 16 bits
    return rounded.view(torch.float32).to(torch.bfloat16)


def finish_statistics(ts: TensorStep, sums: GradSums, global_grad_scale: Tensor | None) -> None:
    """Between passes 1 and 2: gradient clip factor, step size (both float64, from the float64
    sums), factored moving averages."""
    if ts.plan.clipnorm is not None:
        ts.grad_scale = norm_clip_factor(sums.grad_sq, ts.plan.clipnorm)
    elif global_grad_scale is not None:
        ts.grad_scale = global_grad_scale.to(torch.float64)  # (squared in float64 as clipnorm's)
    ts.alpha = step_size(ts, sums.param_sq)
    if ts.dims is not None:
        update_factors(ts, sums)


def _eps1(ts: TensorStep) -> float:
    eps1 = ts.plan.eps1
    if eps1 is None:  # torch.optim.Adafactor: machine epsilon of the parameter dtype
        return torch.finfo(ts.param.dtype).eps
    return float(eps1)


def _beta1(plan: GroupPlan) -> float:
    assert plan.beta1 is not None
    return plan.beta1


def _square(value: float | Tensor) -> float | Tensor:
    return value * value


def _to(value: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """A float64 scalar (0-d tensor) rounded to the math dtype where it meets a tensor (a 0-d
    tensor of another dtype would promote a 0-d parameter's math to float64)."""
    return value.to(dtype) if isinstance(value, Tensor) else value


# ---------------------------------------------------------------------------------------------
# saturation: finite gradients give finite parameters and state without update clipping
# ---------------------------------------------------------------------------------------------
def _saturate(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` clamped to +-(``dtype``'s largest value), NaN kept. A value that rounds to a finite
    ``dtype`` value is unchanged (rounding a clamped value gives the same bits); only what would
    round to +-inf becomes the largest finite value."""
    big = torch.finfo(dtype).max
    return x.clamp(-big, big)


def _saturate_scalar(value: float | Tensor) -> float | Tensor:
    """A non-negative scalar (alpha_t, alpha_t wd) at most its dtype's largest value: alpha_t =
    RMS(x) rho_t is inf in float32 for weights near its largest value with rho_t > 1 (an lr above
    1), and inf * 0 would be NaN."""
    if isinstance(value, Tensor):
        return value.clamp(max=torch.finfo(value.dtype).max)
    return value


def _lerp_finite_(state: Tensor, end: Tensor, weight: float) -> Tensor:
    """``state.lerp_(end, weight)`` that stays finite for finite operands; returns ``state``.

    ``end`` is saturated to ``state``'s dtype before it is rounded to it. torch's lerp
    ``a + w (b - a)`` (``b - (b - a)(1 - w)`` for ``w >= 0.5``) overflows to inf where ``b - a``
    does (operands of opposite signs near the largest value; NaN at ``w = 1``), so there the
    weighted sum ``a (1 - w) + b w`` (each product finite) replaces it; the result is stored
    saturated. In the state dtype's math (float32 for bfloat16) as torch's lerp_."""
    math = compute_dtype(state.dtype)
    a = state.to(math)
    b = _saturate(end, state.dtype).to(state.dtype).to(math)
    out = torch.lerp(a, b, weight)
    w = torch.tensor(weight, dtype=math)
    keep = 1 - w  # (the kernels' 1.0f - w)
    out = torch.where(out.abs() <= torch.finfo(math).max, out, a * keep + b * w)
    state.copy_(_saturate(out, state.dtype))
    return state


def _kahan_round_saturated(x: Tensor, comp: Tensor) -> Tensor:
    """:func:`kahan_round_to_bf16` with ``t = x + c`` saturated at bfloat16's largest value (an
    overflowed ``x`` is +-inf, and ``t`` near the top can round to inf)."""
    t = _saturate(x.to(torch.float32) + comp.to(torch.float32), torch.bfloat16)
    rounded = t.to(torch.bfloat16)
    comp.copy_(t - rounded.to(torch.float32))
    return rounded
