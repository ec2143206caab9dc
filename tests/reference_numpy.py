"""Float64 NumPy transcriptions of two published Adafactor definitions, for parity tests.

Written from the equations, not from this package (nothing here imports ``adafactor``):

* :class:`PaperAdafactor`: Algorithms 4 (matrices) and 5 (everything else) of Shazeer & Stern
  (2018), "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", as Tensor2Tensor's
  ``AdafactorOptimizer`` runs them: relative step :math:`\\rho_t = \\min(10^{-2}, 1/\\sqrt t)`,
  :math:`\\alpha_t = \\max(\\epsilon_2, \\mathrm{RMS}(X_{t-1}))\\rho_t`,
  :math:`\\hat\\beta_{2t} = 1 - t^{-0.8}`, the row and column **sums** of the paper
  (:math:`R_t`, :math:`C_t`, :math:`\\hat V_t = R_t C_t / 1^\\top R_t`) for rank-2 tensors only,
  a full second moment for every other rank, update clipping with :math:`d = 1`, and optional
  momentum of the scaled update (T2T's ``beta1``).
* :class:`MeshTFAdafactor`: Mesh TensorFlow's ``AdafactorOptimizer`` with the settings T5 trained
  with: factor the two largest dims (ties go to the earlier dim, as a stable sort by decreasing
  size gives) when the second largest is at least ``min_dim_size_to_factor``; moving averages of
  row/column **means**; :math:`\\hat V = v_r v_c / \\mathrm{mean}(v_r)`; parameter scale; update
  clipping over all dims; learning rate :math:`1/\\sqrt{\\max(t, 10^4)}` (T5's ``rsqrt_decay``
  with 10k warm-up steps, which equals :math:`\\min(10^{-2}, 1/\\sqrt t)`); no weight decay.

T2T adds ``mean(G^2) * 1e-30`` to the decay and to the step size (a graph-fusion hack, a no-op for
finite gradients); it is left out here.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

EPS1 = 1e-30
EPS2 = 1e-3


def _rms(x: Array) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _clip(u: Array, d: float) -> Array:
    """Update clipping: :math:`\\hat U = U / \\max(1, \\mathrm{RMS}(U)/d)`."""
    return u / max(1.0, _rms(u) / d)


class PaperAdafactor:
    """Algorithms 4/5 of the paper (Tensor2Tensor's reading), one tensor at a time, float64."""

    def __init__(self, shape: tuple[int, ...], beta1: float | None = None, d: float = 1.0):
        self.shape = shape
        self.beta1 = beta1
        self.d = d
        self.factored = len(shape) == 2  # T2T factors matrices only
        if self.factored:
            n, m = shape
            self.r = np.zeros(n)  # R_t: moving average of the row sums of G^2 + eps1
            self.c = np.zeros(m)  # C_t: moving average of the column sums
        else:
            self.v = np.zeros(shape)
        self.m = np.zeros(shape) if beta1 else None
        self.t = 0

    def step(self, x: Array, g: Array) -> Array:
        """Return X_t from X_{t-1} = ``x`` and G_t = ``g`` (both float64)."""
        self.t += 1
        t = self.t
        rho = min(1e-2, 1.0 / math.sqrt(t))
        alpha = max(EPS2, _rms(x)) * rho
        beta2 = 1.0 - t**-0.8
        sq = np.square(g) + EPS1
        if self.factored:
            self.r = beta2 * self.r + (1.0 - beta2) * sq.sum(axis=1)  # (G^2 + eps1) 1_m
            self.c = beta2 * self.c + (1.0 - beta2) * sq.sum(axis=0)  # 1_n^T (G^2 + eps1)
            v_hat = np.outer(self.r, self.c) / self.r.sum()
        else:
            self.v = beta2 * self.v + (1.0 - beta2) * sq
            v_hat = self.v
        update = alpha * _clip(g / np.sqrt(v_hat), self.d)
        if self.m is not None:
            assert self.beta1 is not None
            self.m = self.beta1 * self.m + (1.0 - self.beta1) * update
            update = self.m
        return x - update


def mesh_tf_factored_dims(
    shape: tuple[int, ...], min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """(d0, d1) = (largest, second largest) dim, or None for a full second moment.

    A stable sort by decreasing size, so among equal sizes the earlier dim ranks first.
    """
    if len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda i: -shape[i])
    d0, d1 = by_size[0], by_size[1]
    if shape[d1] < min_dim_size_to_factor:
        return None
    return d0, d1


class MeshTFAdafactor:
    """Mesh TF's Adafactor as T5 configured it (beta1 = 0, no weight decay), float64."""

    def __init__(self, shape: tuple[int, ...], min_dim_size_to_factor: int = 128, d: float = 1.0):
        self.shape = shape
        self.d = d
        self.dims = mesh_tf_factored_dims(shape, min_dim_size_to_factor)
        if self.dims is not None:
            d0, d1 = self.dims
            self.vr = np.zeros(tuple(s for i, s in enumerate(shape) if i != d0))
            self.vc = np.zeros(tuple(s for i, s in enumerate(shape) if i != d1))
        else:
            self.v = np.zeros(shape)
        self.t = 0

    def step(self, x: Array, g: Array) -> Array:
        """Return the parameter after one step from ``x`` with gradient ``g`` (float64)."""
        self.t += 1
        t = self.t
        lr = 1.0 / math.sqrt(max(t, 1e4))
        decay = 1.0 - t**-0.8
        sq = np.square(g) + EPS1
        if self.dims is not None:
            d0, d1 = self.dims
            self.vr = decay * self.vr + (1.0 - decay) * sq.mean(axis=d0)
            self.vc = decay * self.vc + (1.0 - decay) * sq.mean(axis=d1)
            # vr lost d0, so d1 sits one position earlier in it when d1 > d0.
            ltm = self.vr.mean(axis=d1 - 1 if d1 > d0 else d1, keepdims=True)
            r_factor = np.expand_dims(1.0 / np.sqrt(self.vr / ltm), d0)
            c_factor = np.expand_dims(1.0 / np.sqrt(self.vc), d1)
            u = g * r_factor * c_factor
        else:
            self.v = decay * self.v + (1.0 - decay) * sq
            u = g / np.sqrt(self.v)
        update_scale = lr * max(_rms(x), EPS2)
        return x - update_scale * _clip(u, self.d)
