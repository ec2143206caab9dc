"""The Adafactor step of one param group with ``torch._foreach`` ops: the CUDA implementation.

The math is :mod:`adafactor._reference`'s, operation for operation, applied to buckets of
tensors instead of one tensor at a time:

* **Buckets.** The group's non-empty tensors are grouped by (device, dtypes of the parameter,
  gradient and state, factored or not, and the step count with host step counters), and a bucket
  holds at most :data:`BUCKET_NUMEL` elements (a larger tensor is a bucket alone). Full-size
  temporaries (the effective gradient, U, a float32 copy of bf16 weights) exist for one bucket
  at a time, so the step's extra memory is a small multiple of one bucket, not of the model.
* **Foreach where shapes agree.** Every elementwise pass over full-size tensors (rsqrt, U, update
  clipping, momentum, weight decay, the write) is one ``torch._foreach_*`` call per bucket. The
  factored statistics (row and column sums of g^2, the broadcast of R C / mean(R)) are per
  tensor, as in ``torch.optim.Adafactor(foreach=True)``: no foreach op reduces over a dim.
* **No host reads of device tensors.** Sums (RMS(x), RMS(U), gradient norms) become per-tensor
  0-d device tensors that later foreach calls consume (``List`` overloads); nothing calls
  ``.item()``. Step-dependent scalars come from :func:`adafactor._plan.step_scalars`: from host
  floats when the step counters are CPU tensors (reading a CPU tensor is not a device sync),
  from the counters themselves when they live on the device (*capturable* mode, below).
* **Skipping without a read.** With ``found_inf`` and the counters on the same device, every
  write goes through ``torch.where(found_inf, old, new)``, the counters advance by
  ``1 - found_inf``, and ``skipped_steps`` by ``found_inf``: a skipped step changes nothing and
  nothing is read. With host counters and a device ``found_inf`` one read is unavoidable (the host
  counter's next value depends on it); it is done once per group, as the reference path does.

*Capturable* mode (step counters on the parameters' device, ``lr`` a device tensor): every
per-step scalar is computed on the device, so the step launches the same kernels with the same
arguments every time and a CUDA graph can capture it. The op's input check accepts only CPU step
counters today, so capturable mode is reachable through :func:`group_step` only (see
``docs/gpu.md``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._plan import Eps1Mode, GroupPlan, Momentum, WeightDecay, step_scalars
from ._reference import compute_dtype, stochastic_round_to_bf16
from .factoring import FactorDims

__all__ = ["BUCKET_NUMEL", "group_step"]

# Elements per bucket: the full-size temporaries of a step cover one bucket at a time.
BUCKET_NUMEL = 1 << 26

# A scalar of a bucket: a host float or a 0-d device tensor (the same for every tensor of the
# bucket), or a list of 0-d device tensors, one per tensor. Every torch._foreach_* call below takes
# each kind as its second operand (the Scalar, Tensor and List overloads).
Scalar = float | Tensor | list[Tensor]


@dataclass
class _Bucket:
    index: list[int] = field(default_factory=list)  # positions in the group
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    dims: list[FactorDims | None] = field(default_factory=list)
    row_vars: list[Tensor] = field(default_factory=list)
    col_vars: list[Tensor] = field(default_factory=list)
    variances: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    emas: list[Tensor] = field(default_factory=list)
    noise: list[Tensor] = field(default_factory=list)
    comps: list[Tensor] = field(default_factory=list)  # kahan_summation: bf16 compensations
    numel: int = 0
    t: float | None = None  # the step count of every tensor (host counters only)


def _key(t: Tensor | None) -> Any:
    return None if t is None else t.dtype


@torch.no_grad()
def group_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    steps: Sequence[Tensor],
    row_vars: Sequence[Tensor],
    col_vars: Sequence[Tensor],
    variances: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    emas: Sequence[Tensor],
    noise: Sequence[Tensor],
    factor_dims: Sequence[int],
    lr: Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    skipped_steps: Tensor,
    plan: GroupPlan,
    *,
    capturable: bool | None = None,
    bucket_numel: int | None = None,
    kahan_comps: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
    """One step of a param group: the op's arguments (:mod:`adafactor.ops`), already checked.

    Returns ``(alpha, update_rms)``, float32, one entry per parameter, on the parameters' device.
    ``capturable`` (default: whether every step counter lives off the CPU) computes the per-step
    scalars from the counters on the device; ``bucket_numel`` overrides :data:`BUCKET_NUMEL`;
    ``kahan_comps``: the op's list of that name (used with ``plan.kahan_summation``).
    """
    n = len(params)
    device = params[0].device if n else lr.device
    alphas = torch.zeros(n, dtype=torch.float32, device=device)
    rmss = torch.zeros(n, dtype=torch.float32, device=device)
    if capturable is None:
        capturable = bool(steps) and all(s.device.type != "cpu" for s in steps)
    skip: Tensor | None = None
    if found_inf is not None:
        here = found_inf.device
        if capturable and skipped_steps.device == here and all(s.device == here for s in steps):
            skip = found_inf.reshape(()).to(torch.bool)
            skipped_steps.add_(skip.to(skipped_steps.dtype))
        elif bool(found_inf):  # host counters: their next value needs found_inf on the host
            skipped_steps.add_(1)
            return alphas, rmss
    if skip is None:
        torch._foreach_add_(list(steps), 1.0)
    elif steps:
        torch._foreach_add_(list(steps), _s(skip.logical_not().to(torch.float64), len(steps)))
    if capturable:
        lr_s: float | Tensor = lr if lr.device == device else lr.to(device, non_blocking=True)
    else:
        lr_s = float(lr) if lr.device.type == "cpu" else lr
    for b in _buckets(
        params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise, factor_dims,
        capturable, BUCKET_NUMEL if bucket_numel is None else bucket_numel,
        kahan_comps if plan.kahan_summation else (),
    ):  # fmt: skip
        _bucket_step(b, plan, lr_s, grad_scale, skip, alphas, rmss)
    if skip is not None:
        alphas.masked_fill_(skip, 0.0)
        rmss.masked_fill_(skip, 0.0)
    return alphas, rmss


def _buckets(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    steps: Sequence[Tensor],
    row_vars: Sequence[Tensor],
    col_vars: Sequence[Tensor],
    variances: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    emas: Sequence[Tensor],
    noise: Sequence[Tensor],
    factor_dims: Sequence[int],
    capturable: bool,
    limit: int,
    kahan_comps: Sequence[Tensor] = (),
) -> list[_Bucket]:
    """The group's non-empty tensors in buckets of one kind and at most ``limit`` elements."""
    open_: dict[Any, _Bucket] = {}
    out: list[_Bucket] = []
    fi = vi = 0
    for i, p in enumerate(params):
        r, c = factor_dims[2 * i], factor_dims[2 * i + 1]
        dims = None if r < 0 else FactorDims(r, c)
        stats: tuple[Tensor, ...]
        if dims is not None:
            stats = (row_vars[fi], col_vars[fi])
            fi += 1
        else:
            stats = (variances[vi],)
            vi += 1
        if p.numel() == 0:  # counted, nothing to update (alpha and RMS(U) stay 0)
            continue
        m = exp_avgs[i] if exp_avgs else None
        e = emas[i] if emas else None
        nz = noise[i] if noise and noise[i].numel() else None
        kc = kahan_comps[i] if kahan_comps and kahan_comps[i].numel() else None
        t = None if capturable else float(steps[i])  # a CPU tensor: no device sync
        key = (
            p.device, p.dtype, grads[i].dtype, dims is None, tuple(s.dtype for s in stats),
            _key(m), _key(e), nz is not None, kc is not None, t,
        )  # fmt: skip
        b = open_.get(key)
        if b is None or (b.numel and b.numel + p.numel() > limit):
            b = open_[key] = _Bucket(t=t)
            out.append(b)
        b.index.append(i)
        b.params.append(p)
        b.grads.append(grads[i])
        b.steps.append(steps[i])
        b.dims.append(dims)
        if dims is not None:
            b.row_vars.append(stats[0])
            b.col_vars.append(stats[1])
        else:
            b.variances.append(stats[0])
        if m is not None:
            b.exp_avgs.append(m)
        if e is not None:
            b.emas.append(e)
        if nz is not None:
            b.noise.append(nz)
        if kc is not None:
            b.comps.append(kc)
        b.numel += p.numel()
    return out


