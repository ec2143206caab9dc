"""Triton kernels for one Adafactor tensor step (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The same three passes as :mod:`adafactor._reference`, with no host synchronisation: the sums go
to small device buffers through atomics, and every scalar that depends on them (alpha_t, the
update-clipping factor) is computed inside the kernels that consume them. Step-dependent scalars
(lr_t, beta2_t, rho_t) are ordinary runtime arguments, never ``tl.constexpr``, so a schedule never
recompiles; constexprs are block sizes and modes only. Offsets are int64 (tensors > 2^31 elems).

Supported here: factored tensors whose factored dims are the last two (viewed as [A, R, C]) and
unfactored tensors; float32/bfloat16 parameters and momentum; eps1_mode 'add'; every momentum
kind, weight-decay mode, maximize and clipvalue. Everything else (clipnorm, global_clipnorm,
eps1 'clamp', stochastic rounding, other factor layouts) is left to the reference by
:func:`supports`.

Status: checked against the reference on CPU under the interpreter only; not yet timed on a GPU
(and small tensors are not yet batched into shared launches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._plan import Eps1Mode, GroupPlan, Momentum, StepScalars, WeightDecay
from ..factoring import FactorDims

__all__ = ["supports", "tensor_step"]

# The option values of adafactor._plan, as constexprs the kernels compare against.
MOM_GRAD: tl.constexpr = tl.constexpr(int(Momentum.GRAD))
MOM_NORMALIZED_UPDATE: tl.constexpr = tl.constexpr(int(Momentum.NORMALIZED_UPDATE))
MOM_UPDATE: tl.constexpr = tl.constexpr(int(Momentum.UPDATE))
WD_LR: tl.constexpr = tl.constexpr(int(WeightDecay.LR))
WD_LR_BEFORE: tl.constexpr = tl.constexpr(int(WeightDecay.LR_BEFORE))
WD_ALPHA: tl.constexpr = tl.constexpr(int(WeightDecay.ALPHA))


@triton.jit
def _lerp(a, b, w):
    # torch's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 -> dtype; bf16 rounds to nearest even explicitly (the interpreter truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(dtype)


@triton.jit
def _adafactor_stats_kernel(
    g_ptr, x_ptr, row_ptr, col_ptr, sums_ptr, R, C, sign, clipv,
    FACTORED: tl.constexpr, WANT_X: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Pass 1: row sums (stored), col sums and sum g^2 / x^2 (atomically added). Tensor [A, R, C];
    an unfactored tensor is passed as A=1, R=1, C=numel."""
    pid = tl.program_id(0).to(tl.int64)
    nrb = tl.cdiv(R, BR)
    a = pid // nrb
    rows = (pid % nrb) * BR + tl.arange(0, BR).to(tl.int64)
    rmask = rows < R
    row_acc = tl.zeros([BR], dtype=tl.float32)
    xs = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = (a * R + rows)[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
        g = tl.minimum(tl.maximum(g, -clipv), clipv)
        q = g * g
        row_acc += tl.sum(q, axis=1)
        if FACTORED:
            tl.atomic_add(col_ptr + a * C + cols, tl.sum(q, axis=0), mask=cmask)
        if WANT_X:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xs += tl.sum(x * x, axis=1)
    if FACTORED:
        tl.store(row_ptr + a * R + rows, row_acc, mask=rmask)
    tl.atomic_add(sums_ptr, tl.sum(row_acc, axis=0))
    if WANT_X:
        tl.atomic_add(sums_ptr + 1, tl.sum(xs, axis=0))


@triton.jit
def _adafactor_factors_kernel(
    row_ptr, col_ptr, rstate_ptr, cstate_ptr, rmean_ptr, R, C, row_k, col_k, eps1, w2,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Between passes: R, C <- lerp(R, C, mean(g^2) + eps1, 1 - beta2_t) and mean(R); one program
    per batch index a."""
    a = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        m = r < R
        new = _lerp(
            tl.load(rstate_ptr + a * R + r, mask=m, other=0.0),
            tl.load(row_ptr + a * R + r, mask=m, other=0.0) * row_k + eps1,
            w2,
        )
        tl.store(rstate_ptr + a * R + r, new, mask=m)
        total += tl.where(m, new, 0.0)
    tl.store(rmean_ptr + a, tl.sum(total, axis=0) / R)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK).to(tl.int64)
        m = c < C
        new = _lerp(
            tl.load(cstate_ptr + a * C + c, mask=m, other=0.0),
            tl.load(col_ptr + a * C + c, mask=m, other=0.0) * col_k + eps1,
            w2,
        )
        tl.store(cstate_ptr + a * C + c, new, mask=m)


@triton.jit
def _elementwise_u(
    g_ptr, m_ptr, v_ptr, rstate_ptr, cstate_ptr, rmean_ptr, offs, mask, R, C, sign, clipv, eps1,
    w1, w2, FACTORED: tl.constexpr, MOM: tl.constexpr, UPDATE_STATE: tl.constexpr,
):  # fmt: skip
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    g = tl.minimum(tl.maximum(g, -clipv), clipv)
    num = g
    if MOM == MOM_GRAD:  # momentum of the gradient, updated in pass 2, read in pass 3
        m_old = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if UPDATE_STATE:
            m_new = _cast(
                _lerp(m_old.to(tl.float32), _cast(g, m_old.dtype).to(tl.float32), w1), m_old.dtype
            )
            tl.store(m_ptr + offs, m_new, mask=mask)
            num = m_new.to(tl.float32)
        else:
            num = m_old.to(tl.float32)
    if FACTORED:
        row = offs // C
        col = (offs // (R * C)) * C + offs % C
        r = tl.load(rstate_ptr + row, mask=mask, other=1.0)
        rm = tl.load(rmean_ptr + offs // (R * C), mask=mask, other=1.0)
        c = tl.load(cstate_ptr + col, mask=mask, other=1.0)
        v_hat = r / rm * c
    else:
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
        if UPDATE_STATE:
            v = _lerp(v, g * g + eps1, w2)
            tl.store(v_ptr + offs, v, mask=mask)
        v_hat = v
    return num / tl.sqrt(v_hat)


@triton.jit
def _adafactor_update_sq_kernel(
    g_ptr, m_ptr, v_ptr, rstate_ptr, cstate_ptr, rmean_ptr, sums_ptr, numel, R, C, sign, clipv,
    eps1, w1, w2, FACTORED: tl.constexpr, MOM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 2: U = num / sqrt(V_hat) (V and the 'grad' momentum updated here); sum U^2."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    u = _elementwise_u(
        g_ptr, m_ptr, v_ptr, rstate_ptr, cstate_ptr, rmean_ptr, offs, mask, R, C, sign, clipv,
        eps1, w1, w2, FACTORED, MOM, True,
    )  # fmt: skip
    tl.atomic_add(sums_ptr + 2, tl.sum(tl.where(mask, u * u, 0.0), axis=0))


@triton.jit
def _adafactor_apply_kernel(
    g_ptr, x_ptr, m_ptr, v_ptr, rstate_ptr, cstate_ptr, rmean_ptr, sums_ptr, out_ptr, numel, R,
    C, sign, clipv, eps1, w1, w2, rho, eps2, clip_d, lr, wd, wd_before,
    FACTORED: tl.constexpr, MOM: tl.constexpr, SCALE_PARAM: tl.constexpr, CLIP: tl.constexpr,
    HAS_WD: tl.constexpr, WD_MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 3: alpha_t and the clip factor from the device sums, momentum, decay, write x."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    alpha = rho
    if SCALE_PARAM:
        x_rms = tl.sqrt(tl.load(sums_ptr + 1) / numel) * wd_before
        alpha = tl.maximum(x_rms, eps2) * rho
    u_rms = tl.sqrt(tl.load(sums_ptr + 2) / numel)
    u = _elementwise_u(
        g_ptr, m_ptr, v_ptr, rstate_ptr, cstate_ptr, rmean_ptr, offs, mask, R, C, sign, clipv,
        eps1, w1, w2, FACTORED, MOM, False,
    )  # fmt: skip
    if CLIP:
        u = u / tl.maximum(u_rms / clip_d, 1.0)
    if MOM == MOM_NORMALIZED_UPDATE:  # momentum of the clipped update, before the step size
        m_old = tl.load(m_ptr + offs, mask=mask, other=0.0)
        m_new = _cast(
            _lerp(m_old.to(tl.float32), _cast(u, m_old.dtype).to(tl.float32), w1), m_old.dtype
        )
        tl.store(m_ptr + offs, m_new, mask=mask)
        u = m_new.to(tl.float32)
    u = u * alpha
    if MOM == MOM_UPDATE:  # momentum of the applied update
        m_old = tl.load(m_ptr + offs, mask=mask, other=0.0)
        m_new = _cast(
            _lerp(m_old.to(tl.float32), _cast(u, m_old.dtype).to(tl.float32), w1), m_old.dtype
        )
        tl.store(m_ptr + offs, m_new, mask=mask)
        u = m_new.to(tl.float32)
    x_old = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x_old.to(tl.float32)
    if HAS_WD:
        if WD_MODE == WD_LR:
            x = x * (1 - lr * wd)
        elif WD_MODE == WD_LR_BEFORE:
            x = x - x * (lr * wd)
        elif WD_MODE == WD_ALPHA:
            x = x - x * (alpha * wd)
        else:
            x = x - x * wd
    tl.store(x_ptr + offs, _cast(x - u, x_old.dtype), mask=mask)
    if pid == 0:  # diagnostics for StepStats, still on the device
        tl.store(out_ptr, alpha)
        tl.store(out_ptr + 1, u_rms)


def supports(
    param: Tensor, grad: Tensor, state: dict[str, Any], plan: GroupPlan, dims: FactorDims | None
) -> bool:
    """Whether these kernels handle the tensor under ``plan`` (else use the reference)."""
    if type(param) is not torch.Tensor and not isinstance(param, torch.nn.Parameter):
        return False
    if param.dtype not in (torch.float32, torch.bfloat16) or grad.dtype != param.dtype:
        return False
    if not (param.is_contiguous() and grad.is_contiguous()) or param.numel() == 0:
        return False
    if plan.eps1_mode != Eps1Mode.ADD or plan.clipnorm is not None:
        return False
    if plan.stochastic_rounding and param.dtype == torch.bfloat16:
        return False
    if dims is not None and dims != (param.dim() - 2, param.dim() - 1):
        return False
    keys = ("row_var", "col_var", "variance")
    return all(state[k].dtype == torch.float32 for k in keys if k in state)


def tensor_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    plan: GroupPlan,
    scalars: StepScalars,
    dims: FactorDims | None,
) -> tuple[Tensor, Tensor]:
    """All passes on one tensor (step counter already advanced); returns (alpha_t, RMS(U)) as
    0-d device tensors (no sync). ``scalars`` are host floats."""
    lr_f, rho, w2 = float(scalars.lr), float(scalars.rho), 1.0 - float(scalars.beta2)
    shape, numel, dev = tuple(param.shape), param.numel(), param.device
    factored = dims is not None
    a_dim = math.prod(shape[:-2]) if factored else 1
    r_dim, c_dim = (shape[-2], shape[-1]) if factored else (1, numel)
    sums = torch.zeros(3, dtype=torch.float32, device=dev)
    out = torch.empty(2, dtype=torch.float32, device=dev)
    if factored:
        row = torch.empty(a_dim * r_dim, dtype=torch.float32, device=dev)
        col = torch.zeros(a_dim * c_dim, dtype=torch.float32, device=dev)
        rmean = torch.empty(a_dim, dtype=torch.float32, device=dev)
        rstate, cstate, v = state["row_var"], state["col_var"], sums
    else:
        row = col = rmean = rstate = cstate = sums  # unused pointers
        v = state["variance"]
    mom = int(plan.momentum)
    m = state["exp_avg"] if mom else sums
    w1 = 1.0 - plan.beta1 if plan.beta1 is not None and mom else 0.0
    sign = -1.0 if plan.maximize else 1.0
    clipv = math.inf if plan.clipvalue is None else float(plan.clipvalue)
    eps1 = float(plan.eps1 if plan.eps1 is not None else torch.finfo(param.dtype).eps)
    br, bc = 16, 64
    grid1 = (a_dim * triton.cdiv(r_dim, br),)
    _adafactor_stats_kernel[grid1](
        grad, param, row, col, sums, r_dim, c_dim, sign, clipv,
        FACTORED=factored, WANT_X=plan.scale_parameter, BR=br, BC=bc,
    )  # fmt: skip
    if factored:
        _adafactor_factors_kernel[(a_dim,)](
            row, col, rstate, cstate, rmean, r_dim, c_dim, 1.0 / c_dim, 1.0 / r_dim, eps1, w2,
            BLOCK=256,
        )  # fmt: skip
    block = 1024
    grid = (triton.cdiv(numel, block),)
    _adafactor_update_sq_kernel[grid](
        grad, m, v, rstate, cstate, rmean, sums, numel, r_dim, c_dim, sign, clipv, eps1, w1, w2,
        FACTORED=factored, MOM=mom, BLOCK=block,
    )  # fmt: skip
    wd = plan.weight_decay
    before = plan.weight_decay_mode == WeightDecay.LR_BEFORE and wd
    wd_before = abs(1 - lr_f * wd) if before else 1.0
    clip = plan.clip_threshold
    _adafactor_apply_kernel[grid](
        grad, param, m, v, rstate, cstate, rmean, sums, out, numel, r_dim, c_dim, sign, clipv,
        eps1, w1, w2, rho, plan.eps2, float(clip or 1.0), lr_f, wd, wd_before,
        FACTORED=factored, MOM=mom, SCALE_PARAM=plan.scale_parameter, CLIP=clip is not None,
        HAS_WD=bool(wd), WD_MODE=int(plan.weight_decay_mode), BLOCK=block,
    )  # fmt: skip
    return out[0], out[1]
