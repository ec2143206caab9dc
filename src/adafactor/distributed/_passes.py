"""One tensor's local passes for the sharded driver, on the fused kernel or the reference math.

The driver in :mod:`adafactor.distributed.dtensor` all-reduces what these return between the
passes. Both variants hand out float64 partial sums, so a round has one flat buffer per process
group whichever variant each tensor (or rank) uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _fused_cpu as fused
from .. import _reference as ref
from .._plan import GroupPlan, Impl, StepScalars
from ..factoring import FactorDims

__all__ = ["FusedPasses", "LocalPasses", "ReferencePasses", "local_passes"]


def _f64(value: float | Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).reshape(())


class LocalPasses:
    """The interface: pass 1, statistics, pass 2, pass 3 of one local shard."""

    dims: FactorDims | None
    param: Tensor  # the local shard

    def grad_square_sums(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Local sum g^2, sum x^2, row sums and col sums of g^2 (float64)."""
        raise NotImplementedError

    def finish_statistics(
        self,
        sums: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
        global_grad_scale: Tensor | None,
    ) -> Tensor | None:
        """From the reduced pass-1 sums: alpha, R and C; returns the local sum of R over rows."""
        raise NotImplementedError

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        """Pass 2 given the reduced sum of R over rows; returns the local sum of U^2."""
        raise NotImplementedError

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        """Pass 3 given the reduced sum of U^2 (``noise``: stochastic rounding's draws);
        returns (alpha_t, RMS(U))."""
        raise NotImplementedError


class ReferencePasses(LocalPasses):
    def __init__(self, ts: ref.TensorStep) -> None:
        self.ts, self.dims, self.param = ts, ts.dims, ts.param

    def grad_square_sums(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        s = ref.grad_square_sums(self.ts)
        row = None if s.row is None else s.row.double()
        col = None if s.col is None else s.col.double()
        return s.grad_sq.double(), s.param_sq.double(), row, col

    def finish_statistics(
        self,
        sums: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
        global_grad_scale: Tensor | None,
    ) -> Tensor | None:
        dtype = self.ts.grad.dtype
        grad_sq, param_sq, row, col = (None if v is None else v.to(dtype) for v in sums)
        assert grad_sq is not None and param_sq is not None
        ref.finish_statistics(self.ts, ref.GradSums(grad_sq, param_sq, row, col), global_grad_scale)
        if self.dims is None:
            return None
        return self.ts.state["row_var"].double().sum(self.dims.row_dim, keepdim=True)

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        if self.dims is not None and row_var_sum is not None:
            rows = self.ts.shape[self.dims.row_dim]
            self.ts.row_var_mean = (row_var_sum / rows).to(self.ts.grad.dtype)
        return ref.update_square_sum(self.ts).double()

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        ref.apply_update(self.ts, update_sq.to(self.ts.grad.dtype), noise)
        assert self.ts.update_rms is not None
        return self.ts.alpha, self.ts.update_rms


class FusedPasses(LocalPasses):
    def __init__(self, fs: fused.FusedStep) -> None:
        self.fs, self.dims, self.param = fs, fs.dims, fs.param

    def grad_square_sums(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        grad_sq, param_sq = fused.grad_square_sums(self.fs)
        if self.dims is None:
            return _f64(grad_sq), _f64(param_sq), None, None
        return _f64(grad_sq), _f64(param_sq), self.fs.work(0), self.fs.work(1)

    def finish_statistics(
        self,
        sums: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
        global_grad_scale: Tensor | None,
    ) -> Tensor | None:
        grad_sq, param_sq, row, col = sums
        if row is not None and col is not None:  # the kernel reads the pass-1 buffers
            self.fs.work(0).copy_(row)
            self.fs.work(1).copy_(col)
        fused.finish_statistics(
            self.fs, global_grad_scale, float(grad_sq.item()), float(param_sq.item())
        )
        return None if self.dims is None else self.fs.work(2)

    def update_square_sum(self, row_var_sum: Tensor | None) -> Tensor:
        if row_var_sum is not None:
            self.fs.work(2).copy_(row_var_sum)
        fused.factor_scales(self.fs)
        return _f64(fused.update_square_sum(self.fs))

    def apply_update(
        self, update_sq: Tensor, noise: Tensor | None
    ) -> tuple[float | Tensor, float | Tensor]:
        fused.apply_update(self.fs, float(update_sq.item()), noise)
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
    reference, or it cannot build), else the reference math."""
    if (
        plan.impl in (Impl.AUTO, Impl.FUSED)
        and param.numel() > 0
        and fused.supports(param, grad, state)
        and fused.available()
    ):
        return FusedPasses(fused.prepare(param, grad, state, plan, scalars, dims, shape=shape))
    return ReferencePasses(ref.prepare(param, grad, state, plan, scalars, dims, shape=shape))