# ---------------------------------------------------------------------------------------------
# helpers on bucket scalars and masked writes
# ---------------------------------------------------------------------------------------------
def _times(s: Scalar, k: float) -> Scalar:
    """``s * k`` for a bucket scalar ``s``."""
    return list(torch._foreach_mul(s, k)) if isinstance(s, list) else s * k


def _each(s: Tensor | list[Tensor], n: int) -> list[Tensor]:
    return s if isinstance(s, list) else [s] * n


def _s(s: Scalar, n: int) -> float | list[Tensor]:
    """A bucket scalar as a foreach operand: a float, or a list of 0-d tensors (a shared tensor
    repeated: the ``Tensor`` overloads read the value on the host for meta tensors)."""
    return [s] * n if isinstance(s, Tensor) else s


def _unbind(v: Tensor) -> Scalar:
    """Per-tensor scalars from a vector (capturable mode); a 0-d tensor stays shared."""
    return list(v.unbind()) if v.dim() else v


def _as_dtype(s: Scalar, dtype: torch.dtype) -> Scalar:
    if isinstance(s, list):
        return [x.to(dtype) for x in s]
    return s.to(dtype) if isinstance(s, Tensor) else s


def _commit(dst: list[Tensor], new: list[Tensor], skip: Tensor | None) -> None:
    """``dst <- new``; with ``skip`` (a 0-d bool device tensor) true, ``dst`` keeps its values."""
    if skip is None:
        torch._foreach_copy_(dst, new)
        return
    for d, v in zip(dst, new):
        torch.where(skip, d, v.to(d.dtype), out=d)


