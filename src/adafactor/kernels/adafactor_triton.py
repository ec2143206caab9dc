"""Triton kernels for the Adafactor step of a param group (CUDA; CPU tensors under
``TRITON_INTERPRET=1``).

The same three passes as :mod:`adafactor._reference`, batched: the group's tensors are bucketed by
kind (dtypes, factored or not, tile shape, whether the column dim is contiguous) and each bucket
runs one launch per pass, whatever its number of tensors. A launch finds its tensors through
tables: an int64 table of per-tensor data pointers, sizes and buffer offsets, and a table that
maps each program to a (tensor, tile) pair. Per bucket:

.. code-block:: text

    stats    strips of row blocks: row sums of g^2 (a partial per column block), column sums
             (a partial per strip), sums of g^2 and x^2 and max |g| (a partial per program)
    reduce1  per tensor: the partials in a fixed order -> overflow test, clip factor, alpha_t
    factors  per (tensor, slice, chunk): R, C <- lerp(R, C, mean g^2 + eps1, 1 - beta2_t);
             partial sums of the new R for mean(R)                      (factored buckets only)
    pass2    tiles: U = numerator / sqrt(V_hat) (V and the 'grad' momentum updated); sum U^2
    reduce2  per tensor: RMS(U) (partials added in float64), the update-clipping divisor
    apply    tiles: U again, clipping, momentum, weight decay, the write (stochastic rounding),
             the EMA of the weights

so a bucket is 6 launches (factored) or 5 (unfactored; 3 without ``scale_parameter`` and
``clipnorm``), and a GPT-2 step (two buckets) is 11 launches.

* **Deterministic.** No atomics: every sum is per program (``tl.sum``) into a buffer, then
  added in a fixed order by the next kernel. Results are bitwise the same from run to run.
* **No per-element integer division.** A program decodes its tile once (scalar div/mod on the
  program's tile index); elements are addressed as ``base + row * row_stride + col``. A factored
  tensor is viewed as ``[A, R, B, C, D]`` (R, C: its factored dims), so every layout is handled;
  buckets with ``D == 1`` (the column dim innermost) compile with a unit column stride.
* **Grids that fill the GPU.** Tiles of 2048 elements, shaped by the tensor: 16 x 128 by
  default, 128 x 16 for tall narrow tensors (C <= 16), 4 x 512 for wide flat ones (R <= 4),
  2048 x 1 and 1 x 2048 for a single column or row; unfactored tensors in flat chunks of 2048.
* **NaN as in the reference.** ``tl.maximum``/``tl.minimum`` return the non-NaN operand on GPUs
  (and under the interpreter): every clamp goes through :func:`_max_nan`/:func:`_min_nan`.
* **Rounding as in the reference.** Kernels compile with ``enable_fp_fusion=False`` (no implicit
  FMA; torch's separate kernels round each product), with IEEE ``sqrt_rn``/``div_rn``; torch's
  ``lerp`` is one FMA on both CPU (vectorised) and CUDA, and so is :func:`_lerp`. Casts to bf16
  round to nearest even explicitly (the interpreter truncates) and keep NaN.
* **No host synchronisation.** Every data-dependent scalar (alpha_t, the clip factors, RMS(U))
  lives in a per-tensor device buffer; per-step scalars (1 - beta2_t, rho_t, the weight-decay
  factors) are a small per-tensor float table, made on the host from host step counters or on
  the device from device step counters (capturable mode). ``found_inf`` masks every store.
* **Device guard.** Launches run under ``torch.cuda.device`` of the tensors; a group spread over
  devices is one batched step per device (:func:`run_part`).

Supported: float32 and bfloat16 parameters (float16, bfloat16 or float32 gradients), float32
statistics, float32/bfloat16 momentum and EMA, every option of the plan (clipnorm,
global_clipnorm, eps1 'add'/'clamp', every momentum kind and weight-decay form, maximize,
clipvalue, stochastic rounding with the given draws, the EMA with overwrites) and every factor
layout. Not supported (the reference runs them): float16/float64 parameters, non-float32
statistics, non-contiguous tensors, empty tensors. U, the momentum and the weights saturate at
their dtype's largest value as in the reference (finite without update clipping).

**Overflowing gradients** (a finite g whose squares overflow float32: |g| above about 1.8e19,
or sums beyond 3.4e38) take the reference's float64 path, decided per tensor on the device (no
host read, no extra launch): the statistics kernel also keeps max |g|, and ``reduce1`` flags a
factored tensor whose float32 sum of g^2 overflowed (or came within 2^-8 of it) while max |g| is
finite. For a flagged tensor the factors kernel reads g again (one program per chunk of rows or
columns) and averages R and C in float64, stored saturated, this step's unrounded values kept in
float64 buffers; pass 2 and the apply pass take U's per-row and per-column factors from those
(U in float32, as foreach), and pass 2 sums its U^2 in float64; ``clipnorm`` takes ||g|| from a
float64 sum (one program reads g). Unfactored tensors need no flag: an element with |g| >= 2^63
is scaled by 2^-64 (exact) for its V and U, V stored saturated by the apply pass (pass 2 leaves
those elements, so both passes compute V from the same old V). Ordinary gradients take the
float32 code as before; what the fast path gains: max |g| in the statistics kernel, a flag load
and branch per program, a few exact multiplications by 1 per unfactored element, and float64
additions of the few per-program partials of mean(R) and of RMS(U) (as the reference's float64
sums: a float32 sum of U^2 beside an outlier overflows where the reference's does not; a
program whose float32 sum of U^2 overflows adds its squares again in float64). The overflow
step itself is slow (a few programs re-read the tensor), and near float32's largest value U
exceeds float32 on that step, as in foreach (finite, but not the reference's float64 U).

Status: checked against the reference on CPU under the interpreter only; not yet run on a GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._plan import Eps1Mode, GroupPlan, Momentum, WeightDecay, step_scalars
from ..factoring import FactorDims

if TYPE_CHECKING:  # (adafactor.ops imports this module lazily, through triton_module())
    from ..ops import OpArgs

__all__ = ["KERNELS", "group_step", "run_part", "supports"]

# The option values of adafactor._plan, as constexprs the kernels compare against.
MOM_GRAD: tl.constexpr = tl.constexpr(int(Momentum.GRAD))
MOM_NORMALIZED_UPDATE: tl.constexpr = tl.constexpr(int(Momentum.NORMALIZED_UPDATE))
MOM_UPDATE: tl.constexpr = tl.constexpr(int(Momentum.UPDATE))
WD_LR: tl.constexpr = tl.constexpr(int(WeightDecay.LR))
WD_LR_BEFORE: tl.constexpr = tl.constexpr(int(WeightDecay.LR_BEFORE))
WD_ALPHA: tl.constexpr = tl.constexpr(int(WeightDecay.ALPHA))

# Columns of the per-tensor int64 table (pointers, sizes, offsets into the bucket's buffers).
M_P: tl.constexpr = tl.constexpr(0)  # parameter
M_G: tl.constexpr = tl.constexpr(1)  # gradient
M_S1: tl.constexpr = tl.constexpr(2)  # row_var (factored) or variance
M_S2: tl.constexpr = tl.constexpr(3)  # col_var (factored)
M_M: tl.constexpr = tl.constexpr(4)  # exp_avg
M_E: tl.constexpr = tl.constexpr(5)  # ema
M_N: tl.constexpr = tl.constexpr(6)  # stochastic-rounding draws (int32)
M_NUMEL: tl.constexpr = tl.constexpr(7)
M_A: tl.constexpr = tl.constexpr(8)  # [A, R, B, C, D]: the factored view
M_R: tl.constexpr = tl.constexpr(9)
M_B: tl.constexpr = tl.constexpr(10)
M_C: tl.constexpr = tl.constexpr(11)
M_D: tl.constexpr = tl.constexpr(12)
M_NRB: tl.constexpr = tl.constexpr(13)  # row blocks (tiles along R)
M_NCB: tl.constexpr = tl.constexpr(14)  # column blocks
M_ROWPART: tl.constexpr = tl.constexpr(15)  # offset of the row-sum partials
M_COLPART: tl.constexpr = tl.constexpr(16)  # offset of the column-sum partials
M_PROG0: tl.constexpr = tl.constexpr(17)  # first program (tile) of the tensor in the grid
M_NPROG: tl.constexpr = tl.constexpr(18)
M_RMEAN: tl.constexpr = tl.constexpr(19)  # offset of the mean(R) partials
M_NRC: tl.constexpr = tl.constexpr(20)  # row chunks of the factors kernel
M_OUT: tl.constexpr = tl.constexpr(21)  # position in the op's outputs
M_NROWS: tl.constexpr = tl.constexpr(22)  # elements of row_var (A R B D)
M_NCOLS: tl.constexpr = tl.constexpr(23)  # elements of col_var (A B C D)
M_LOOP: tl.constexpr = tl.constexpr(24)  # row blocks per program of _stats_2d (a strip)
M_NSTRIP: tl.constexpr = tl.constexpr(25)  # strips along R: the column-sum partials per column
M_SPROG0: tl.constexpr = tl.constexpr(26)  # first program of the tensor in the stats grid
M_NSPROG: tl.constexpr = tl.constexpr(27)
M_WROW: tl.constexpr = tl.constexpr(28)  # offset of the float64 R of the overflow path
M_WCOL: tl.constexpr = tl.constexpr(29)  # offset of the float64 C of the overflow path
NM: tl.constexpr = tl.constexpr(30)
_OUT_COL = 21 - 7  # M_OUT among the size and offset columns (from M_NUMEL on)
MAX_STRIPS = 64  # column-sum partials per column at most: _factors adds them in one program
# Columns of the per-tensor float32 table of per-step scalars.
H_W2: tl.constexpr = tl.constexpr(0)  # 1 - beta2_t
H_RHO: tl.constexpr = tl.constexpr(1)  # rho_t
H_LRC: tl.constexpr = tl.constexpr(2)  # 1 - lr wd
H_LRWD: tl.constexpr = tl.constexpr(3)  # lr wd
H_WDB: tl.constexpr = tl.constexpr(4)  # |1 - lr wd| under 'lr_before' with wd, else 1
H_WDU: tl.constexpr = tl.constexpr(5)  # wd (0 when lr is 0), 'unscaled'
H_DUE: tl.constexpr = tl.constexpr(6)  # 1: the EMA overwrites the weights this step
NH: tl.constexpr = tl.constexpr(8)
# Columns of the per-tensor float32 results of the reduce kernels.
S_GSCALE: tl.constexpr = tl.constexpr(0)  # gradient scale: clipnorm / global_clipnorm factor
S_ALPHA: tl.constexpr = tl.constexpr(1)
S_DIV: tl.constexpr = tl.constexpr(2)  # max(1, RMS(U) / d)
S_RMS: tl.constexpr = tl.constexpr(3)
S_WIDE: tl.constexpr = tl.constexpr(4)  # 1: the overflow path (float64 statistics), else 0
NS: tl.constexpr = tl.constexpr(5)
# Per stats program: sum of g^2, sum of x^2, max |g|.
T_G: tl.constexpr = tl.constexpr(0)
T_X: tl.constexpr = tl.constexpr(1)
T_AMAX: tl.constexpr = tl.constexpr(2)
TS: tl.constexpr = tl.constexpr(3)

BLOCK_1D = 2048  # elements per program of an unfactored tensor
# (rows, cols) of a program's tile, by the shape of the factored dims
TILES = {
    "square": (16, 128),
    "tall": (128, 16),  # C <= 16
    "column": (BLOCK_1D, 1),  # C == 1
    "wide": (4, 512),  # R <= 4
    "row": (1, BLOCK_1D),  # R == 1
}
FACTOR_BLOCK = 1024  # statistics per program of the factors kernel
WIDE_TILE = (16, 128)  # the factors kernel's tile when it re-reads g (the overflow path)
REDUCE_BLOCK = 512  # partials added per iteration of the reduce kernels


# ---------------------------------------------------------------------------------------------
# element helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _max_nan(x, y):
    """max(x, y) that keeps a NaN x, as torch.clamp (tl.maximum returns y)."""
    return tl.where(x != x, x, tl.maximum(x, y))


@triton.jit
def _min_nan(x, y):
    return tl.where(x != x, x, tl.minimum(x, y))


@triton.jit
def _lerp(a, b, w):
    """torch.lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w); one FMA, as torch's
    CPU (vectorised) and CUDA kernels."""
    small = tl.abs(w) < 0.5
    return tl.fma(tl.where(small, w, w - 1.0), b - a, tl.where(small, a, b))


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 -> dtype. bf16: round to nearest even explicitly (the interpreter truncates) and
    keep NaN a NaN (the rounding bias would turn some NaN payloads into inf)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        r = tl.where(x != x, 0x7FC00000, r)
        return r.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


# Saturation (the reference's _saturate / _lerp_finite_): finite gradients give finite weights and
# state without update clipping; results that round to a finite value keep their bits.
F32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
BF16_MAX: tl.constexpr = tl.constexpr(3.3895313892515355e38)  # larger float32 rounds to inf
# The overflow path: a factored tensor whose float32 sum of g^2 overflows, or comes within
# 2^-8 of F32_MAX (a row or column sum, added in another order, could overflow where the total
# did not), takes float64 statistics, as the reference does when its sums overflow; an
# unfactored element with |g| >= 2^63 (g^2 >= 2^126) is scaled by 2^-64 (exact) for V and U.
WIDE_AT: tl.constexpr = tl.constexpr(3.3895313892515355e38)  # 2^128 (1 - 2^-8)
HUGE_G: tl.constexpr = tl.constexpr(9.223372036854775808e18)  # 2^63
SIG: tl.constexpr = tl.constexpr(5.421010862427522e-20)  # 2^-64
UNSIG: tl.constexpr = tl.constexpr(1.8446744073709552e19)  # 2^64


@triton.jit
def _sat(x, big):
    """x clamped to [-big, big], NaN kept."""
    return _min_nan(_max_nan(x, -big), big)


@triton.jit
def _dtype_max(dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        return BF16_MAX
    else:
        return F32_MAX


@triton.jit
def _mom_lerp(m, b, w, M_DT: tl.constexpr):
    """lerp(m, b, w) of a momentum of dtype M_DT, rounded to it: b saturated to M_DT; where
    b - m overflows float32, the weighted sum m (1 - w) + b w; the result saturated."""
    big = _dtype_max(M_DT)
    b = _cast(_sat(b, big), M_DT).to(tl.float32)
    r = _lerp(m, b, w)
    ws = m * (1.0 - w) + b * w
    return _cast(_sat(tl.where(tl.abs(r) <= F32_MAX, r, ws), big), M_DT)


@triton.jit
def _stochastic_round(x, noise):
    """The reference's stochastic_round_to_bf16: add 16 random low bits, truncate."""
    r = (x.to(tl.int32, bitcast=True) + noise) & -65536
    return _cast(r.to(tl.float32, bitcast=True), tl.bfloat16)


