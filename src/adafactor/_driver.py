"""The pass sequence of a step, for plain tensors and for DTensor shards alike.

:func:`run_passes` steps a list of tensors given as :class:`LocalPasses` (the reference math of
:mod:`adafactor._reference`, or the fused kernel's per-pass entry points) and a
:class:`Reduction` that sums what spans ranks between the passes:

.. code-block:: text

    pass 1      sums of g^2 (per row and column) and of x^2          round 1
    overflow    a finite gradient whose statistics overflow float32:
                pass 1 again in float64                             round 1 again
    statistics  clip factor, alpha, the moving averages R and C     round 2: sum of R over rows
    pass 2      V, U and the sum of U^2                             round 3
    pass 3      clip by RMS(U), momentum, decay, write x; the EMA

On one device the reduction is :data:`LOCAL`: every sum is already the total, so nothing is
copied or sent, and each tensor runs all its passes before the next one starts (only one
tensor's temporaries are alive, as in a per-tensor loop). On DTensors
(:mod:`adafactor.distributed.dtensor`) it all-reduces each round in a few batched collectives.
The unsharded fused kernel is not driven from here: it runs a whole group in one call
(:func:`adafactor._fused_cpu.group_step`) and hands its overflowed tensors to the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _fused_cpu as fused
from . import _reference as ref
from ._plan import GroupPlan, Impl, StepScalars
from .factoring import FactorDims

__all__ = [
    "LOCAL",
    "FusedPasses",
    "LocalPasses",
    "Reduction",
    "ReferencePasses",
    "local_passes",
    "run_passes",
    "update_ema",
]

_F32_MAX = torch.finfo(torch.float32).max


class LocalPasses:
    """One tensor's passes on what this rank holds of it (all of it on one device)."""

    param: Tensor  # the local tensor
    state: dict[str, Any]  # its local state
    dims: FactorDims | None  # the factored dims of the whole tensor
    t: float  # the step (counters already advanced)

    def grad_square_sums(self) -> ref.GradSums:
        """Pass 1: the local sums of g^2 (whole, per row, per column) and of x^2."""
        raise NotImplementedError

    def overflow_probe(self, sums: ref.GradSums) -> float | None:
        """Pass 1's overflow test as a number: NaN when the local gradient has a non-finite
        element (it propagates, as in every reference), inf when the local statistics are beyond
        float32 (:func:`adafactor._reference.beyond_float32`), else the local sum of g^2. A whole
        tensor takes the float64 path on inf; a sharded one when the sum over its shards exceeds
        float32 (see :func:`_widens`). None: no float64 path (float64 math already, or not a CPU
        tensor: reading the test on the host would sync)."""
        raise NotImplementedError

    def widen(self) -> LocalPasses:
        """The same tensor's passes in float64, from pass 1 (pass 1 changed nothing)."""
        raise NotImplementedError

    def finish_statistics(self, sums: ref.GradSums, global_grad_scale: Tensor | None) -> None:
        """From the total pass-1 sums: clip factor, alpha, R and C."""
        raise NotImplementedError

    def row_var_sum(self) -> Tensor:
        """The local sum of R over rows (float64), for mean(R) when rows are sharded."""
        raise NotImplementedError

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        """Pass 2 (given the total sum of R over rows when sharded): the local sum of U^2."""
        raise NotImplementedError

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        """Pass 3 from the total sum of U^2 (``noise``: stochastic rounding's draws); returns
        (alpha_t, RMS(U))."""
        raise NotImplementedError


