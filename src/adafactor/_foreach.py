"""The Adafactor step of one param group with ``torch._foreach`` ops: the CUDA implementation.

The math is :mod:`adafactor._reference`'s, operation for operation, applied to buckets of
tensors instead of one tensor at a time:

* **Buckets.** The group's non-empty tensors are grouped by (device, dtypes of the parameter,
  gradient and state, factored or not, and the step count with host step counters), and a bucket
  holds at most :data:`BUCKET_NUMEL` elements (a larger tensor is a bucket alone). Full-size
  temporaries (the effective gradient, U, a float32 copy of bf16 weights, the unfactored
  tensors' new squares and overflow scale) exist for one bucket at a time, so the step's extra
  memory is a small multiple of one bucket, not of the model.
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._plan import Eps1Mode, GroupPlan, Momentum, WeightDecay, step_scalars
from ._reference import compute_dtype, stochastic_round_to_bf16
from .factoring import FactorDims

if TYPE_CHECKING:  # (ops imports this module inside its CUDA kernel)
    from .ops import OpArgs

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
    op: OpArgs,
    plan: GroupPlan,
    *,
    capturable: bool | None = None,
    bucket_numel: int | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of a param group: the op's arguments (:class:`adafactor.ops.OpArgs`), already
    checked, and its plan.

    Returns ``(alpha, update_rms)``, float32, one entry per parameter, on the parameters' device.
    ``capturable`` (default: whether every step counter lives off the CPU) computes the per-step
    scalars from the counters on the device; ``bucket_numel`` overrides :data:`BUCKET_NUMEL`.
    ``op.kahan_comps`` is used with ``plan.kahan_summation`` only.
    """
    params, steps, lr = op.params, op.steps, op.lr
    found_inf, skipped_steps = op.found_inf, op.skipped_steps
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
    limit = BUCKET_NUMEL if bucket_numel is None else bucket_numel
    for b in _buckets(op, capturable, limit, kahan=plan.kahan_summation):
        _bucket_step(b, plan, lr_s, op.grad_scale, skip, alphas, rmss)
    if skip is not None:
        alphas.masked_fill_(skip, 0.0)
        rmss.masked_fill_(skip, 0.0)
    return alphas, rmss


def _buckets(op: OpArgs, capturable: bool, limit: int, *, kahan: bool = False) -> list[_Bucket]:
    """The group's non-empty tensors in buckets of one kind and at most ``limit`` elements
    (``kahan``: with the compensation buffers of ``op.kahan_comps``)."""
    params, grads, steps, factor_dims = op.params, op.grads, op.steps, op.factor_dims
    row_vars, col_vars, variances = op.row_vars, op.col_vars, op.variances
    exp_avgs, emas, noise = op.exp_avgs, op.emas, op.noise
    kahan_comps = op.kahan_comps if kahan else ()
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