@triton.jit
def _rsqrt(x):
    """1 / sqrt(x) with IEEE sqrt and division (torch's rsqrt on CPU)."""
    return tl.div_rn(1.0, tl.sqrt_rn(x))


@triton.jit
def _ptr(row, col: tl.constexpr, dtype: tl.constexpr):
    return tl.load(row + col).to(tl.pointer_type(dtype))


@triton.jit
def _grad(row, offs, mask, sign, clipv, G_DT: tl.constexpr, HAS_CLIPV: tl.constexpr):
    """The effective gradient: float32, sign (maximize), clipvalue."""
    g = tl.load(_ptr(row, M_G, G_DT) + offs, mask=mask, other=0.0).to(tl.float32) * sign
    if HAS_CLIPV:
        g = _min_nan(_max_nan(g, -clipv), clipv)
    return g


@triton.jit
def _keep(skip_ptr):
    """False when found_inf is set: every store of the step is masked off."""
    return tl.load(skip_ptr) == 0


@triton.jit
def _masked(mask, keep):
    """mask and keep (``mask & keep`` of a block and a scalar fails under the interpreter)."""
    return tl.where(keep, mask, False)


@triton.jit
def _tile(tiles, meta, pid, TR: tl.constexpr, TC: tl.constexpr, CONTIG_C: tl.constexpr):
    """Program ``pid``'s tile: its tensor's table row, slice o = (a, b, d), rows and columns,
    element offsets and the indices of its rows in row_var and its columns in col_var."""
    slot = tl.load(tiles + 2 * pid)
    j = tl.load(tiles + 2 * pid + 1)
    row = meta + slot * NM
    R = tl.load(row + M_R)
    B = tl.load(row + M_B)
    C = tl.load(row + M_C)
    D = tl.load(row + M_D)
    nrb = tl.load(row + M_NRB)
    ncb = tl.load(row + M_NCB)
    cb = j % ncb  # once per program, not per element
    q = j // ncb
    rb = q % nrb
    o = q // nrb
    d = o % D
    a = o // D // B
    b = o // D % B
    rows = rb * TR + tl.arange(0, TR).to(tl.int64)
    cols = cb * TC + tl.arange(0, TC).to(tl.int64)
    rmask = rows < R
    cmask = cols < C
    row_stride = B * C * D
    base = a * R * row_stride + b * C * D + d
    if CONTIG_C:
        offs = base + rows[:, None] * row_stride + cols[None, :]
    else:
        offs = base + rows[:, None] * row_stride + cols[None, :] * D
    mask = rmask[:, None] & cmask[None, :]
    ridx = (a * R + rows) * (B * D) + b * D + d
    cidx = ((a * B + b) * C + cols) * D + d
    return slot, row, o, rb, cb, rmask, cmask, mask, offs, ridx, cidx, R


