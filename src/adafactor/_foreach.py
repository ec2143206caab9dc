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
    gscale: Scalar = 1.0
    if plan.clipnorm is not None:
        # the reference's clipnorm / max(||g||, clipnorm), on a vector of the bucket's norms
        norm = torch.stack(torch._foreach_norm(G))
        gscale = list((plan.clipnorm / norm.clamp(min=plan.clipnorm)).unbind())
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

    if factored:
        rows, cols = [], []
        for g, d in zip(G, b.dims):
            assert d is not None
            sq = g.square()
            rows.append(sq.sum(d.col_dim, keepdim=True))
            cols.append(sq.sum(d.row_dim, keepdim=True))
            del sq
        ncols = [float(p.shape[d.col_dim]) for p, d in zip(P, b.dims) if d is not None]
        nrows = [float(p.shape[d.row_dim]) for p, d in zip(P, b.dims) if d is not None]
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
        _lerp_(b.row_vars, _cast(rows, stats_dtype), w2, skip)
        _lerp_(b.col_vars, _cast(cols, stats_dtype), w2, skip)
        del rows, cols

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
        _lerp_(M, _cast(G, M[0].dtype), w1, skip)
        numer = _cast(M, cdt)
    if factored and not clamp:
        # 1/sqrt(V_hat) as a per-row times a per-column factor, computed on the small vectors
        inv_rows, inv_cols = [], []
        for rv, cv, d in zip(b.row_vars, b.col_vars, b.dims):
            assert d is not None
            r = rv.to(cdt)
            inv_rows.append((r / r.mean(d.row_dim, keepdim=True)).sqrt_().reciprocal_())
            inv_cols.append(cv.to(cdt).sqrt().reciprocal_())
        U = torch._foreach_mul(numer, inv_rows)
        torch._foreach_mul_(U, inv_cols)
        del inv_rows, inv_cols
    elif factored:
        U = []
        for rv, cv, d in zip(b.row_vars, b.col_vars, b.dims):
            assert d is not None
            r, c = rv.to(cdt), cv.to(cdt)
            row_mean = r.mean(d.row_dim, keepdim=True)
            # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            U.append((r * c / row_mean.clamp(min=eps1)).clamp_(min=eps1 * eps1).rsqrt_())
        torch._foreach_mul_(U, numer)
    else:
        V = b.variances
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
    rms = _sq_mean_sqrt(list(torch._foreach_norm(U)), numels)
    if plan.clip_threshold is not None:
        div = torch._foreach_div(rms, plan.clip_threshold)
        torch._foreach_clamp_min_(div, 1.0)
        torch._foreach_div_(U, div)
    if plan.momentum == Momentum.NORMALIZED_UPDATE:  # big_vision: of U_hat, before alpha
        M = b.exp_avgs
        _lerp_(M, _cast(U, M[0].dtype), w1, skip)
        del U
        U = torch._foreach_mul(_cast(M, cdt), _s(alpha, n))
    else:
        torch._foreach_mul_(U, _s(alpha, n))
    if plan.momentum == Momentum.UPDATE:  # T2T / transformers / optax: of alpha U_hat
        M = b.exp_avgs
        _lerp_(M, _cast(U, M[0].dtype), w1, skip)
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
                c = _times(alpha, wd)
            else:  # UNSCALED; an lr of 0 still changes nothing
                c = wd * (lr_t != 0)
            torch._foreach_sub_(X, torch._foreach_mul(X, _s(c, n)))
    torch._foreach_sub_(X, U)
    del U
    if not in_place:
        if sr:
            assert len(b.noise) == n, "stochastic rounding needs the draws of rounding_noise()"
            X = [stochastic_round_to_bf16(x, nz) for x, nz in zip(X, b.noise)]
        elif b.comps:  # Kahan: t = x + c; x = bf16(t); c = bf16(t - x)
            torch._foreach_add_(X, _cast(b.comps, cdt))
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