def _lerp_(dst: list[Tensor], end: list[Tensor], w: Scalar, skip: Tensor | None) -> None:
    """``dst.lerp_(end, w)`` for each tensor (torch's lerp, as the reference), masked by skip."""
    if skip is None:
        torch._foreach_lerp_(dst, end, w)
    else:
        _commit(dst, torch._foreach_lerp(dst, end, w), skip)


def _cast(ts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.to(dtype) for t in ts]


def _overflow_scale(G: list[Tensor], numels: list[float]) -> tuple[Tensor, list, Tensor]:
    """Per tensor, on the device: ``wide`` (bool [n]): its sums of g^2 could overflow float32
    (max|g|^2 numel >= 2^127); the exact power of two ``s = 2^-k`` to scale g by before squaring
    (0-d tensors, 1 where not wide: the same bits as without it); and ``4^k`` (float64 [n]) that
    unscales the sums. No host read: k comes from max|g| by device ops."""
    amax = torch.stack(list(torch._foreach_norm(G, float("inf")))).to(torch.float32)
    half = [0.5 * math.log2(max(k, 1.0)) - 63.5 for k in numels]
    k = (amax.log2() + torch.tensor(half).to(amax.device, non_blocking=True)).ceil_()
    k = torch.nan_to_num(k, nan=0.0, posinf=0.0).clamp_(0.0, 100.0)  # (inf, NaN g: unscaled)
    ki = k.to(torch.int32)
    s = ((127 - ki) << 23).view(torch.float32)  # 2^-k, exact
    up = ((1023 + 2 * ki.to(torch.int64)) << 52).view(torch.float64)  # 4^k, exact
    return k > 0, list(s.unbind()), up