@triton.jit
def _chunk(chunks, meta, pid, BLOCK: tl.constexpr):
    slot = tl.load(chunks + 2 * pid)
    j = tl.load(chunks + 2 * pid + 1)
    row = meta + slot * NM
    offs = j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return slot, row, offs, offs < tl.load(row + M_NUMEL)


@triton.jit
def _row_mean(rmean_part, row, o, R):
    """mean(R) of slice o in float64 (as the reference: a float32 sum of saturated rows
    overflows): its chunk partials, added in order."""
    off = tl.load(row + M_RMEAN)
    nrc = tl.load(row + M_NRC)
    acc = tl.load(rmean_part + off + o * nrc)
    for k in range(1, nrc):
        acc += tl.load(rmean_part + off + o * nrc + k)
    return acc / R.to(tl.float64)


@triton.jit
def _sum_partials(
    part, row, col: tl.constexpr, stride: tl.constexpr, FIRST: tl.constexpr, COUNT: tl.constexpr,
    RB: tl.constexpr,
):  # fmt: skip
    """Sum of a tensor's per-program partials (column ``col`` of rows of ``stride``; its
    programs: table columns FIRST and COUNT), in a fixed order."""
    p0 = tl.load(row + FIRST)
    n = tl.load(row + COUNT)
    acc = tl.zeros([RB], dtype=part.dtype.element_ty)
    for k0 in range(0, n, RB):
        k = k0 + tl.arange(0, RB)
        acc += tl.load(part + (p0 + k) * stride + col, mask=k < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _max_partials(
    part, row, col: tl.constexpr, stride: tl.constexpr, FIRST: tl.constexpr, COUNT: tl.constexpr,
    RB: tl.constexpr,
):  # fmt: skip
    """The largest of a tensor's per-program partials (non-negative), as _sum_partials."""
    p0 = tl.load(row + FIRST)
    n = tl.load(row + COUNT)
    acc = tl.zeros([RB], dtype=tl.float32)
    for k0 in range(0, n, RB):
        k = k0 + tl.arange(0, RB)
        acc = tl.maximum(acc, tl.load(part + (p0 + k) * stride + col, mask=k < n, other=0.0))
    return tl.max(acc, axis=0)


@triton.jit
def _grad_sq64(row, sign, clipv, G_DT: tl.constexpr, HAS_CLIPV: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """The sum of g^2 of a whole tensor in float64, by one program (the overflow path only)."""
    n = tl.load(row + M_NUMEL)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK).to(tl.int64)
        g = _grad(row, offs, offs < n, sign, clipv, G_DT, HAS_CLIPV).to(tl.float64)
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def _param_sq64(row, P_DT: tl.constexpr, BLOCK: tl.constexpr):
    """The sum of x^2 of a whole tensor from float64 squares, by one program (weights whose
    float32 sum of x^2 overflowed: the true RMS(x), as the reference's)."""
    n = tl.load(row + M_NUMEL)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(_ptr(row, M_P, P_DT) + offs, mask=offs < n, other=0.0).to(tl.float64)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _factored_u(
    row, num, ridx, cidx, rmask, cmask, mean64, wide, wr, wc, eps1, eps1sq, CLAMP: tl.constexpr,
):  # fmt: skip
    """U = numerator / sqrt(V_hat), V_hat = R C / mean(R), for a tile. On the overflow path
    (``wide``) from this step's float64 R and C (``wr``, ``wc``; the state holds them saturated),
    as foreach: float32 factors from the float64 ones, U in float32."""
    if wide:
        r64 = tl.load(wr + ridx, mask=rmask, other=1.0)
        c64 = tl.load(wc + cidx, mask=cmask, other=1.0)
        e64 = tl.cast(eps1, tl.float64)
        if CLAMP:
            v64 = r64[:, None] * c64[None, :] / _max_nan(mean64, e64)
            u = num * (1.0 / tl.sqrt(_max_nan(v64, e64 * e64))).to(tl.float32)
        else:
            inv_r = _min_nan(tl.sqrt(mean64) / tl.sqrt(r64), F32_MAX).to(tl.float32)
            inv_c = (1.0 / tl.sqrt(c64)).to(tl.float32)
            u = num * inv_r[:, None] * inv_c[None, :]
    else:
        mean = mean64.to(tl.float32)
        r = tl.load(_ptr(row, M_S1, tl.float32) + ridx, mask=rmask, other=1.0)
        c = tl.load(_ptr(row, M_S2, tl.float32) + cidx, mask=cmask, other=1.0)
        if CLAMP:  # torch.optim.Adafactor: eps1 floors mean(R), eps1^2 floors V_hat
            v = tl.div_rn(r[:, None] * c[None, :], _max_nan(mean, eps1))
            u = num * _rsqrt(_max_nan(v, eps1sq))
        else:  # the reference's per-row times per-column factor: sqrt(mean(R)) / sqrt(R) (R /
            # mean(R) underflows to 0 beside a saturated row)
            inv_r = tl.div_rn(tl.sqrt_rn(mean), tl.sqrt_rn(r))
            inv_c = _rsqrt(c)
            u = num * inv_r[:, None] * inv_c[None, :]
    return u


# ---------------------------------------------------------------------------------------------
# pass 1: statistics
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stats_2d(
    sprogs, meta, tsum, row_part, col_part, sign, clipv,
    G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, WANT_X: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, CONTIG_C: tl.constexpr,
):  # fmt: skip
    """A strip of M_LOOP row blocks of one column block: the row sums of g^2 of each row
    (partials, one per column block), the strip's column sums (partials, one per strip), its
    sums of g^2 and x^2 and its max |g| (for the overflow test). Strips keep the column
    partials of tall tensors few (_factors adds them in one program)."""
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(sprogs + 2 * pid)
    j = tl.load(sprogs + 2 * pid + 1)
    row = meta + slot * NM
    R = tl.load(row + M_R)
    B = tl.load(row + M_B)
    C = tl.load(row + M_C)
    D = tl.load(row + M_D)
    ncb = tl.load(row + M_NCB)
    nstrip = tl.load(row + M_NSTRIP)
    loop = tl.load(row + M_LOOP)
    cb = j % ncb  # once per program, not per element
    q = j // ncb
    strip = q % nstrip
    o = q // nstrip
    d = o % D
    a = o // D // B
    b = o // D % B
    cols = cb * TC + tl.arange(0, TC).to(tl.int64)
    cmask = cols < C
    row_stride = B * C * D
    base = a * R * row_stride + b * C * D + d
    if CONTIG_C:
        col_offs = cols
    else:
        col_offs = cols * D
    rp = row_part + tl.load(row + M_ROWPART) + cb * tl.load(row + M_NROWS)
    col_acc = tl.zeros([TC], dtype=tl.float32)
    g_acc = tl.zeros([TR], dtype=tl.float32)
    x_acc = tl.zeros([TR], dtype=tl.float32)
    a_acc = tl.zeros([TR], dtype=tl.float32)
    for k in range(0, loop):
        rows = (strip * loop + k) * TR + tl.arange(0, TR).to(tl.int64)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        offs = base + rows[:, None] * row_stride + col_offs[None, :]
        g = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV)
        sq = g * g
        row_sum = tl.sum(sq, axis=1)
        tl.store(rp + (a * R + rows) * (B * D) + b * D + d, row_sum, mask=rmask)
        col_acc += tl.sum(sq, axis=0)
        g_acc += row_sum
        a_acc = tl.maximum(a_acc, tl.max(tl.abs(g), axis=1))
        if WANT_X:
            x = tl.load(_ptr(row, M_P, P_DT) + offs, mask=mask, other=0.0).to(tl.float32)
            x_acc += tl.sum(x * x, axis=1)
    cp = col_part + tl.load(row + M_COLPART) + strip * tl.load(row + M_NCOLS)
    tl.store(cp + ((a * B + b) * C + cols) * D + d, col_acc, mask=cmask)
    tl.store(tsum + TS * pid + T_G, tl.sum(g_acc, axis=0))
    tl.store(tsum + TS * pid + T_AMAX, tl.max(a_acc, axis=0))
    if WANT_X:
        tl.store(tsum + TS * pid + T_X, tl.sum(x_acc, axis=0))