def _flat(like: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """One new buffer for small tensors shaped like ``like``: the buffer and its views, so that
    an elementwise pass over all of them is one call on the buffer."""
    sizes = [t.numel() for t in like]
    flat = torch.empty(sum(sizes), dtype=dtype, device=like[0].device)
    return flat, [v.view(t.shape) for v, t in zip(flat.split(sizes), like)]


def _flat_copy(ts: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """:func:`_flat` filled with ``ts`` (cast to ``dtype``) by one multi-tensor copy."""
    flat, views = _flat(ts, dtype)
    torch._foreach_copy_(views, ts)
    return flat, views


def _spread(per_tensor: Tensor, like: list[Tensor]) -> Tensor:
    """A [n] vector repeated over the elements of each tensor of ``like`` (:func:`_flat`'s
    layout), by one concatenation of broadcast views: no host-to-device copy."""
    return torch.cat([x.expand(t.numel()) for x, t in zip(per_tensor.unbind(), like)])


def _overflow_scale(G: list[Tensor], numels: list[float]) -> tuple[Tensor, list, Tensor]:
    """Per tensor, on the device: ``wide`` (bool [n]): its sums of g^2 could overflow float32
    (max|g|^2 numel >= 2^127); the exact power of two ``s = 2^-k`` to scale g by before squaring
    (0-d tensors, 1 where not wide: the same bits as without it); and ``4^k`` (float64 [n]) that
    unscales the sums. No host read and one pass over the bucket: max|g| of every tensor in one
    multi-tensor reduction; k from it on the [n] vector (the per-tensor term log2(numel) / 2
    enters as a list of host floats, kernel arguments rather than a copy to the device)."""
    logs = list(torch._foreach_norm(G, float("inf")))  # max|g|
    torch._foreach_log2_(logs)
    torch._foreach_add_(logs, [0.5 * math.log2(max(k, 1.0)) - 63.5 for k in numels])
    k = torch.stack(logs).to(torch.float32).ceil_()
    k = torch.nan_to_num(k, nan=0.0, posinf=0.0).clamp_(0.0, 100.0)  # (inf, NaN g: unscaled)
    ki = k.to(torch.int32)
    s = ((127 - ki) << 23).view(torch.float32)  # 2^-k, exact
    up = ((1023 + 2 * ki.to(torch.int64)) << 52).view(torch.float64)  # 4^k, exact
    return k > 0, list(s.unbind()), up


def _scalar64(s: Scalar, n: int) -> float | list[Tensor]:
    """A bucket scalar in float64: a host float, or n 0-d tensors (one cast of the stack)."""
    if isinstance(s, float):
        return s
    return list(torch.stack(_each(s, n)).double().unbind())


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
) -> tuple[tuple[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]:
    """The reference's float64 averages of R and C from the scaled float32 sums (before they
    are scaled in place): sum * 4^k * scale^2 / n + eps1, lerped in float64. Computed for every
    tensor (the caller keeps them where ``wide``), on the small vectors, one multi-tensor call
    per operation for the bucket; each as a buffer and its views (:func:`_flat`)."""
    n = len(rows)
    k2 = up  # 4^k scale^2, float64 [n]
    if isinstance(gscale, list):
        k2 = up * torch.stack(gscale).double().square()
    elif isinstance(gscale, Tensor):
        k2 = up * gscale.double().square()
    elif gscale != 1.0:
        k2 = up * (gscale * gscale)
    k2s = list(k2.unbind())
    w = _scalar64(w2, n)
    out = []
    for sums, counts, avg in ((rows, ncols, b.row_vars), (cols, nrows, b.col_vars)):
        _, new = _flat_copy(sums, torch.float64)
        torch._foreach_mul_(new, k2s)
        torch._foreach_div_(new, counts)
        torch._foreach_add_(new, eps1)
        flat, avg64 = _flat_copy(avg, torch.float64)
        torch._foreach_lerp_(avg64, new, w)
        out.append((flat, avg64))
    return out[0], out[1]


def _full_u(
    V: list[Tensor],
    G: list[Tensor],
    numer: list[Tensor],
    eps1: float,
    clamp: bool,
    w2: Scalar,
    skip: Tensor | None,
) -> list[Tensor]:
    """Unfactored tensors with float32 math: V <- lerp(V, g^2 + eps1, 1 - beta2_t) and
    U = numer / sqrt(V), with the reference's float64 path per element: where g^2 would
    overflow float32 (|g| >= 2^63) g, V and eps1 are scaled by s = 2^-64 (exact):
    V' = lerp(V s^2, (g s)^2 + eps1 s^2, w), U = s numer / sqrt(V') and V is stored as V' / s^2,
    saturated. s = 1 elsewhere: the same bits as without it. Decided per element on the device
    (no host read).

    A float32 V without ``skip`` is averaged in place, the bucket at once (one multi-tensor call
    per operation; temporaries: s, the new squares, U); otherwise (V's old values kept for the
    mask, or a float32 copy of another dtype) one tensor at a time, so that the temporaries stay
    a few of one tensor."""
    if V[0].dtype == torch.float32 and skip is None:
        return _full_u_of(V, G, numer, eps1, clamp, w2, skip)
    ws: list[Scalar] = [w2] * len(V) if isinstance(w2, float) else [[w] for w in _each(w2, len(V))]
    return [
        _full_u_of([v], [g], [num], eps1, clamp, w, skip)[0]
        for v, g, num, w in zip(V, G, numer, ws)
    ]


def _full_u_of(
    V: list[Tensor],
    G: list[Tensor],
    numer: list[Tensor],
    eps1: float,
    clamp: bool,
    w: Scalar,
    skip: Tensor | None,
) -> list[Tensor]:
    """:func:`_full_u` on a list of tensors, one multi-tensor call per operation."""
    dt = V[0].dtype
    big_v = torch.finfo(dt).max
    # s from |g| by exact steps: floor(|g| 2^-63) is 0 below 2^63 and at least 1 from it (inf
    # at inf, NaN kept); 1 - min(that, 1) is 1 or 0; at least 2^-64
    S = torch._foreach_abs(G)
    torch._foreach_mul_(S, 2.0**-63)
    torch._foreach_floor_(S)
    torch._foreach_clamp_max_(S, 1.0)
    torch._foreach_mul_(S, -1.0)
    torch._foreach_add_(S, 1.0)
    torch._foreach_clamp_min_(S, 2.0**-64)
    S = _cast(S, torch.float32)  # (exact; float64 for a 0-d g times a float64 global scale)
    # (g s)^2 + eps1 s^2, eps1 rounded to float32 (a 0-d g times a float64 global scale is
    # float64: its square is rounded to V's dtype, as the reference's)
    new_sq = torch._foreach_mul(G, S)
    torch._foreach_mul_(new_sq, new_sq)
    if not clamp:
        torch._foreach_addcmul_(new_sq, S, S, value=_as_math(eps1, torch.float32))
    if dt == torch.float32 and skip is None:  # V' in place
        torch._foreach_mul_(V, S)
        torch._foreach_mul_(V, S)
        torch._foreach_lerp_(V, _cast(new_sq, dt), w)
        del new_sq
        # this step's V: V' (for s = 1 the stored value: V' is finite, so saturating keeps it)
        U = _rsqrt_floored(V, eps1 if clamp else None)
        torch._foreach_div_(V, S)
        torch._foreach_div_(V, S)
        _saturate_(V, big_v)
    else:
        scaled = torch._foreach_mul(_cast(V, torch.float32), S)
        torch._foreach_mul_(scaled, S)
        torch._foreach_lerp_(scaled, _cast(_cast(new_sq, dt), torch.float32), w)
        del new_sq
        # unscaled in float32, or in float64 for a float64 V (V' / s^2 can exceed float32)
        stored = _cast(scaled, torch.float64 if dt == torch.float64 else torch.float32)
        stored = torch._foreach_div(stored, S)
        torch._foreach_div_(stored, S)
        _saturate_(stored, big_v)
        stored = _cast(stored, dt)
        _commit(V, stored, skip)
        if dt != torch.float32:  # this step's V: the stored one where s is 1, else unrounded
            scaled = [
                torch.where(s < 1.0, a, st.to(torch.float32)) for a, st, s in zip(scaled, stored, S)
            ]
        del stored
        U = _rsqrt_floored(scaled, eps1 if clamp else None)
        del scaled
    torch._foreach_mul_(U, numer)
    torch._foreach_mul_(U, S)
    return U


def _rsqrt_floored(V: list[Tensor], eps1: float | None) -> list[Tensor]:
    """1 / sqrt(V), new tensors; with ``eps1`` (eps1 'clamp') V floored at eps1^2 first."""
    if eps1 is None:
        return list(torch._foreach_rsqrt(V))
    U = list(torch._foreach_clamp_min(V, eps1 * eps1))
    torch._foreach_rsqrt_(U)
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
    # tensor on the device by one reduction over the bucket (_overflow_scale): g is scaled by an
    # exact power of two before squaring and the statistics are averaged in float64 (factored
    # tensors); the float64 work is done for every tensor, as multi-tensor calls on the small
    # vectors, and kept where ``wide`` (which tensors need it is not known on the host)
    wide = None
    if factored or plan.clipnorm is not None:
        wide, g_scale, up = _overflow_scale(G, numels)
    gscale: Scalar = 1.0
    if plan.clipnorm is not None:
        assert wide is not None
        # the reference's clipnorm / max(||g||, clipnorm), on a vector of the bucket's norms:
        # float32 norms, float64 ones where ||g||^2 may be beyond float32
        norm = torch.stack(torch._foreach_norm(G)).double()
        norm = torch.where(wide, torch.stack(torch._foreach_norm(G, 2, dtype=torch.float64)), norm)
        gscale = list((plan.clipnorm / norm.clamp(min=plan.clipnorm)).to(cdt).unbind())
    elif global_scale is not None:
        gscale = global_scale

    alpha: Scalar
    if plan.scale_parameter:
        # float64 sums of x^2, as the reference's (a float32 sum overflows for |x| ~ 1e18)
        x_rms = _sq_mean_sqrt(list(torch._foreach_norm(P, 2, dtype=torch.float64)), numels)
        wd = plan.weight_decay
        if plan.weight_decay_mode == WeightDecay.LR_BEFORE and wd:
            factor = 1 - lr_t * wd
            torch._foreach_mul_(x_rms, _s(abs(factor), n))
        torch._foreach_clamp_max_(x_rms, torch.finfo(cdt).max)  # saturated, as the reference
        if cdt != torch.float64:
            x_rms = list(torch.stack(x_rms).to(cdt).unbind())
        torch._foreach_clamp_min_(x_rms, plan.eps2)
        torch._foreach_mul_(x_rms, _s(rho, n))
        alpha = x_rms
    else:
        alpha = rho

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
        # the float64 averages (buffers and views), and where each tensor's elements are wide
        (r64_flat, r64), (c64_flat, c64) = _wide_factors(
            b, rows, cols, up, gscale, ncols, nrows, 0.0 if clamp else eps1, w2
        )
        wide_r, wide_c = _spread(wide, b.row_vars), _spread(wide, b.col_vars)
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
        new_r_flat, new_r = _flat_copy(b.row_vars, stats_dtype)
        new_c_flat, new_c = _flat_copy(b.col_vars, stats_dtype)
        torch._foreach_lerp_(new_r, _cast(rows, stats_dtype), w2)
        torch._foreach_lerp_(new_c, _cast(cols, stats_dtype), w2)
        del rows, cols
        big_s = torch.finfo(stats_dtype).max  # the float64 averages are stored saturated
        for new_flat, avg_flat, mask in (
            (new_r_flat, r64_flat, wide_r),
            (new_c_flat, c64_flat, wide_c),
        ):
            torch.where(mask, avg_flat.clamp(-big_s, big_s).to(stats_dtype), new_flat, out=new_flat)
        _commit(b.row_vars, new_r, skip)
        _commit(b.col_vars, new_c, skip)
        del new_r, new_c, new_r_flat, new_c_flat

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
        # 1/sqrt(V_hat) as a per-row times a per-column factor, computed on the small vectors;
        # the wide tensors' from the unrounded float64 averages, for the bucket at once
        mean64 = [r.mean(d.row_dim, keepdim=True) for r, d in zip(r64, b.dims) if d is not None]
        torch._foreach_sqrt_(mean64)
        ir_parts = torch._foreach_div(mean64, torch._foreach_sqrt(r64))
        ir_wide = torch.cat([x.view(-1) for x in ir_parts])
        ir_wide = ir_wide.clamp_(max=torch.finfo(cdt).max).to(cdt)
        ic_wide = c64_flat.sqrt().reciprocal_().to(cdt)
        del mean64, ir_parts, r64, c64, r64_flat, c64_flat
        ir_flat, inv_rows = _flat(b.row_vars, cdt)
        ic_flat, inv_cols = _flat(b.col_vars, cdt)
        for rv, cv, d, ir, ic in zip(b.row_vars, b.col_vars, b.dims, inv_rows, inv_cols):
            assert d is not None
            r = rv.to(cdt)
            # sqrt(mean(R)) / sqrt(R), as the reference: R / mean(R) can underflow to 0 beside
            # a saturated row (mean in float64: a float32 sum of saturated rows overflows)
            mean = r.mean(d.row_dim, keepdim=True, dtype=torch.float64).to(cdt)
            torch.div(mean.sqrt_(), r.sqrt(), out=ir)
            torch.reciprocal(cv.to(cdt).sqrt(), out=ic)
        torch.where(wide_r, ir_wide, ir_flat, out=ir_flat)
        torch.where(wide_c, ic_wide, ic_flat, out=ic_flat)
        del ir_wide, ic_wide
        U = torch._foreach_mul(numer, inv_rows)
        torch._foreach_mul_(U, inv_cols)
        del inv_rows, inv_cols, ir_flat, ic_flat
    elif factored:
        # the wide tensors': rsqrt(max(R C / max(mean(R), eps1), eps1^2)) as
        # min(sqrt(max(mean(R), eps1) / R) / sqrt(C), 1 / eps1), the factors from the float64
        # averages on the small vectors (for the bucket at once), their product in float64 (a
        # factor can be beyond float32 where the product is not)
        assert wide is not None
        mean64 = [r.mean(d.row_dim, keepdim=True) for r, d in zip(r64, b.dims) if d is not None]
        torch._foreach_clamp_min_(mean64, eps1)
        ir64 = torch._foreach_div(mean64, r64)
        torch._foreach_sqrt_(ir64)
        ic64 = torch._foreach_rsqrt(c64)
        U = []
        for rv, cv, d, w_i, ir_w, ic_w in zip(
            b.row_vars, b.col_vars, b.dims, wide.unbind(), ir64, ic64
        ):
            assert d is not None
            r, c = rv.to(cdt), cv.to(cdt)
            row_mean = r.mean(d.row_dim, keepdim=True)
            # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            u = (r * c / row_mean.clamp(min=eps1)).clamp_(min=eps1 * eps1).rsqrt_()
            u_w = (ir_w * ic_w).clamp_(max=1.0 / eps1).to(cdt)
            U.append(torch.where(w_i, u_w, u, out=u))
            del u_w
        del mean64, ir64, ic64
        torch._foreach_mul_(U, numer)
    else:
        V = b.variances
        if cdt == torch.float32:
            U = _full_u(V, G, numer, eps1, clamp, w2, skip)
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
    # RMS(U) from float64 squares, as the reference (the true one, also where U^2 overflows)
    rms64 = _sq_mean_sqrt(list(torch._foreach_norm(U, 2, dtype=torch.float64)), numels)
    rms = list(torch.stack(rms64).to(cdt).unbind())
    # saturated where the math overflows, as the reference (_reference._saturate): without update
    # clipping U beside an outlier can exceed float32; finite results keep their bits
    big = torch.finfo(cdt).max
    _saturate_(U, big)
    if plan.clip_threshold is not None:
        div = torch._foreach_div(rms, plan.clip_threshold)
        torch._foreach_clamp_min_(div, 1.0)
        torch._foreach_div_(U, div)
    # alpha_t = RMS(x) rho_t is inf for weights near float32's largest value with rho_t > 1:
    # inf * 0 would be NaN
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
        # saturated at the EMA dtype's largest value, as _driver.update_ema: x cast to a narrower
        # EMA dtype can round to inf (inf * 0 is NaN at m = 1), and so can the sum near it;
        # every finite result keeps its bits
        big_e = torch.finfo(E[0].dtype).max
        if big_e < torch.finfo(pdtype).max:
            XE = torch._foreach_clamp_min(P, -big_e)
            torch._foreach_clamp_max_(XE, big_e)
            XE = _cast(XE, E[0].dtype)
        else:
            XE = _cast(P, E[0].dtype)
        new = torch._foreach_mul(E, m)
        torch._foreach_add_(new, torch._foreach_mul(XE, 1 - m))
        _saturate_(new, big_e)
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