def _wide_factors(
    b: _Bucket,
    rows: list[Tensor],
    cols: list[Tensor],
    up: Tensor,
    gscale: Scalar,
    ncols: list[float],
    nrows: list[float],
    eps1: float,
    w2: Scalar,
    n: int,
) -> list[tuple[Tensor, Tensor]]:
    """The reference's float64 averages of R and C from the scaled float32 sums (before they
    are scaled in place): sum * 4^k * scale^2 / n + eps1, lerped in float64. Computed for every
    tensor (small vectors); the caller keeps them where ``wide``."""
    sq: list[Tensor] = [torch.ones((), dtype=torch.float64, device=up.device)] * n
    if not (isinstance(gscale, float) and gscale == 1.0):
        sq = [torch.as_tensor(x, dtype=torch.float64).square() for x in _each(gscale, n)]
    ws = _each(w2, n) if not isinstance(w2, float) else [w2] * n
    out = []
    for i in range(n):
        k2 = up[i] * sq[i]
        r64 = rows[i].double() * k2 / ncols[i] + eps1
        c64 = cols[i].double() * k2 / nrows[i] + eps1
        w = ws[i]
        w = w.double() if isinstance(w, Tensor) else w
        out.append((b.row_vars[i].double().lerp(r64, w), b.col_vars[i].double().lerp(c64, w)))
    return out


def _wide_full_u(
    V: list[Tensor],
    G: list[Tensor],
    numer: list[Tensor],
    eps1: float,
    clamp: bool,
    w2: Scalar,
    skip: Tensor | None,
) -> list[Tensor]:
    """Unfactored float32 tensors: V <- lerp(V, g^2 + eps1, 1 - beta2_t) and U = numer / sqrt(V),
    with the reference's float64 path per element: where g^2 would overflow float32 (|g| >= 2^63)
    g, V and eps1 are scaled by s = 2^-64 (exact): V' = lerp(V s^2, (g s)^2 + eps1 s^2, w),
    U = s numer / sqrt(V') and V is stored as V' / s^2, saturated. s = 1 elsewhere: the same bits
    as without it. Decided per element on the device (no host read); one tensor at a time, so
    the temporaries are a few of one tensor."""
    dt = V[0].dtype
    big_v = torch.finfo(dt).max
    ws = w2 if isinstance(w2, list) else [w2] * len(V)
    U = []
    for g, v, num, w in zip(G, V, numer, ws):
        huge = g.abs() >= 2.0**63
        sig = torch.where(huge, 2.0**-64, 1.0)
        new_sq = g * sig
        new_sq.mul_(new_sq)
        if not clamp:
            new_sq.add_(torch.where(huge, eps1 * 2.0**-128, eps1))
        scaled = v.to(torch.float32) * sig
        scaled.mul_(sig)
        scaled = torch.lerp(scaled, new_sq.to(dt).to(torch.float32), w)
        del new_sq
        stored = (scaled / sig).div_(sig).clamp_(-big_v, big_v).to(dt)
        _commit([v], [stored], skip)
        # this step's V: the stored one where s is 1 (as without the scaling), else unrounded
        u = torch.where(huge, scaled, stored.to(torch.float32))
        del stored, scaled, huge
        if clamp:
            u.clamp_(min=eps1 * eps1)
        u.rsqrt_().mul_(num).mul_(sig)
        U.append(u)
    return U