@triton.jit
def _stats_1d(
    chunks, meta, tsum, sign, clipv,
    G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, WANT_X: tl.constexpr,
    WANT_G: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Sums of g^2 and x^2 and max |g| of a chunk of an unfactored tensor."""
    pid = tl.program_id(0).to(tl.int64)
    _slot, row, offs, mask = _chunk(chunks, meta, pid, BLOCK)
    if WANT_G:
        g = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV)
        tl.store(tsum + TS * pid + T_G, tl.sum(g * g, axis=0))
        tl.store(tsum + TS * pid + T_AMAX, tl.max(tl.abs(g), axis=0))
    if WANT_X:
        x = tl.load(_ptr(row, M_P, P_DT) + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(tsum + TS * pid + T_X, tl.sum(x * x, axis=0))


@triton.jit
def _reduce1(
    meta, hyp, scal, tsum, gscale_ptr, skip_ptr, alpha_out, clipnorm, eps2, sign, clipv,
    G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, HAS_GSCALE: tl.constexpr,
    CLIPNORM: tl.constexpr, SCALE_PARAM: tl.constexpr, WANT_WIDE: tl.constexpr,
    RB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per tensor: the overflow test, the gradient scale and alpha_t = max(eps2, RMS(x)) rho_t
    (or rho_t).

    The overflow path (the reference's float64 path, decided on the device): a finite gradient
    whose float32 sum of g^2 reaches WIDE_AT, so that its row or column sums could overflow (a
    NaN or infinite gradient stays on the float32 path, as in the reference). Then
    ``clipnorm`` takes ||g|| from a float64 sum (one program reads the gradient again) and the
    factors kernel computes R and C in float64."""
    slot = tl.program_id(0).to(tl.int64)
    row = meta + slot * NM
    h = hyp + slot * NH
    gscale = 1.0
    wide = False
    wide_f = 0.0
    if WANT_WIDE:  # factored, or clipnorm
        gsq = _sum_partials(tsum, row, T_G, TS, M_SPROG0, M_NSPROG, RB)
        amax = _max_partials(tsum, row, T_AMAX, TS, M_SPROG0, M_NSPROG, RB)
        wide = (gsq >= WIDE_AT) & (amax <= F32_MAX)
        wide_f = tl.where(wide, 1.0, 0.0)
    if CLIPNORM:  # Keras' clip_by_norm: clipnorm / max(||g||, clipnorm)
        if wide:
            norm = tl.sqrt(_grad_sq64(row, sign, clipv, G_DT, HAS_CLIPV, BLOCK))
            gscale = (clipnorm / _max_nan(norm, tl.cast(clipnorm, tl.float64))).to(tl.float32)
        else:
            gscale = tl.div_rn(clipnorm, _max_nan(tl.sqrt_rn(gsq), clipnorm))
    elif HAS_GSCALE:
        gscale = tl.load(gscale_ptr).to(tl.float32)
    alpha = tl.load(h + H_RHO)
    if SCALE_PARAM:
        xsq = _sum_partials(tsum, row, T_X, TS, M_SPROG0, M_NSPROG, RB)
        x_rms = tl.sqrt_rn(tl.div_rn(xsq, tl.load(row + M_NUMEL).to(tl.float32)))
        if xsq > F32_MAX:  # a float32 sum overflowed (inf): one program sums float64 squares
            x_sq64 = _param_sq64(row, P_DT, BLOCK)
            x_rms = tl.sqrt(x_sq64 / tl.load(row + M_NUMEL).to(tl.float64)).to(tl.float32)
        # RMS(x) saturated, as the reference (it can round past it: inf * rho is NaN at lr 0)
        alpha = _max_nan(_min_nan(x_rms * tl.load(h + H_WDB), F32_MAX), eps2) * alpha
    tl.store(scal + slot * NS + S_GSCALE, gscale)
    tl.store(scal + slot * NS + S_ALPHA, alpha)
    tl.store(scal + slot * NS + S_WIDE, wide_f)
    keep = _keep(skip_ptr)
    tl.store(alpha_out + tl.load(row + M_OUT), tl.where(keep, alpha, 0.0))


@triton.jit
def _factors(
    fprogs, meta, hyp, scal, row_part, col_part, rmean_part, wide_r, wide_c, skip_ptr, eps1,
    sign, clipv, G_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, ADD_EPS1: tl.constexpr,
    FB: tl.constexpr, WR: tl.constexpr, WC: tl.constexpr,
):  # fmt: skip
    """R (or C) of a chunk of slice o: the partial sums in order, * scale^2 / n (+ eps1), lerped
    into the state; for R also the chunk's sum of the new R (float64, for mean(R)). On the
    overflow path (:func:`_wide_factors`) from float64 sums of g^2 instead."""
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(fprogs + 4 * pid)
    o = tl.load(fprogs + 4 * pid + 1)
    chunk = tl.load(fprogs + 4 * pid + 2)
    kind = tl.load(fprogs + 4 * pid + 3)
    row = meta + slot * NM
    R = tl.load(row + M_R)
    B = tl.load(row + M_B)
    C = tl.load(row + M_C)
    D = tl.load(row + M_D)
    d = o % D
    a = o // D // B
    b = o // D % B
    gscale = tl.load(scal + slot * NS + S_GSCALE)
    w2 = tl.load(hyp + slot * NH + H_W2)
    keep = _keep(skip_ptr)
    if tl.load(scal + slot * NS + S_WIDE) != 0:
        part = _wide_factors(
            row, kind, chunk, a, b, d, R, B, C, D, gscale, w2, eps1, keep, wide_r, wide_c,
            sign, clipv, G_DT, HAS_CLIPV, ADD_EPS1, FB, WR, WC,
        )  # fmt: skip
    else:
        sq = gscale * gscale
        k = chunk * FB + tl.arange(0, FB).to(tl.int64)
        if kind == 0:
            m = k < R
            idx = (a * R + k) * (B * D) + b * D + d
            base = row_part + tl.load(row + M_ROWPART)
            stride = tl.load(row + M_NROWS)
            nblocks = tl.load(row + M_NCB)
            n = C
            st_ptr = _ptr(row, M_S1, tl.float32)
        else:
            m = k < C
            idx = ((a * B + b) * C + k) * D + d
            base = col_part + tl.load(row + M_COLPART)
            stride = tl.load(row + M_NCOLS)
            nblocks = tl.load(row + M_NSTRIP)
            n = R
            st_ptr = _ptr(row, M_S2, tl.float32)
        acc = tl.load(base + idx, mask=m, other=0.0)
        for blk in range(1, nblocks):
            acc += tl.load(base + blk * stride + idx, mask=m, other=0.0)
        new = acc * tl.div_rn(sq, n.to(tl.float32))
        if ADD_EPS1:
            new = new + eps1
        st = _lerp(tl.load(st_ptr + idx, mask=m, other=0.0), new, w2)
        tl.store(st_ptr + idx, st, mask=_masked(m, keep))
        part = tl.sum(tl.where(m, st, 0.0).to(tl.float64), axis=0)
    if kind == 0:
        nrc = tl.load(row + M_NRC)
        tl.store(rmean_part + tl.load(row + M_RMEAN) + o * nrc + chunk, part)


@triton.jit
def _wide_factors(
    row, kind, chunk, a, b, d, R, B, C, D, gscale, w2, eps1, keep, wide_r, wide_c, sign, clipv,
    G_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, ADD_EPS1: tl.constexpr, FB: tl.constexpr,
    WR: tl.constexpr, WC: tl.constexpr,
):  # fmt: skip
    """The overflow path of a chunk of R (kind 0) or C (kind 1): the reference's float64 math.
    The float32 partial sums overflowed, so the chunk's sums of g^2 are taken again from the
    gradient in float64 (tiles of WR x WC); averaged in float64; this step's values kept in
    ``wide_r``/``wide_c`` for U, the state stored saturated. Returns the chunk's sum of R."""
    row_stride = B * C * D
    base = a * R * row_stride + b * C * D + d
    sq = gscale.to(tl.float64) * gscale.to(tl.float64)
    w = w2.to(tl.float64)
    part = tl.zeros([], dtype=tl.float64)
    lo = chunk * FB
    if kind == 0:
        hi = tl.minimum(lo + FB, R)
        st_ptr = _ptr(row, M_S1, tl.float32)
        wbuf = wide_r + tl.load(row + M_WROW)
        for r0 in range(lo, hi, WR):
            rows = r0 + tl.arange(0, WR).to(tl.int64)
            rm = rows < hi
            acc = tl.zeros([WR], dtype=tl.float64)
            for c0 in range(0, C, WC):
                cols = c0 + tl.arange(0, WC).to(tl.int64)
                mask = rm[:, None] & (cols < C)[None, :]
                offs = base + rows[:, None] * row_stride + cols[None, :] * D
                g = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV).to(tl.float64)
                acc += tl.sum(g * g, axis=1)
            idx = (a * R + rows) * (B * D) + b * D + d
            part += _wide_average(acc, idx, rm, C, sq, w, eps1, keep, st_ptr, wbuf, ADD_EPS1)
    else:
        hi = tl.minimum(lo + FB, C)
        st_ptr = _ptr(row, M_S2, tl.float32)
        wbuf = wide_c + tl.load(row + M_WCOL)
        for c0 in range(lo, hi, WC):
            cols = c0 + tl.arange(0, WC).to(tl.int64)
            cm = cols < hi
            acc = tl.zeros([WC], dtype=tl.float64)
            for r0 in range(0, R, WR):
                rows = r0 + tl.arange(0, WR).to(tl.int64)
                mask = (rows < R)[:, None] & cm[None, :]
                offs = base + rows[:, None] * row_stride + cols[None, :] * D
                g = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV).to(tl.float64)
                acc += tl.sum(g * g, axis=0)
            idx = ((a * B + b) * C + cols) * D + d
            part += _wide_average(acc, idx, cm, R, sq, w, eps1, keep, st_ptr, wbuf, ADD_EPS1)
    return part