class ReferencePasses(LocalPasses):
    """The reference math (:mod:`adafactor._reference`) of one tensor."""

    def __init__(self, ts: ref.TensorStep) -> None:
        self.ts, self.param, self.state, self.dims = ts, ts.param, ts.state, ts.dims
        self.t = float(ts.scalars.t)

    def grad_square_sums(self) -> ref.GradSums:
        return ref.grad_square_sums(self.ts)

    def overflow_probe(self, sums: ref.GradSums) -> float | None:
        g = self.ts.grad
        if g.dtype != torch.float32 or g.device.type != "cpu":
            return None
        return _probe(sums, g)

    def widen(self) -> LocalPasses:
        self.ts.widen()
        return self

    def finish_statistics(self, sums: ref.GradSums, global_grad_scale: Tensor | None) -> None:
        ref.finish_statistics(self.ts, sums, global_grad_scale)  # (float64 sums, reduced or not)

    def row_var_sum(self) -> Tensor:
        assert self.dims is not None
        # on the float64 path this step's R is the unrounded one (the state keeps it saturated)
        row_var = (self.ts.wide or {}).get("row_var", self.state["row_var"])
        return row_var.double().sum(self.dims.row_dim, keepdim=True)

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        if row_var_sum is not None:  # else the reference takes the mean of its own (whole) rows
            assert self.dims is not None
            rows = self.ts.shape[self.dims.row_dim]
            self.ts.row_var_mean = (row_var_sum / rows).to(self.ts.grad.dtype)
        return ref.update_square_sum(self.ts)

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        ref.apply_update(self.ts, update_sq, noise)
        assert self.ts.update_rms is not None
        return self.ts.alpha, self.ts.update_rms