def _as_math(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to float32 (float64: unchanged), as a host float."""
    return struct.unpack("f", struct.pack("f", x))[0] if dtype == torch.float32 else x


def _saturate_(ts: list[Tensor], big: float) -> None:
    """Clamp to [-big, big] in place (NaN kept): the reference's ``_saturate``."""
    torch._foreach_clamp_min_(ts, -big)
    torch._foreach_clamp_max_(ts, big)


def _lerp_finite_(dst: list[Tensor], end: list[Tensor], w: float, skip: Tensor | None) -> None:
    """The reference's ``_lerp_finite_``: ``end`` saturated to ``dst``'s dtype; where torch's
    lerp overflows (``end - dst`` beyond float32), the weighted sum ``dst (1 - w) + end w``; the
    result saturated to ``dst``'s dtype. Masked by ``skip``. One tensor at a time (the weighted
    sum is a full-size temporary)."""
    dt = dst[0].dtype
    math_dt = compute_dtype(dt)
    big = torch.finfo(dt).max
    wf = _as_math(w, math_dt)  # the weight and 1 - w as the math dtype rounds them
    keep = _as_math(1.0 - wf, math_dt)
    outs = []
    for d, e in zip(dst, end):
        if big < torch.finfo(e.dtype).max:  # narrower momentum: saturate before rounding
            e = e.clamp(-big, big)
        b = e.to(dt).to(math_dt)
        a = d.to(math_dt)
        out = torch.lerp(a, b, wf)
        ws = a * keep
        ws.add_(b * wf)
        torch.where(out.isfinite(), out, ws, out=out)
        del ws
        outs.append(out.clamp_(-big, big))
    _commit(dst, outs, skip)


def _sq_mean_sqrt(sums_of: list[Tensor], numels: list[float]) -> list[Tensor]:
    """RMS from per-tensor L2 norms: sqrt(norm^2 / numel), one foreach call each."""
    sq = list(torch._foreach_mul(sums_of, sums_of))
    torch._foreach_div_(sq, numels)
    torch._foreach_sqrt_(sq)
    return sq


# ---------------------------------------------------------------------------------------------
# one bucket, all passes
# ---------------------------------------------------------------------------------------------
def _bucket_step(
    b: _Bucket,
    plan: GroupPlan,
    lr: float | Tensor,
    global_scale: Tensor | None,
    skip: Tensor | None,
    alphas: Tensor,
    rmss: Tensor,
) -> None:
    P = b.params
    n = len(P)
    pdtype = P[0].dtype
    cdt = compute_dtype(pdtype)
    numels = [float(p.numel()) for p in P]
    factored = b.dims[0] is not None
    stats_dtype = (b.row_vars[0] if factored else b.variances[0]).dtype

    # per-step scalars: host floats (host counters), or device tensors from the counters
    w2: Scalar
    rho: Scalar
    if b.t is not None:
        sc = step_scalars(plan, b.t, lr)
        w2 = 1.0 - float(sc.beta2)
        rho = sc.rho if isinstance(sc.rho, Tensor) else float(sc.rho)
        t_vec = None
    else:
        t_vec = torch.stack([s.reshape(()) for s in b.steps])
        sc = step_scalars(plan, t_vec, lr)
        w2 = _unbind((1.0 - sc.beta2).to(stats_dtype))
        rho = _unbind(sc.rho) if isinstance(sc.rho, Tensor) else float(sc.rho)
    lr_t = sc.lr
    eps1 = float(plan.eps1) if plan.eps1 is not None else torch.finfo(pdtype).eps
    clamp = plan.eps1_mode == Eps1Mode.CLAMP
    w1 = 1.0 - plan.beta1 if plan.beta1 is not None else 0.0

    # the effective gradient: compute dtype, sign, clipvalue (a copy only where one is needed)
    G = _cast(b.grads, cdt)
    owned = b.grads[0].dtype != cdt
    if plan.maximize:
        G = torch._foreach_neg(G)
        owned = True
    if plan.clipvalue is not None:
        if not owned:
            G = torch._foreach_clamp_min(G, -plan.clipvalue)
            owned = True
        else:
            torch._foreach_clamp_min_(G, -plan.clipvalue)
        torch._foreach_clamp_max_(G, plan.clipvalue)

    # ---- pass 1: statistics; between passes: clip factor, alpha, factored averages --------------
    # The reference's float64 path (a finite g whose squares overflow float32), chosen per
    # tensor on the device: g is scaled by an exact power of two before squaring and the
    # statistics are averaged in float64 (factored tensors; see _overflow_scale)
    wide = None
    if factored or plan.clipnorm is not None:
        wide, g_scale, up = _overflow_scale(G, numels)
    gscale: Scalar = 1.0
    if plan.clipnorm is not None:
        # the reference's clipnorm / max(||g||, clipnorm), on a vector of the bucket's norms
        if wide is None:
            norm = torch.stack(torch._foreach_norm(G))
        else:  # ||g s|| / s in float64 (= ||g|| where ||g||^2 is beyond float32)
            scaled = torch._foreach_mul(G, g_scale)
            norm = torch.stack(torch._foreach_norm(scaled)).double() * up.sqrt()
            del scaled
        gscale = list((plan.clipnorm / norm.clamp(min=plan.clipnorm)).to(cdt).unbind())
    elif global_scale is not None:
        gscale = global_scale

    alpha: Scalar
    if plan.scale_parameter:
        x_rms = _sq_mean_sqrt(list(torch._foreach_norm(P, 2, dtype=cdt)), numels)
        wd = plan.weight_decay
        if plan.weight_decay_mode == WeightDecay.LR_BEFORE and wd:
            factor = 1 - lr_t * wd
            torch._foreach_mul_(x_rms, _s(abs(factor), n))
        torch._foreach_clamp_min_(x_rms, plan.eps2)
        torch._foreach_mul_(x_rms, _s(rho, n))
        alpha = x_rms
    else:
        alpha = rho

    wide_stats: list[tuple[Tensor, Tensor]] = []
    if factored:
        assert wide is not None
        rows, cols = [], []
        for g, d, si in zip(G, b.dims, g_scale):
            assert d is not None
            sq = (g * si).square_()  # (exact: si is a power of two, 1 unless wide)
            rows.append(sq.sum(d.col_dim, keepdim=True))
            cols.append(sq.sum(d.row_dim, keepdim=True))
            del sq
        ncols = [float(p.shape[d.col_dim]) for p, d in zip(P, b.dims) if d is not None]
        nrows = [float(p.shape[d.row_dim]) for p, d in zip(P, b.dims) if d is not None]
        wide_stats = _wide_factors(
            b, rows, cols, up, gscale, ncols, nrows, 0.0 if clamp else eps1, w2, n
        )
        if isinstance(gscale, float):  # sums * (1 / n), as the reference's scale_sq / n
            torch._foreach_mul_(rows, [gscale * gscale / k for k in ncols])
            torch._foreach_mul_(cols, [gscale * gscale / k for k in nrows])
        else:
            sq_scale = _each(gscale, n)
            sq_scale = torch._foreach_mul(sq_scale, sq_scale)
            torch._foreach_mul_(rows, torch._foreach_div(sq_scale, ncols))
            torch._foreach_mul_(cols, torch._foreach_div(sq_scale, nrows))
        if not clamp:
            torch._foreach_add_(rows, eps1)
            torch._foreach_add_(cols, eps1)
        new_r = list(torch._foreach_lerp(b.row_vars, _cast(rows, stats_dtype), w2))
        new_c = list(torch._foreach_lerp(b.col_vars, _cast(cols, stats_dtype), w2))
        del rows, cols
        big_s = torch.finfo(stats_dtype).max  # the float64 averages are stored saturated
        for i, (r64, c64) in enumerate(wide_stats):
            torch.where(wide[i], r64.clamp(-big_s, big_s).to(stats_dtype), new_r[i], out=new_r[i])
            torch.where(wide[i], c64.clamp(-big_s, big_s).to(stats_dtype), new_c[i], out=new_c[i])
        _commit(b.row_vars, new_r, skip)
        _commit(b.col_vars, new_c, skip)
        del new_r, new_c

    # ---- pass 2: U = numerator / sqrt(V_hat) -----------------------------------------------
    if not isinstance(gscale, float) or gscale != 1.0:
        if owned:
            torch._foreach_mul_(G, _s(gscale, n))
        else:
            G = torch._foreach_mul(G, _s(gscale, n))
            owned = True
    numer = G
    if plan.momentum == Momentum.GRAD:
        M = b.exp_avgs
        _lerp_finite_(M, G, w1, skip)
        numer = _cast(M, cdt)
    if factored and not clamp:
        # 1/sqrt(V_hat) as a per-row times a per-column factor, computed on the small vectors
        inv_rows, inv_cols = [], []
        for i, (rv, cv, d) in enumerate(zip(b.row_vars, b.col_vars, b.dims)):
            assert d is not None and wide is not None
            r = rv.to(cdt)
            # sqrt(mean(R)) / sqrt(R), as the reference: R / mean(R) can underflow to 0 beside
            # a saturated row (mean in float64: a float32 sum of saturated rows overflows)
            mean = r.mean(d.row_dim, keepdim=True, dtype=torch.float64).to(cdt)
            ir, ic = mean.sqrt_() / r.sqrt(), cv.to(cdt).sqrt().reciprocal_()
            r64, c64 = wide_stats[i]  # the same from the unrounded float64 averages
            mean64 = r64.mean(d.row_dim, keepdim=True)
            big = torch.finfo(cdt).max
            ir64 = (mean64.sqrt() / r64.sqrt()).clamp(max=big).to(cdt)
            inv_rows.append(torch.where(wide[i], ir64, ir))
            inv_cols.append(torch.where(wide[i], c64.sqrt().reciprocal().to(cdt), ic))
        U = torch._foreach_mul(numer, inv_rows)
        torch._foreach_mul_(U, inv_cols)
        del inv_rows, inv_cols
    elif factored:
        U = []
        for i, (rv, cv, d) in enumerate(zip(b.row_vars, b.col_vars, b.dims)):
            assert d is not None and wide is not None
            r, c = rv.to(cdt), cv.to(cdt)
            row_mean = r.mean(d.row_dim, keepdim=True)
            # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            u = (r * c / row_mean.clamp(min=eps1)).clamp_(min=eps1 * eps1).rsqrt_()
            r64, c64 = wide_stats[i]
            mean64 = r64.mean(d.row_dim, keepdim=True)
            u64 = (r64 * c64 / mean64.clamp(min=eps1)).clamp_(min=eps1 * eps1).rsqrt_()
            U.append(torch.where(wide[i], u64.to(cdt), u))
        torch._foreach_mul_(U, numer)
    else:
        V = b.variances
        if cdt == torch.float32:
            U = _wide_full_u(V, G, numer, eps1, clamp, w2, skip)
        else:
            new_sq = torch._foreach_mul(G, G)
            if not clamp:
                torch._foreach_add_(new_sq, eps1)
            _lerp_(V, _cast(new_sq, V[0].dtype), w2, skip)
            del new_sq
            if clamp:
                U = torch._foreach_clamp_min(_cast(V, cdt), eps1 * eps1)
                torch._foreach_rsqrt_(U)
            else:
                U = torch._foreach_rsqrt(_cast(V, cdt))
            torch._foreach_mul_(U, numer)
    del G, numer

    # ---- pass 3: clip, momentum, weight decay, write ----------------------------------------
    # RMS(U) as the reference: float32 squares (inf where one overflows) summed in float64 (a
    # float32 sum overflows first); on its float64 path float64 squares
    rms64 = _sq_mean_sqrt(list(torch._foreach_norm(U, 2, dtype=torch.float64)), numels)
    amax = torch.stack(list(torch._foreach_norm(U, float("inf")))).to(cdt)
    over = (amax * amax).isinf()
    if wide is not None:
        over = over & ~wide
    rms = list(torch.where(over, torch.inf, torch.stack(rms64)).to(cdt).unbind())
    # saturated where the math overflows, as the reference (_reference._saturate): without update
    # clipping U beside an outlier can exceed float32; finite results keep their bits
    big = torch.finfo(cdt).max
    _saturate_(U, big)
    if plan.clip_threshold is not None:
        div = torch._foreach_div(rms, plan.clip_threshold)
        torch._foreach_clamp_min_(div, 1.0)
        torch._foreach_div_(U, div)
    # alpha_t is inf once a float32 sum of x^2 overflows (a saturated x): inf * 0 would be NaN
    alpha_s: Scalar = alpha
    if isinstance(alpha, list):
        alpha_s = list(torch._foreach_clamp_max(alpha, big))
    if plan.momentum == Momentum.NORMALIZED_UPDATE:  # big_vision: of U_hat, before alpha
        M = b.exp_avgs
        _lerp_finite_(M, U, w1, skip)
        del U
        U = torch._foreach_mul(_cast(M, cdt), _s(alpha_s, n))
    else:
        torch._foreach_mul_(U, _s(alpha_s, n))
    _saturate_(U, big)
    if plan.momentum == Momentum.UPDATE:  # T2T / transformers / optax: of alpha U_hat
        M = b.exp_avgs
        _lerp_finite_(M, U, w1, skip)
        del U
        U = _cast(M, cdt)

    sr = pdtype == torch.bfloat16 and plan.stochastic_rounding
    in_place = skip is None and pdtype == cdt
    X = P if in_place else [p.to(cdt, copy=True) for p in P]
    wd = plan.weight_decay
    if wd:
        mode = plan.weight_decay_mode
        if mode == WeightDecay.LR:  # torch.optim: x (1 - lr wd)
            torch._foreach_mul_(X, _s(1 - lr_t * wd, n))
        else:  # x - x c, with c = lr wd, alpha wd or wd
            c: Scalar
            if mode == WeightDecay.LR_BEFORE:
                c = lr_t * wd
            elif mode == WeightDecay.ALPHA:
                c = _times(alpha_s, wd)
                if isinstance(c, list):
                    c = list(torch._foreach_clamp_max(c, big))
            else:  # UNSCALED; an lr of 0 still changes nothing
                c = wd * (lr_t != 0)
            torch._foreach_sub_(X, torch._foreach_mul(X, _s(c, n)))
    torch._foreach_sub_(X, U)  # +-inf at most: U is finite
    del U
    if not b.comps:  # (Kahan saturates x + c below)
        _saturate_(X, torch.finfo(pdtype).max)
    if not in_place:
        if sr:
            assert len(b.noise) == n, "stochastic rounding needs the draws of rounding_noise()"
            X = [stochastic_round_to_bf16(x, nz) for x, nz in zip(X, b.noise)]
        elif b.comps:  # Kahan: t = x + c; x = bf16(t); c = bf16(t - x)
            torch._foreach_add_(X, _cast(b.comps, cdt))
            _saturate_(X, torch.finfo(torch.bfloat16).max)
            rounded = _cast(X, torch.bfloat16)
            torch._foreach_sub_(X, _cast(rounded, cdt))
            _commit(b.comps, _cast(X, torch.bfloat16), skip)
            X = rounded
        _commit(P, X, skip)
    del X

    if plan.use_ema:  # tf_keras: ema * m + x * (1 - m), exact where x == ema; x <- ema
        E = b.emas
        m = plan.ema_momentum
        XE = _cast(P, E[0].dtype)
        new = torch._foreach_mul(E, m)
        torch._foreach_add_(new, torch._foreach_mul(XE, 1 - m))
        for e, x, v in zip(E, XE, new):
            torch.where(x == e, e, v, out=v)
        _commit(E, new, skip)
        del new, XE
        freq = plan.ema_overwrite_frequency
        if freq is not None:
            if t_vec is None:
                assert b.t is not None
                if int(b.t) % freq == 0:
                    torch._foreach_copy_(P, E)
            else:
                due = t_vec.fmod(freq) == 0
                if skip is not None:
                    due = due & skip.logical_not()
                for p, e, d in zip(P, E, due.unbind()):
                    torch.where(d, e.to(p.dtype), p, out=p)

    # ---- diagnostics: alpha_t and RMS(U) of each tensor, still on the device ----------------
    a_out = [alphas[i] for i in b.index]
    if isinstance(alpha, list):
        torch._foreach_copy_(a_out, alpha)
    else:
        torch._foreach_add_(a_out, _s(alpha, n))  # alphas start at 0
    torch._foreach_copy_([rmss[i] for i in b.index], rms)