@triton.jit
def _wide_average(acc, idx, m, n, sq, w, eps1, keep, st_ptr, wbuf, ADD_EPS1: tl.constexpr):
    """The reference's _average on its float64 path: lerp(state, sum * scale^2 / n (+ eps1), w)
    in float64, kept unrounded in ``wbuf`` and stored saturated. Returns the sum over ``m``."""
    new = acc * (sq / n.to(tl.float64))
    if ADD_EPS1:
        new = new + tl.cast(eps1, tl.float64)
    st = _lerp(tl.load(st_ptr + idx, mask=m, other=0.0).to(tl.float64), new, w)
    tl.store(wbuf + idx, st, mask=m)
    tl.store(st_ptr + idx, _sat(st, F32_MAX).to(tl.float32), mask=_masked(m, keep))
    return tl.sum(tl.where(m, st, 0.0), axis=0)


# ---------------------------------------------------------------------------------------------
# pass 2: U and the sum of U^2
# ---------------------------------------------------------------------------------------------
@triton.jit
def _numerator(row, offs, mask, gs, w1, keep, M_DT: tl.constexpr, MOM: tl.constexpr,
               UPDATE: tl.constexpr):  # fmt: skip
    """The scaled gradient, or with momentum 'grad' its moving average (updated in pass 2)."""
    if MOM == MOM_GRAD:
        mp = _ptr(row, M_M, M_DT) + offs
        m = tl.load(mp, mask=mask, other=0.0).to(tl.float32)
        if UPDATE:
            m = _mom_lerp(m, gs, w1, M_DT)
            tl.store(mp, m, mask=_masked(mask, keep))
            m = m.to(tl.float32)
        return m
    else:
        return gs


@triton.jit
def _pass2_2d(
    tiles, meta, hyp, scal, rmean_part, wide_r, wide_c, usum, skip_ptr, sign, clipv, eps1,
    eps1sq, w1,
    G_DT: tl.constexpr, M_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, MOM: tl.constexpr,
    CLAMP: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    CONTIG_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    slot, row, o, _rb, _cb, rmask, cmask, mask, offs, ridx, cidx, R = _tile(
        tiles, meta, pid, TR, TC, CONTIG_C
    )
    keep = _keep(skip_ptr)
    s = scal + slot * NS
    gs = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV) * tl.load(s + S_GSCALE)
    num = _numerator(row, offs, mask, gs, w1, keep, M_DT, MOM, True)
    mean = _row_mean(rmean_part, row, o, R)
    wide = tl.load(s + S_WIDE) != 0
    wr = wide_r + tl.load(row + M_WROW)
    wc = wide_c + tl.load(row + M_WCOL)
    u = _factored_u(row, num, ridx, cidx, rmask, cmask, mean, wide, wr, wc, eps1, eps1sq, CLAMP)
    usq = tl.sum(tl.sum(tl.where(mask, u * u, 0.0), axis=1), axis=0).to(tl.float64)
    if wide or usq > F32_MAX:  # float64 squares: U beside an outlier can be far beyond 1e19
        u64 = u.to(tl.float64)
        usq = tl.sum(tl.sum(tl.where(mask, u64 * u64, 0.0), axis=1), axis=0)
    tl.store(usum + pid, usq)


@triton.jit
def _unfactored_u(row, offs, mask, gs, num, w2, eps1, eps1sq, keep, CLAMP: tl.constexpr,
                  UPDATE: tl.constexpr):  # fmt: skip
    """V <- lerp(V, g^2 + eps1, 1 - beta2_t) and U = numerator / sqrt(V_hat).

    The overflow path per element, as foreach: where g^2 would overflow float32 (|g| >= 2^63,
    finite) g, V and eps1 are scaled by s = 2^-64 (exact): V' = lerp(V s^2, (g s)^2 + eps1 s^2, w),
    U = s numerator / sqrt(V'), V stored as V' / s^2 saturated. s = 1 elsewhere: the same bits as
    without it. Pass 2 (``UPDATE``) stores V of the other elements; the apply pass, which reads
    the state again, stores it at those elements (so both compute V' from the same old V)."""
    vp = _ptr(row, M_S1, tl.float32) + offs
    v = tl.load(vp, mask=mask, other=1.0)
    ga = tl.abs(gs)
    huge = (ga >= HUGE_G) & (ga <= F32_MAX)
    sig = tl.where(huge, SIG, 1.0)
    unsig = tl.where(huge, UNSIG, 1.0)
    gq = gs * sig
    new = gq * gq
    if not CLAMP:
        new = new + eps1 * sig * sig
    v2 = _lerp(v * sig * sig, new, w2)
    stored = tl.where(huge, _sat(v2 * unsig * unsig, F32_MAX), v2)
    if UPDATE:
        tl.store(vp, stored, mask=_masked(tl.where(huge, False, mask), keep))
        vu = tl.where(huge, v2, stored)
    else:  # V is this step's already, but at the huge elements
        tl.store(vp, stored, mask=_masked(tl.where(huge, mask, False), keep))
        vu = tl.where(huge, v2, v)
    if CLAMP:
        vu = _max_nan(vu, eps1sq)
    return num * _rsqrt(vu) * sig


@triton.jit
def _pass2_1d(
    chunks, meta, hyp, scal, usum, skip_ptr, sign, clipv, eps1, eps1sq, w1,
    G_DT: tl.constexpr, M_DT: tl.constexpr, HAS_CLIPV: tl.constexpr, MOM: tl.constexpr,
    CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    slot, row, offs, mask = _chunk(chunks, meta, pid, BLOCK)
    keep = _keep(skip_ptr)
    gs = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV) * tl.load(scal + slot * NS)
    num = _numerator(row, offs, mask, gs, w1, keep, M_DT, MOM, True)
    w2 = tl.load(hyp + slot * NH + H_W2)
    u = _unfactored_u(row, offs, mask, gs, num, w2, eps1, eps1sq, keep, CLAMP, True)
    usq = tl.sum(tl.where(mask, u * u, 0.0), axis=0).to(tl.float64)
    if usq > F32_MAX:  # the float32 sum overflowed: float64 squares (the true RMS(U))
        u64 = u.to(tl.float64)
        usq = tl.sum(tl.where(mask, u64 * u64, 0.0), axis=0)
    tl.store(usum + pid, usq)


@triton.jit
def _reduce2(
    meta, scal, usum, skip_ptr, rms_out, clip_d, CLIP: tl.constexpr, RB: tl.constexpr,
):  # fmt: skip
    """Per tensor: RMS(U) and the update-clipping divisor max(1, RMS(U) / d), from the
    programs' sums of U^2 added in float64 (as the reference)."""
    slot = tl.program_id(0).to(tl.int64)
    row = meta + slot * NM
    usq = _sum_partials(usum, row, 0, 1, M_PROG0, M_NPROG, RB)
    rms64 = tl.sqrt(usq / tl.load(row + M_NUMEL).to(tl.float64))
    rms = rms64.to(tl.float32)
    div = 1.0
    if CLIP:
        div = _max_nan(rms64 / tl.cast(clip_d, tl.float64), 1.0).to(tl.float32)
    tl.store(scal + slot * NS + S_DIV, div)
    tl.store(scal + slot * NS + S_RMS, rms)
    keep = _keep(skip_ptr)
    tl.store(rms_out + tl.load(row + M_OUT), tl.where(keep, rms, 0.0))