def _f64(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _probe(sums: ref.GradSums, grad: Tensor) -> float:
    """:meth:`LocalPasses.overflow_probe` from float64 sums of float32 squares."""
    if not ref.beyond_float32(sums):
        return float(sums.grad_sq)
    return math.inf if bool(grad.isfinite().all()) else math.nan


def _widens(probe: float | Tensor | None, sharded: bool) -> bool:
    """Whether a tensor takes the float64 path, alike on every rank: a whole tensor when its
    statistics are beyond float32 (probe inf: the C kernel's test, so the reference and the
    kernel switch on the same tensors); a sharded one also when the sum of g^2 over its shards
    is (a row or column split across ranks can exceed float32 only in total, which no rank sees
    before the next round; the whole sum bounds every one of them). NaN compares False."""
    if probe is None:
        return False
    return float(probe) > _F32_MAX if sharded else float(probe) == math.inf


class FusedPasses(LocalPasses):
    """The fused C kernel's per-pass entry points (:mod:`adafactor._fused_cpu`) on one local
    shard; its sums are float64 already."""

    def __init__(self, fs: fused.FusedStep, grad: Tensor, scalars: StepScalars) -> None:
        self.fs, self.param, self.state, self.dims = fs, fs.param, fs.state, fs.dims
        self.grad, self.scalars, self.t = grad, scalars, float(scalars.t)

    def grad_square_sums(self) -> ref.GradSums:
        grad_sq, param_sq = fused.grad_square_sums(self.fs)
        if self.dims is None:
            return ref.GradSums(_f64(grad_sq), _f64(param_sq), None, None)
        return ref.GradSums(_f64(grad_sq), _f64(param_sq), self.fs.work(0), self.fs.work(1))

    def overflow_probe(self, sums: ref.GradSums) -> float | None:
        return _probe(sums, self.grad)  # (float64 sums of float32 squares, as the reference's)

    def widen(self) -> LocalPasses:
        fs = self.fs
        ts = ref.prepare(fs.param, self.grad, fs.state, fs.plan, self.scalars, fs.dims, fs.shape)
        return ReferencePasses(ts).widen()

    def finish_statistics(self, sums: ref.GradSums, global_grad_scale: Tensor | None) -> None:
        if sums.row is not None and sums.col is not None:  # the kernel reads the pass-1 buffers
            self.fs.work(0).copy_(sums.row)
            self.fs.work(1).copy_(sums.col)
        grad_sq, param_sq = float(sums.grad_sq), float(sums.param_sq)
        fused.finish_statistics(self.fs, global_grad_scale, grad_sq, param_sq)

    def row_var_sum(self) -> Tensor:
        return self.fs.work(2)

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        if row_var_sum is not None:
            self.fs.work(2).copy_(row_var_sum)
        fused.factor_scales(self.fs)
        return _f64(fused.update_square_sum(self.fs))

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        fused.apply_update(self.fs, float(update_sq), noise)
        return self.fs.alpha, self.fs.update_rms


def local_passes(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    plan: GroupPlan,
    scalars: StepScalars,
    dims: FactorDims | None,
    shape: tuple[int, ...],
) -> LocalPasses:
    """The fused kernel for a non-empty CPU shard it supports (unless ``plan.impl`` is the
    reference, or it cannot build), else the reference math. ``shape``: the whole tensor's."""
    if (
        plan.impl in (Impl.AUTO, Impl.FUSED)
        and param.numel() > 0
        and fused.supports(param, grad, state)
        and fused.available()
    ):
        fs = fused.prepare(param, grad, state, plan, scalars, dims, shape=shape)
        return FusedPasses(fs, grad, scalars)
    return ReferencePasses(ref.prepare(param, grad, state, plan, scalars, dims, shape=shape))


class Reduction:
    """Sums partial sums over the ranks that hold the other shards of a tensor.

    This base class is one device (:data:`LOCAL`): every tensor is whole, so nothing spans."""

    collective = False  # whether a round may communicate (else tensors run one at a time)

    def peers(self, index: int, dims: tuple[int, ...] | None) -> Any:
        """Who else holds tensor ``index``'s sums over ``dims`` (None: all its dims); falsy when
        no one does (the local sum is the total). Alike on every rank."""
        return ()

    def all_reduce(self, values: list[Tensor], peers: list[Any]) -> list[Tensor]:
        """The totals of ``values`` (float64), each summed over its ``peers``."""
        return values


LOCAL = Reduction()


class _Round:
    """The partial sums of one round that span ranks (float64: ranks may run different pass
    variants of one tensor, and a float64 cross-rank sum rounds far below float32)."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.peers: list[Any] = []
        self.targets: list[tuple[Any, str | int]] = []

    def add(self, value: Tensor, peers: Any, target: Any, key: str | int) -> None:
        """``value`` summed over ``peers`` (non-empty) goes to ``target[key]`` (an attribute
        for a string key)."""
        self.values.append(value.double())
        self.peers.append(peers)
        self.targets.append((target, key))

    def run(self, reduction: Reduction) -> None:
        """All-reduce, then store each total where its target wants it."""
        if not self.values:
            return
        for (target, key), total in zip(
            self.targets, reduction.all_reduce(self.values, self.peers)
        ):
            if isinstance(key, str):
                setattr(target, key, total)
            else:
                target[key] = total


def _add_pass1(
    rnd: _Round,
    reduction: Reduction,
    index: int,
    passes: LocalPasses,
    sums: ref.GradSums,
    plan: GroupPlan,
    every: Any,
) -> None:
    """Round 1 entries of one tensor (``every``: the peers of its whole-tensor sums)."""
    # sum(g^2) matters only to clipnorm and sum(x^2) only to scale_parameter
    if plan.clipnorm is not None:
        rnd.add(sums.grad_sq, every, sums, "grad_sq")
    if plan.scale_parameter:
        rnd.add(sums.param_sq, every, sums, "param_sq")
    if passes.dims is not None:
        assert sums.row is not None and sums.col is not None
        row_peers = reduction.peers(index, (passes.dims.col_dim,))  # row sums: over columns
        col_peers = reduction.peers(index, (passes.dims.row_dim,))
        if row_peers:
            rnd.add(sums.row, row_peers, sums, "row")
        if col_peers:
            rnd.add(sums.col, col_peers, sums, "col")


def _step(
    batch: list[LocalPasses],
    indices: Sequence[int],
    plan: GroupPlan,
    reduction: Reduction,
    global_grad_scale: Tensor | None,
    noise: Callable[[int], Tensor | None] | None,
) -> list[tuple[float | Tensor, float | Tensor]]:
    n = len(batch)
    # who else holds each tensor's whole-tensor sums; on one device no one: no round is built
    every = [reduction.peers(k, None) for k in indices] if reduction.collective else [()] * n
    sharded = any(every)

    # pass 1, round 1 (with the overflow probes)
    sums = [p.grad_square_sums() for p in batch]
    probes: list[Any] = [p.overflow_probe(s) for p, s in zip(batch, sums)]
    if sharded:
        first = _Round()
        for j in range(n):
            if every[j]:
                _add_pass1(first, reduction, indices[j], batch[j], sums[j], plan, every[j])
                if probes[j] is not None:
                    first.add(_f64(probes[j]), every[j], probes, j)
        first.run(reduction)

    # a finite gradient whose statistics overflow float32: pass 1 again in float64, decided
    # alike on every rank from the probes' totals
    wide = [j for j in range(n) if _widens(probes[j], bool(every[j]))]
    if wide:
        again = _Round()
        for j in wide:
            batch[j] = batch[j].widen()
            sums[j] = batch[j].grad_square_sums()
            if every[j]:
                _add_pass1(again, reduction, indices[j], batch[j], sums[j], plan, every[j])
        again.run(reduction)

    # statistics, round 2: the sum of R over sharded rows, for mean(R)
    for p, s in zip(batch, sums):
        p.finish_statistics(s, global_grad_scale)
    row_sums: list[Tensor | None] = [None] * n
    if sharded:
        second = _Round()
        for j, (k, p) in enumerate(zip(indices, batch)):
            rows = reduction.peers(k, (p.dims.row_dim,)) if p.dims is not None else ()
            if rows:
                second.add(p.row_var_sum(), rows, row_sums, j)
        second.run(reduction)

    # pass 2, round 3: the sum of U^2
    update_sq = [p.update_square_sum(r) for p, r in zip(batch, row_sums)]
    if sharded:
        third = _Round()
        for j in range(n):
            if every[j]:
                third.add(update_sq[j], every[j], update_sq, j)
        third.run(reduction)

    # pass 3
    out = []
    for k, p, usq in zip(indices, batch, update_sq):
        out.append(p.apply_update(usq, noise(k) if noise is not None else None))
        if plan.use_ema:
            update_ema(p.param, p.state["ema"], plan, p.t)
    return out


def run_passes(
    passes: Iterable[LocalPasses],
    plan: GroupPlan,
    reduction: Reduction = LOCAL,
    global_grad_scale: Tensor | None = None,
    noise: Callable[[int], Tensor | None] | None = None,
) -> list[tuple[float | Tensor, float | Tensor]]:
    """Step every tensor of ``passes`` (their step counters advanced); returns the (alpha_t,
    RMS(U)) of each. ``global_grad_scale``: the global_clipnorm factor; ``noise(k)``: the
    stochastic-rounding draws of the k-th tensor, asked for in pass 3 in order. With a collective
    ``reduction`` it must be called on every rank with the same tensors in the same order."""
    if reduction.collective:
        batch = list(passes)
        return _step(batch, range(len(batch)), plan, reduction, global_grad_scale, noise)
    # Nothing waits for another tensor: one at a time (taken from the iterable only when its
    # turn comes) keeps one tensor's temporaries alive, such as U and a bf16 gradient in float32.
    out = []
    for k, p in enumerate(passes):
        out += _step([p], (k,), plan, reduction, global_grad_scale, noise)
    return out


def update_ema(p: Tensor, ema: Tensor, plan: GroupPlan, t: float) -> None:
    """ema <- m * ema + (1 - m) * x; every ``ema_overwrite_frequency`` steps x <- ema (Keras)."""
    m = plan.ema_momentum
    # tf_keras' expression (two products and a sum), so the EMA rounds as it does there; but where
    # x equals the EMA it stays exact (the expression rounds by an ulp, which a step that changes
    # nothing, such as DCP's get_state_dict with lr 0, would write into x at an overwrite).
    # Saturated at the EMA dtype's largest value, as the step saturates x: weights cast to a
    # narrower EMA dtype (state_dtype) round to inf near the top, which made the EMA inf (NaN at
    # m = 1: inf * 0); the average is clamped too. Every finite result keeps its bits.
    big = min(torch.finfo(p.dtype).max, torch.finfo(ema.dtype).max)
    x = p.clamp(-big, big).to(ema.dtype)
    average = ref._saturate(ema * m + x * (1 - m), ema.dtype)
    ema.copy_(torch.where(x == ema, ema, average))
    freq = plan.ema_overwrite_frequency
    if freq is not None and int(t) % freq == 0:
        p.copy_(ema)