# ---------------------------------------------------------------------------------------------
# pass 3: clip, momentum, weight decay, write, EMA
# ---------------------------------------------------------------------------------------------
@triton.jit
def _apply(
    row, h, s, offs, mask, u, w1, wd, ema_m, ema_1m, keep,
    P_DT: tl.constexpr, M_DT: tl.constexpr, E_DT: tl.constexpr, MOM: tl.constexpr,
    CLIP: tl.constexpr, HAS_WD: tl.constexpr, WD_MODE: tl.constexpr, SR: tl.constexpr,
    EMA: tl.constexpr,
):  # fmt: skip
    u = _sat(u, F32_MAX)  # U beyond float32 (no update clipping, beside an outlier)
    if CLIP:
        u = tl.div_rn(u, tl.load(s + S_DIV))
    # alpha_t = RMS(x) rho_t is inf for weights near float32's largest value with rho_t > 1:
    # inf * 0 would be NaN
    alpha = _min_nan(tl.load(s + S_ALPHA), F32_MAX)
    if MOM == MOM_NORMALIZED_UPDATE:  # big_vision: momentum of U_hat, before alpha
        mp = _ptr(row, M_M, M_DT) + offs
        m = _mom_lerp(tl.load(mp, mask=mask, other=0.0).to(tl.float32), u, w1, M_DT)
        tl.store(mp, m, mask=_masked(mask, keep))
        u = m.to(tl.float32)
    u = _sat(u * alpha, F32_MAX)
    if MOM == MOM_UPDATE:  # T2T / transformers / optax: momentum of alpha U_hat
        mp = _ptr(row, M_M, M_DT) + offs
        m = _mom_lerp(tl.load(mp, mask=mask, other=0.0).to(tl.float32), u, w1, M_DT)
        tl.store(mp, m, mask=_masked(mask, keep))
        u = m.to(tl.float32)
    pp = _ptr(row, M_P, P_DT) + offs
    x = tl.load(pp, mask=mask, other=0.0).to(tl.float32)
    if HAS_WD:
        if WD_MODE == WD_LR:
            x = x * tl.load(h + H_LRC)
        elif WD_MODE == WD_LR_BEFORE:
            x = x - x * tl.load(h + H_LRWD)
        elif WD_MODE == WD_ALPHA:
            x = x - x * _min_nan(alpha * wd, F32_MAX)
        else:
            x = x - x * tl.load(h + H_WDU)
    x = _sat(x - u, _dtype_max(P_DT))  # (+-inf at most before: u is finite)
    if SR:
        xs = _stochastic_round(x, tl.load(_ptr(row, M_N, tl.int32) + offs, mask=mask, other=0))
    else:
        xs = _cast(x, P_DT)
    tl.store(pp, xs, mask=_masked(mask, keep))
    if EMA:  # tf_keras: ema * m + x * (1 - m) (each product rounded in the EMA's dtype), but
        # exactly the EMA where x equals it (the reference's torch.where)
        ep = _ptr(row, M_E, E_DT) + offs
        e = tl.load(ep, mask=mask, other=0.0).to(tl.float32)
        xe = _cast(xs.to(tl.float32), E_DT).to(tl.float32)
        avg = _cast(e * ema_m, E_DT).to(tl.float32) + _cast(xe * ema_1m, E_DT).to(tl.float32)
        e = _cast(tl.where(xe == e, e, avg), E_DT)
        tl.store(ep, e, mask=_masked(mask, keep))
        if tl.load(h + H_DUE) != 0:  # every ema_overwrite_frequency steps: x <- ema
            tl.store(pp, _cast(e.to(tl.float32), P_DT), mask=_masked(mask, keep))


@triton.jit
def _apply_2d(
    tiles, meta, hyp, scal, rmean_part, wide_r, wide_c, skip_ptr, sign, clipv, eps1, eps1sq, w1,
    wd, ema_m, ema_1m,
    G_DT: tl.constexpr, P_DT: tl.constexpr, M_DT: tl.constexpr, E_DT: tl.constexpr,
    HAS_CLIPV: tl.constexpr, MOM: tl.constexpr, CLAMP: tl.constexpr, CLIP: tl.constexpr,
    HAS_WD: tl.constexpr, WD_MODE: tl.constexpr, SR: tl.constexpr, EMA: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, CONTIG_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    slot, row, o, _rb, _cb, rmask, cmask, mask, offs, ridx, cidx, R = _tile(
        tiles, meta, pid, TR, TC, CONTIG_C
    )
    keep = _keep(skip_ptr)
    s = scal + slot * NS
    gs = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV) * tl.load(s + S_GSCALE)
    num = _numerator(row, offs, mask, gs, w1, keep, M_DT, MOM, False)
    mean = _row_mean(rmean_part, row, o, R)
    wide = tl.load(s + S_WIDE) != 0
    wr = wide_r + tl.load(row + M_WROW)
    wc = wide_c + tl.load(row + M_WCOL)
    u = _factored_u(row, num, ridx, cidx, rmask, cmask, mean, wide, wr, wc, eps1, eps1sq, CLAMP)
    _apply(
        row, hyp + slot * NH, s, offs, mask, u, w1, wd, ema_m, ema_1m, keep,
        P_DT, M_DT, E_DT, MOM, CLIP, HAS_WD, WD_MODE, SR, EMA,
    )  # fmt: skip


@triton.jit
def _apply_1d(
    chunks, meta, hyp, scal, skip_ptr, sign, clipv, eps1, eps1sq, w1, wd, ema_m, ema_1m,
    G_DT: tl.constexpr, P_DT: tl.constexpr, M_DT: tl.constexpr, E_DT: tl.constexpr,
    HAS_CLIPV: tl.constexpr, MOM: tl.constexpr, CLAMP: tl.constexpr, CLIP: tl.constexpr,
    HAS_WD: tl.constexpr, WD_MODE: tl.constexpr, SR: tl.constexpr, EMA: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    slot, row, offs, mask = _chunk(chunks, meta, pid, BLOCK)
    keep = _keep(skip_ptr)
    s = scal + slot * NS
    h = hyp + slot * NH
    gs = _grad(row, offs, mask, sign, clipv, G_DT, HAS_CLIPV) * tl.load(s + S_GSCALE)
    num = _numerator(row, offs, mask, gs, w1, keep, M_DT, MOM, False)
    w2 = tl.load(h + H_W2)
    u = _unfactored_u(row, offs, mask, gs, num, w2, eps1, eps1sq, keep, CLAMP, False)
    _apply(
        row, h, s, offs, mask, u, w1, wd, ema_m, ema_1m, keep,
        P_DT, M_DT, E_DT, MOM, CLIP, HAS_WD, WD_MODE, SR, EMA,
    )  # fmt: skip


KERNELS = (
    _stats_2d, _stats_1d, _reduce1, _factors, _pass2_2d, _pass2_1d, _reduce2, _apply_2d,
    _apply_1d,
)  # fmt: skip
"""Every kernel this module launches (a test wraps their ``run`` to count launches)."""


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def supports(
    param: Tensor, grad: Tensor, state: dict[str, Any], plan: GroupPlan, dims: FactorDims | None
) -> bool:
    """Whether these kernels handle the tensor under ``plan`` (else use the reference)."""
    if plan.kahan_summation:  # not implemented in these kernels: the reference's write-back
        return False
    if type(param) is not torch.Tensor and not isinstance(param, torch.nn.Parameter):
        return False
    if param.dtype not in (torch.float32, torch.bfloat16) or grad.dtype not in _TL_DTYPES:
        return False
    if not (param.is_contiguous() and grad.is_contiguous()) or param.numel() == 0:
        return False
    for key in ("row_var", "col_var", "variance"):
        if key in state and (state[key].dtype != torch.float32 or not state[key].is_contiguous()):
            return False
    for key in ("exp_avg", "ema"):
        t = state.get(key)
        if t is not None and (t.dtype not in (torch.float32, torch.bfloat16) or
                              not t.is_contiguous()):  # fmt: skip
            return False
    return True


def _view(shape: tuple[int, ...], dims: FactorDims | None) -> tuple[int, int, int, int, int]:
    """[A, R, B, C, D] of a tensor: R, C its factored dims (unfactored: [1, 1, 1, numel, 1])."""
    if dims is None:
        return 1, 1, 1, math.prod(shape), 1
    r, c = dims
    return (
        math.prod(shape[:r]),
        shape[r],
        math.prod(shape[r + 1 : c]),
        shape[c],
        math.prod(shape[c + 1 :]),
    )


def _tile_kind(view: tuple[int, int, int, int, int]) -> str:
    """The tile shape that wastes the fewest lanes on R x C (every shape is correct)."""
    _, r, _, c, _ = view
    if c == 1 and r > 16:
        return "column"
    if r == 1 and c > 16:
        return "row"
    if c <= 16 and r > 16:
        return "tall"
    if r <= 4 and c > 16:
        return "wide"
    return "square"


@dataclass
class _Layout:
    """The static part of a bucket (shapes only): program tables and buffer sizes, cached."""

    static: list[list[int]]  # per tensor: the size and offset columns of the table
    programs: Tensor  # int64 [n_programs, 2]: (slot, tile or chunk) of the element passes
    stats_programs: Tensor  # int64 [n, 2]: (slot, strip and column block) of _stats_2d
    fprogs: Tensor | None  # int64 [n, 4]: (slot, slice, chunk, 0 rows / 1 columns)
    n_programs: int
    n_stats_programs: int
    row_part: int
    col_part: int
    rmean_part: int
    wide_rows: int  # elements of the float64 R and C of the overflow path
    wide_cols: int


_LAYOUTS: dict[Any, _Layout] = {}


def _pairs(slot: int, n: int) -> Tensor:
    return torch.stack([torch.full((n,), slot, dtype=torch.int64), torch.arange(n)], dim=1)


def _layout(
    key: Any, views: list[tuple[int, int, int, int, int]], kind: str | None, device: torch.device
) -> _Layout:
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    static: list[list[int]] = []
    programs: list[Tensor] = []
    stats_programs: list[Tensor] = []
    fprogs: list[int] = []
    row_part = col_part = rmean_part = wide_rows = wide_cols = 0
    n_prog = n_sprog = 0
    tr, tc = TILES[kind] if kind is not None else (1, BLOCK_1D)
    for slot, (a, r, b, c, d) in enumerate(views):
        numel = a * r * b * c * d
        nrb, ncb = -(-r // tr), -(-c // tc)
        loop = -(-nrb // MAX_STRIPS)  # row blocks per stats program
        nstrip = -(-nrb // loop)
        slices = a * b * d
        nprog = slices * nrb * ncb
        nsprog = slices * nstrip * ncb if kind is not None else nprog
        programs.append(_pairs(slot, nprog))
        if kind is not None:
            stats_programs.append(_pairs(slot, nsprog))
        nrows, ncols = a * r * b * d, a * b * c * d
        nrc = -(-r // FACTOR_BLOCK)
        ncc = -(-c // FACTOR_BLOCK)
        cols = [numel, a, r, b, c, d, nrb, ncb, row_part, col_part, n_prog, nprog, rmean_part, nrc]
        # (M_OUT, the 0: per call)
        static.append([
            *cols, 0, nrows, ncols, loop, nstrip, n_sprog, nsprog, wide_rows, wide_cols,
        ])  # fmt: skip
        n_prog += nprog
        n_sprog += nsprog
        if kind is not None:
            row_part += ncb * nrows
            col_part += nstrip * ncols
            wide_rows += nrows
            wide_cols += ncols
            for o in range(slices):
                fprogs += [x for k in range(nrc) for x in (slot, o, k, 0)]
                fprogs += [x for k in range(ncc) for x in (slot, o, k, 1)]
            rmean_part += slices * nrc
    if len(_LAYOUTS) > 256:
        _LAYOUTS.clear()
    table = torch.cat(programs).to(device)
    layout = _Layout(
        static=static,
        programs=table,
        stats_programs=torch.cat(stats_programs).to(device) if stats_programs else table,
        fprogs=torch.tensor(fprogs, dtype=torch.int64).to(device) if kind is not None else None,
        n_programs=n_prog,
        n_stats_programs=n_sprog,
        row_part=row_part,
        col_part=col_part,
        rmean_part=rmean_part,
        wide_rows=wide_rows,
        wide_cols=wide_cols,
    )
    _LAYOUTS[key] = layout
    return layout


_META: dict[Any, Tensor] = {}


def _meta(table: list[list[int]], device: torch.device) -> Tensor:
    """The bucket's int64 table on the device; the same pointers as a recent step reuse their
    copy (no transfer: what a CUDA graph replays)."""
    key = (device, tuple(tuple(row) for row in table))
    meta = _META.get(key)
    if meta is None:
        if len(_META) > 64:  # tables of gradients that were reallocated
            _META.clear()
        meta = _META[key] = _to_device(torch.tensor(table, dtype=torch.int64), device)
    return meta


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    # a small host table: an asynchronous copy (no sync), nothing when the device is the CPU
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _hyp_host(plan: GroupPlan, ts: list[float], lr: float) -> Tensor:
    """The per-step scalars of each tensor from host step counts and a host lr."""
    rows = []
    wd = plan.weight_decay
    freq = plan.ema_overwrite_frequency
    for t in ts:
        sc = step_scalars(plan, t, lr)
        before = plan.weight_decay_mode == WeightDecay.LR_BEFORE and wd
        due = plan.use_ema and freq is not None and int(t) % freq == 0
        rows.append([
            1.0 - float(sc.beta2), float(sc.rho), 1 - lr * wd, lr * wd,
            abs(1 - lr * wd) if before else 1.0, wd if lr != 0 else 0.0, float(due), 0.0,
        ])  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32)


def _hyp_device(plan: GroupPlan, t: Tensor, lr: Tensor) -> Tensor:
    """The same table computed on the device from step-counter and lr tensors (no host read:
    what a CUDA graph can capture)."""
    sc = step_scalars(plan, t, lr)
    wd = plan.weight_decay
    lr64 = lr.to(torch.float64).expand_as(t)
    before = plan.weight_decay_mode == WeightDecay.LR_BEFORE and wd
    freq = plan.ema_overwrite_frequency
    if plan.use_ema and freq is not None:
        due = (t.fmod(freq) == 0).to(torch.float64)
    else:
        due = torch.zeros_like(t)
    cols = [
        1.0 - sc.beta2,
        torch.as_tensor(sc.rho, dtype=torch.float64).expand_as(t),
        1 - lr64 * wd,
        lr64 * wd,
        (1 - lr64 * wd).abs() if before else torch.ones_like(t),
        (lr64 != 0).to(torch.float64) * wd,
        due,
        torch.zeros_like(t),
    ]
    return torch.stack(cols, dim=1).to(torch.float32)


def _guard(device: torch.device) -> Any:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_ZERO: dict[torch.device, Tensor] = {}


def _zero(device: torch.device) -> Tensor:
    """The found_inf of steps that skip nothing (one int32 zero per device, made once)."""
    z = _ZERO.get(device)
    if z is None:
        z = _ZERO[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return z


@torch.no_grad()
def group_step(
    op: OpArgs, plan: GroupPlan, *, capturable: bool | None = None
) -> tuple[Tensor, Tensor]:
    """One step of a param group whose tensors all pass :func:`supports`: the op's arguments
    (:class:`adafactor.ops.OpArgs`, already checked; ``kahan_comps`` unused, as Kahan summation
    is not supported). Returns ``(alpha, update_rms)``, float32, one entry per parameter.

    ``capturable`` (default: whether every step counter lives off the CPU): per-step scalars
    computed on the device from the counters, ``found_inf`` applied by masking (no host read).
    """
    if plan.kahan_summation:
        raise ValueError("adafactor_triton.group_step: kahan_summation is not supported")
    params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise = op[:9]
    factor_dims, lr, grad_scale = op.factor_dims, op.lr, op.grad_scale
    found_inf, skipped_steps = op.found_inf, op.skipped_steps
    n = len(params)
    device = params[0].device if n else lr.device
    if any(p.device != device for p in params):
        raise ValueError("adafactor_triton.group_step: the tensors must be on one device")
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
    if not n:
        return alphas, rmss
    if skip is None:
        torch._foreach_add_(list(steps), 1.0)
    else:
        keep = skip.logical_not().to(torch.float64)
        torch._foreach_add_(list(steps), [keep] * len(steps))
    on_device = capturable or lr.device.type != "cpu"  # per-step scalars made on the device
    ts = None if on_device else [float(s) for s in steps]  # host counters: no device sync
    lr_f = None if on_device else float(lr)
    skip_ptr = skip.reshape(1).to(torch.int32) if skip is not None else _zero(device)

    buckets: dict[Any, list[int]] = {}
    dims_of: list[FactorDims | None] = []
    stats_of: list[tuple[Tensor, Tensor | None]] = []
    fi = vi = 0
    for i, p in enumerate(params):
        r, c = factor_dims[2 * i], factor_dims[2 * i + 1]
        dims = None if r < 0 else FactorDims(r, c)
        if dims is not None:
            stats_of.append((row_vars[fi], col_vars[fi]))
            fi += 1
        else:
            stats_of.append((variances[vi], None))
            vi += 1
        dims_of.append(dims)
        view = _view(tuple(p.shape), dims)
        kind = None if dims is None else _tile_kind(view)
        key = (
            p.dtype, grads[i].dtype, kind, view[4] == 1,
            exp_avgs[i].dtype if exp_avgs else None, emas[i].dtype if emas else None,
        )  # fmt: skip
        buckets.setdefault(key, []).append(i)
    with _guard(device):
        for (pdt, gdt, kind, contig, mdt, edt), index in buckets.items():
            views = [_view(tuple(params[i].shape), dims_of[i]) for i in index]
            lay = _layout((kind, tuple(views), device), views, kind, device)
            table = []
            for slot, i in enumerate(index):
                s1, s2 = stats_of[i]
                nz = noise[i] if noise and noise[i].numel() else None
                ptrs = [
                    params[i].data_ptr(), grads[i].data_ptr(), s1.data_ptr(),
                    s2.data_ptr() if s2 is not None else 0,
                    exp_avgs[i].data_ptr() if exp_avgs else 0,
                    emas[i].data_ptr() if emas else 0,
                    nz.data_ptr() if nz is not None else 0,
                ]  # fmt: skip
                st = list(lay.static[slot])
                st[_OUT_COL] = i
                table.append(ptrs + st)
            meta = _meta(table, device)
            if ts is None:
                t = torch.stack([steps[i].reshape(()) for i in index]).to(device, non_blocking=True)
                lr_d = lr if lr.device == device else lr.to(device, non_blocking=True)
                hyp = _hyp_device(plan, t.to(torch.float64), lr_d.reshape(()))
            else:
                assert lr_f is not None
                hyp = _to_device(_hyp_host(plan, [ts[i] for i in index], lr_f), device)
            sr = pdt == torch.bfloat16 and plan.stochastic_rounding and bool(noise)
            _launch_bucket(
                plan, lay, kind, contig, meta, hyp, len(index), device, pdt, gdt, mdt, edt, sr,
                grad_scale, skip_ptr, alphas, rmss,
            )  # fmt: skip
    return alphas, rmss


def _launch_bucket(
    plan: GroupPlan,
    lay: _Layout,
    kind: str | None,
    contig: bool,
    meta: Tensor,
    hyp: Tensor,
    n: int,
    device: torch.device,
    pdt: torch.dtype,
    gdt: torch.dtype,
    mdt: torch.dtype | None,
    edt: torch.dtype | None,
    sr: bool,
    grad_scale: Tensor | None,
    skip_ptr: Tensor,
    alphas: Tensor,
    rmss: Tensor,
) -> None:
    f32 = torch.float32
    p_dt, g_dt = _TL_DTYPES[pdt], _TL_DTYPES[gdt]
    m_dt = _TL_DTYPES[mdt] if mdt is not None else tl.float32
    e_dt = _TL_DTYPES[edt] if edt is not None else tl.float32
    factored = kind is not None
    np_ = lay.n_programs
    f64 = torch.float64
    tsum = torch.empty(TS * lay.n_stats_programs, dtype=f32, device=device)
    usum = torch.empty(np_, dtype=f64, device=device)
    scal = torch.empty(n * NS, dtype=f32, device=device)
    row_part = torch.empty(max(lay.row_part, 1), dtype=f32, device=device)
    col_part = torch.empty(max(lay.col_part, 1), dtype=f32, device=device)
    rmean_part = torch.empty(max(lay.rmean_part, 1), dtype=f64, device=device)
    # this step's float64 R and C on the overflow path (written only there)
    wide_r = torch.empty(max(lay.wide_rows, 1), dtype=f64, device=device)
    wide_c = torch.empty(max(lay.wide_cols, 1), dtype=f64, device=device)
    dummy = tsum  # an unused pointer argument
    sign = -1.0 if plan.maximize else 1.0
    has_clipv = plan.clipvalue is not None
    clipv = float(plan.clipvalue) if has_clipv else 0.0
    eps1 = float(plan.eps1) if plan.eps1 is not None else torch.finfo(pdt).eps
    clamp = plan.eps1_mode == Eps1Mode.CLAMP
    mom = int(plan.momentum)
    w1 = 1.0 - plan.beta1 if plan.beta1 is not None and mom else 0.0
    scale_param = plan.scale_parameter
    clipnorm = plan.clipnorm is not None
    opts = {"enable_fp_fusion": False}
    tr, tc = TILES[kind] if factored else (1, BLOCK_1D)
    grid = (np_,)
    if factored:
        _stats_2d[(lay.n_stats_programs,)](
            lay.stats_programs, meta, tsum, row_part, col_part, sign, clipv,
            G_DT=g_dt, P_DT=p_dt, HAS_CLIPV=has_clipv, WANT_X=scale_param, TR=tr, TC=tc,
            CONTIG_C=contig, **opts,
        )  # fmt: skip
    elif scale_param or clipnorm:
        _stats_1d[grid](
            lay.programs, meta, tsum, sign, clipv,
            G_DT=g_dt, P_DT=p_dt, HAS_CLIPV=has_clipv, WANT_X=scale_param, WANT_G=clipnorm,
            BLOCK=BLOCK_1D, **opts,
        )  # fmt: skip
    _reduce1[(n,)](
        meta, hyp, scal, tsum, grad_scale if grad_scale is not None else dummy, skip_ptr, alphas,
        float(plan.clipnorm or 0.0), float(plan.eps2), sign, clipv,
        G_DT=g_dt, P_DT=p_dt, HAS_CLIPV=has_clipv, HAS_GSCALE=grad_scale is not None,
        CLIPNORM=clipnorm,
        SCALE_PARAM=scale_param, WANT_WIDE=factored or clipnorm, RB=REDUCE_BLOCK,
        BLOCK=BLOCK_1D, **opts,
    )  # fmt: skip
    eps1sq = eps1 * eps1
    if factored:
        assert lay.fprogs is not None
        _factors[(lay.fprogs.numel() // 4,)](
            lay.fprogs, meta, hyp, scal, row_part, col_part, rmean_part, wide_r, wide_c, skip_ptr,
            eps1, sign, clipv, G_DT=g_dt, HAS_CLIPV=has_clipv, ADD_EPS1=not clamp,
            FB=FACTOR_BLOCK, WR=WIDE_TILE[0], WC=WIDE_TILE[1], **opts,
        )  # fmt: skip
        _pass2_2d[grid](
            lay.programs, meta, hyp, scal, rmean_part, wide_r, wide_c, usum, skip_ptr, sign,
            clipv, eps1, eps1sq, w1, G_DT=g_dt, M_DT=m_dt, HAS_CLIPV=has_clipv, MOM=mom,
            CLAMP=clamp, TR=tr, TC=tc, CONTIG_C=contig, **opts,
        )  # fmt: skip
    else:
        _pass2_1d[grid](
            lay.programs, meta, hyp, scal, usum, skip_ptr, sign, clipv, eps1, eps1sq, w1,
            G_DT=g_dt, M_DT=m_dt, HAS_CLIPV=has_clipv, MOM=mom, CLAMP=clamp,
            BLOCK=BLOCK_1D, **opts,
        )  # fmt: skip
    clip = plan.clip_threshold
    _reduce2[(n,)](
        meta, scal, usum, skip_ptr, rmss, float(clip or 1.0), CLIP=clip is not None,
        RB=REDUCE_BLOCK, **opts,
    )  # fmt: skip
    wd = float(plan.weight_decay)
    m = float(plan.ema_momentum)
    common = {
        "G_DT": g_dt, "P_DT": p_dt, "M_DT": m_dt, "E_DT": e_dt, "HAS_CLIPV": has_clipv,
        "MOM": mom, "CLAMP": clamp, "CLIP": clip is not None, "HAS_WD": bool(wd),
        "WD_MODE": int(plan.weight_decay_mode), "SR": sr, "EMA": plan.use_ema,
    }  # fmt: skip
    if factored:
        _apply_2d[grid](
            lay.programs, meta, hyp, scal, rmean_part, wide_r, wide_c, skip_ptr, sign, clipv,
            eps1, eps1sq, w1, wd, m, 1 - m, TR=tr, TC=tc, CONTIG_C=contig, **common, **opts,
        )  # fmt: skip
    else:
        _apply_1d[grid](
            lay.programs, meta, hyp, scal, skip_ptr, sign, clipv, eps1, eps1sq, w1, wd, m, 1 - m,
            BLOCK=BLOCK_1D, **common, **opts,
        )  # fmt: skip


def run_part(
    plan: GroupPlan,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    dims: Sequence[FactorDims | None],
    noise: Sequence[Tensor],
    lr: Tensor,
    grad_scale: Tensor | None,
    index: Sequence[int],
    alphas: Tensor,
    rmss: Tensor,
) -> None:
    """The op's Triton part: the tensors at ``index`` (all supported) in one batched step per
    device; their ``alpha_t`` and RMS(U) written at those positions of ``alphas``/``rmss``."""
    by_device: dict[torch.device, list[int]] = {}
    for i in index:
        by_device.setdefault(params[i].device, []).append(i)
    if len(by_device) > 1:  # a group spread over devices: one step per device
        for part in by_device.values():
            run_part(plan, params, grads, states, dims, noise, lr, grad_scale, part, alphas, rmss)
        return
    from ..ops import OpArgs  # (imported: ops calls this module)

    sts = [states[i] for i in index]
    ds = [dims[i] for i in index]
    op = OpArgs(
        params=[params[i] for i in index],
        grads=[grads[i] for i in index],
        steps=[s["step"] for s in sts],
        row_vars=[s["row_var"] for s, d in zip(sts, ds) if d is not None],
        col_vars=[s["col_var"] for s, d in zip(sts, ds) if d is not None],
        variances=[s["variance"] for s, d in zip(sts, ds) if d is None],
        exp_avgs=[s["exp_avg"] for s in sts] if plan.momentum != Momentum.NONE else [],
        emas=[s["ema"] for s in sts] if plan.use_ema else [],
        noise=[noise[i] for i in index] if noise else [],
        kahan_comps=[],
        factor_dims=[k for d in ds for k in (d if d is not None else (-1, -1))],
        lr=lr,
        grad_scale=grad_scale,
        found_inf=None,
        skipped_steps=torch.zeros((), dtype=torch.int64),
    )
    a, r = group_step(op, plan)
    if len(index) == len(params):
        alphas.copy_(a)
        rmss.copy_(r)
    else:
        torch._foreach_copy_([alphas[i] for i in index], list(a.unbind()))
        torch._foreach_copy_([rmss[i] for i in index], list(r.unbind()))
