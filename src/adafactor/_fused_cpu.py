"""The fused CPU path: the reference's three passes as OpenMP C loops over each tensor.

``csrc/adafactor_cpu.c`` is compiled at first use with the system C compiler (``$CC``, else
``cc``/``gcc``) into ``$ADAFACTOR_CACHE_DIR`` (default ``~/.cache/adafactor``), keyed by a hash
of the source, flags and CPU, and called through :mod:`ctypes` with data pointers: no torch
headers, a few seconds to build (:mod:`adafactor._build`), nothing to build at install time.

Memory traffic per tensor (factored, no momentum): pass 1 reads g (and x, unless RMS(x) is
carried from the previous step's pass 3), pass 2 reads g, pass 3 reads g and x and writes x. U is
never stored: pass 3 recomputes it from g and the (small) factors, so the step allocates no
full-size temporary (stochastic rounding draws one int32 noise tensor per parameter, to reuse the
reference's random stream exactly).

Numerics: element math in float32 like the reference; sums are float32 within a row or segment
and float64 across them, added in order (thread-count independent). Differences from the
reference are a few float32 ulps. The scalars between the passes (clip scale, alpha_t, RMS(U), the
clip factor) are computed in C from the group's options, in float64 like Python floats.

:func:`group_step` runs the whole step of every unsharded tensor of a param group in one call
into the kernel (the registered op's CPU implementation). The passes are also separate entry
points on a *local* tensor (:func:`prepare`, :func:`grad_square_sums`,
:func:`finish_statistics`, :func:`update_square_sum`, :func:`apply_update`), mirroring
:mod:`adafactor._reference`, so a sharded driver can all-reduce the pass-1 and pass-2 sums
between them.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._build import BuildError, build_library
from ._plan import Eps1Mode, GroupPlan, Momentum, StepScalars, WeightDecay, c_defines
from .factoring import FactorDims

__all__ = [
    "FusedStep",
    "FusedUnavailableError",
    "GroupOutcome",
    "GroupTables",
    "apply_update",
    "available",
    "factor_scales",
    "finish_statistics",
    "grad_square_sums",
    "group_step",
    "load",
    "prepare",
    "supports",
    "update_square_sum",
    "warn_stale_rms",
]

_SOURCE = Path(__file__).parent / "csrc" / "adafactor_cpu.c"
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fPIC",
    "-shared",
]
_FLAGS += ["-fvisibility=hidden", "-std=c11"]
# the kernel's layout code of a tensor (csrc: MODE_*): factored or not x where eps1 enters
_MODES = {
    (True, Eps1Mode.ADD): 0,
    (True, Eps1Mode.CLAMP): 1,
    (False, Eps1Mode.ADD): 2,
    (False, Eps1Mode.CLAMP): 3,
}
# the per-pass entry points of the sharded driver (af_group_step runs af_step inside the kernel)
_ENTRY_POINTS = ("af_stats", "af_finish", "af_factor_scales", "af_update_sq", "af_apply")
_X_FUSED = 1  # Args.want_x: pass 1 sums x^2 in its loop over g (see the C enum)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

# Set to False on a parameter caught changing behind its version counter (p.data, NumPy views):
# its sum of x^2 is then re-read every step instead of carried (see GroupTables).
_CARRY_ATTR = "_adafactor_param_sq"
_CARRY_MAX = torch.finfo(torch.float32).max / 2  # largest sum of x^2 carried (see _keep_carry)


# Tensors with fewer elements run on one thread. Every parallel region costs a fork/join: on an
# idle machine a few microseconds (GPT-2-small, 2 threads: 2^16 beat 2^20 by 7-10 %), but on a
# loaded one waking the second thread can cost a scheduler time slice (~ms) per region.
parallel_min_numel = 1 << 16


class FusedUnavailableError(RuntimeError):
    """The C kernel could not be built or loaded (no compiler, no OpenMP, ...)."""


class _Args(ctypes.Structure):
    # Mirrors ``Args`` in csrc/adafactor_cpu.c field for field.
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("g", "x", "m", "v", "noise", "comp", "row", "col")),
        *((name, ctypes.c_void_p) for name in ("rstate", "cstate", "fr", "fc", "rm", "rsum")),
        *(
            (name, ctypes.c_int64)
            for name in ("numel", "R", "B", "C", "D", "rows_total", "par_min")
        ),
        *(
            (name, ctypes.c_float)
            for name in (
                "sign",
                "clipv",
                "scale",
                "eps1",
                "eps_sq",
                "w2",
                "w1",
                "row_k",
                "col_k",
                "inv_clip",
                "alpha",
                "f1",
                "f2",
            )
        ),
        *(
            (name, ctypes.c_int)
            for name in ("mode", "dt", "mdt", "mom", "want_x", "carry_x", "verify_x", "nt")
        ),
        ("out", ctypes.c_double * 4),
        *((name, ctypes.c_int64) for name in ("numel_total", "cols_total")),
        *(
            (name, ctypes.c_double)
            for name in ("lr", "rho", "eps2", "wd", "clipnorm", "clip_d", "gscale", "carried")
        ),
        *((name, ctypes.c_int) for name in ("scale_param", "wd_mode", "use_carried")),
        *((name, ctypes.c_double) for name in ("alpha_out", "update_rms")),
        ("segbuf", ctypes.c_void_p),
        ("err", ctypes.c_int),
    ]


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The compiled kernel library, building it on first use; raises FusedUnavailableError."""
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                lib = ctypes.CDLL(str(build_library(_SOURCE, [*_FLAGS, "-lm"], c_defines())))
                _bind(lib)
                _lib = lib
            except (OSError, BuildError, FusedUnavailableError) as exc:
                _lib_error = str(exc)
        if _lib is None:
            raise FusedUnavailableError(
                f"the fused CPU kernel is unavailable: {_lib_error}. Without it Adafactor runs "
                "the reference math (slower); impl='reference' silences this"
            )
        return _lib


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the entry points' signatures and check the layouts this module mirrors."""
    for name in _ENTRY_POINTS:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(_Args)]
        fn.restype = None
    lib.af_layout.argtypes = [ctypes.c_int]
    lib.af_layout.restype = ctypes.c_int64
    expected = (ctypes.sizeof(_Args), _TABLE_I, _TABLE_D, _GROUP_D, _GROUP_I)
    found = tuple(lib.af_layout(i) for i in range(len(expected)))
    if found != expected:
        raise FusedUnavailableError(
            f"the compiled kernel's layout {found} (sizeof(Args) and table widths) differs from "
            f"the Python mirror's {expected}: a stale or foreign library in the kernel cache; "
            "delete $ADAFACTOR_CACHE_DIR (default ~/.cache/adafactor)"
        )
    lib.af_supported.argtypes = [ctypes.c_int]
    lib.af_supported.restype = ctypes.c_int64
    for which, enum in enumerate((Momentum, WeightDecay)):
        missing = [m.name for m in enum if not lib.af_supported(which) >> int(m) & 1]
        if missing:
            raise FusedUnavailableError(
                f"the C kernel does not implement {enum.__name__} {missing}: add it to "
                "csrc/adafactor_cpu.c (or use impl='reference')"
            )
    i64p, f64p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)
    lib.af_group_step.argtypes = [ctypes.c_int, i64p, f64p, f64p, i64p]
    lib.af_group_step.restype = ctypes.c_int
    lib.af_advance_steps.argtypes = [ctypes.c_int, i64p, f64p]
    lib.af_advance_steps.restype = None


def available() -> bool:
    """Whether the C kernel builds and loads here (the result is cached for the process).

    The first failure warns once: impl='auto' then runs the (slower) reference path."""
    if _lib is not None:
        return True
    first = _lib_error is None
    try:
        load()
    except FusedUnavailableError as exc:
        if first:
            warnings.warn(f"{exc}; falling back to the reference path", RuntimeWarning, 2)
        return False
    return True


def supports(param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    """Whether the fused path handles this tensor (else the caller uses the reference)."""
    if type(param) is not torch.Tensor and not isinstance(param, torch.nn.Parameter):
        return False  # tensor subclasses (DTensor, ...) take the reference path
    if param.device.type != "cpu" or param.dtype not in _DTYPES or grad.dtype != param.dtype:
        return False
    if grad.device.type != "cpu" or grad.is_sparse:
        return False
    if not (param.is_contiguous() and grad.is_contiguous()):
        return False
    for key in ("row_var", "col_var", "variance"):
        t = state.get(key)
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            return False
    k = state.get("kahan_comp")
    if k is not None and (k.dtype != torch.bfloat16 or not k.is_contiguous()):
        return False
    m = state.get("exp_avg")
    return m is None or (m.dtype in _DTYPES and m.is_contiguous())


class FusedStep:
    """One tensor's step on the fused path: the C argument block and the scalars between passes."""

    __slots__ = (
        "alpha",
        "args",
        "dims",
        "keep",
        "numel",
        "param",
        "plan",
        "shape",
        "sizes",
        "state",
        "update_rms",
    )

    def __init__(self) -> None:
        self.keep: list[Tensor] = []  # tensors whose pointers the argument block holds

    def work(self, index: int) -> Tensor:
        """A view of the float64 work buffer: 0 row sums, 1 col sums of g^2, 2 sums of R over
        rows (flat, in row_var / col_var order). A sharded caller reduces them in place."""
        start = sum(self.sizes[:index])
        return self.keep[0][start : start + self.sizes[index]]


def _lr_float(lr: float | Tensor) -> float:
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _eps1(plan: GroupPlan, dtype: torch.dtype) -> float:
    # None: torch.optim.Adafactor's machine epsilon of the parameter dtype
    return torch.finfo(dtype).eps if plan.eps1 is None else plan.eps1


def prepare(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    plan: GroupPlan,
    scalars: StepScalars,
    dims: FactorDims | None,
    shape: tuple[int, ...] | None = None,
) -> FusedStep:
    """The argument block of one local tensor's passes (``state['step']`` already advanced).

    ``param``/``grad`` are the local contiguous tensors; ``shape`` is the unsharded shape (the
    element count of the RMS) and ``dims`` its factored dims. The sharded driver's entry point;
    unsharded tensors take :func:`group_step`.
    """
    fs = FusedStep()
    fs.param, fs.state, fs.plan, fs.dims = param, state, plan, dims
    fs.shape = tuple(param.shape) if shape is None else tuple(shape)
    fs.numel = math.prod(fs.shape)
    a = _Args()
    a.g, a.x = grad.data_ptr(), param.data_ptr()
    a.numel, a.numel_total = param.numel(), fs.numel
    a.lr = _lr_float(scalars.lr)
    a.rho = _lr_float(scalars.rho)
    a.w2 = 1.0 - float(scalars.beta2)
    a.eps2, a.wd, a.wd_mode = plan.eps2, plan.weight_decay, plan.weight_decay_mode
    a.clipnorm = plan.clipnorm or 0.0
    a.clip_d = plan.clip_threshold or 0.0
    a.scale_param, a.gscale = plan.scale_parameter, 1.0
    a.sign = -1.0 if plan.maximize else 1.0
    a.clipv = math.inf if plan.clipvalue is None else plan.clipvalue
    eps1 = _eps1(plan, param.dtype)
    a.eps1, a.eps_sq = eps1, eps1 * eps1
    a.mom = plan.momentum
    if plan.momentum != Momentum.NONE:
        m = state["exp_avg"]
        a.m, a.mdt = m.data_ptr(), _DTYPES[m.dtype]
        a.w1 = 1.0 - (plan.beta1 or 0.0)
    a.dt = _DTYPES[param.dtype]
    a.mode = _MODES[(dims is not None, Eps1Mode(plan.eps1_mode))]
    a.R = a.B = a.C = a.D = 1
    a.nt, a.par_min = torch.get_num_threads(), parallel_min_numel
    if dims is not None:
        _, a.R, a.B, a.C, a.D = factor_layout(tuple(param.shape), dims)
        nrow, ncol = state["row_var"].numel(), state["col_var"].numel()
        fs.sizes = (nrow, ncol, nrow // a.R)
        # float64 row sums | col sums | sums of R, float32 row factors | col factors | mean R
        work64 = torch.empty(sum(fs.sizes), dtype=torch.float64)
        clamp = plan.eps1_mode == Eps1Mode.CLAMP
        work32 = torch.empty(nrow * (2 if clamp else 1) + ncol, dtype=torch.float32)
        fs.keep += [work64, work32]
        a.row = work64.data_ptr()
        a.col, a.rsum = a.row + 8 * nrow, a.row + 8 * (nrow + ncol)
        a.fr = work32.data_ptr()
        a.fc = a.fr + 4 * nrow
        a.rm = a.fc + 4 * ncol if clamp else None
        a.rows_total, a.cols_total = fs.shape[dims.row_dim], fs.shape[dims.col_dim]
        a.rstate, a.cstate = state["row_var"].data_ptr(), state["col_var"].data_ptr()
    else:
        a.v = state["variance"].data_ptr()
    fs.args = a
    return fs


def _call(entry: str, fs: FusedStep) -> None:
    """Run one pass entry point; an allocation failure in C becomes MemoryError."""
    getattr(load(), entry)(ctypes.byref(fs.args))
    if fs.args.err:
        raise MemoryError(
            f"the fused Adafactor kernel could not allocate its work buffers for a tensor of "
            f"shape {tuple(fs.param.shape)}; free memory or use impl='reference'"
        )


def grad_square_sums(fs: FusedStep) -> tuple[float, float]:
    """Pass 1 (local): the sum of g^2 and the sum of x^2; row and col sums of g^2 go to
    ``fs.work(0)`` / ``fs.work(1)`` when factored."""
    a = fs.args
    a.want_x = _X_FUSED if fs.plan.scale_parameter else 0
    _call("af_stats", fs)
    return a.out[0], a.out[1]


def finish_statistics(
    fs: FusedStep,
    global_grad_scale: Tensor | float | None = None,
    grad_sq: float | None = None,
    param_sq: float | None = None,
) -> None:
    """Between passes 1 and 2: clip factor, alpha, R and C, and the sums of R over the (local)
    rows into ``fs.work(2)``. When sharded, pass the all-reduced ``grad_sq`` / ``param_sq``,
    reduce ``fs.work(0)`` / ``fs.work(1)`` before and ``fs.work(2)`` after this call."""
    a = fs.args
    if grad_sq is not None:
        a.out[0] = grad_sq
    if param_sq is not None:
        a.out[1] = param_sq
    if global_grad_scale is not None:
        a.gscale = _lr_float(global_grad_scale)
    _call("af_finish", fs)
    fs.alpha = a.alpha_out


def factor_scales(fs: FusedStep) -> None:
    """The per-row and per-column factors of passes 2-3 from R, C and the row sums of R."""
    if fs.dims is not None:
        _call("af_factor_scales", fs)


def update_square_sum(fs: FusedStep) -> float:
    """Pass 2 (local): update V (and the 'grad' momentum); return the local sum of U^2."""
    _call("af_update_sq", fs)
    return fs.args.out[2]


def apply_update(fs: FusedStep, update_sq_sum: float, noise: Tensor | None) -> None:
    """Pass 3 (local): clip U by RMS(U) (from the all-reduced ``update_sq_sum``), momentum,
    weight decay, write the parameter (rounded with ``noise`` when stochastic)."""
    a = fs.args
    a.out[2] = update_sq_sum
    if noise is not None:
        fs.keep.append(noise)
        a.noise = noise.data_ptr()
    _call("af_apply", fs)
    fs.update_rms = a.update_rms


def warn_stale_rms(stale: list[tuple[tuple[int, ...], float]]) -> None:
    """One warning for the (shape, relative RMS error) of each parameter whose carried sum of x^2
    proved stale in a group's step."""
    shapes = ", ".join(str(shape) for shape, _ in stale[:3]) + (", ..." if len(stale) > 3 else "")
    warnings.warn(
        f"Adafactor: {len(stale)} parameter(s) of shape {shapes} were changed outside the "
        "optimizer without bumping their version counter (e.g. through p.data or a NumPy view), "
        "so this step scaled their updates by RMS(x) of their values from before that change "
        f"(RMS(x) off by up to {max(err for _, err in stale):.3g} relative). They are re-read "
        "every step from now on. Change parameters under torch.no_grad() without .data to keep "
        "the faster path, or pass carry_param_rms=False to Adafactor.",
        RuntimeWarning,
        stacklevel=2,
    )


# ---------------------------------------------------------------------------------------------
# one call per param group
# ---------------------------------------------------------------------------------------------
# Table columns, as the TI_* / TD_* / GD_* / GI_* enums of csrc/adafactor_cpu.c (af_layout checks
# the widths at load).
_TI_G, _TI_X, _TI_M, _TI_V, _TI_NOISE, _TI_RSTATE, _TI_CSTATE, _TI_STEP, _TI_COMP = range(9)
_TI_NUMEL, _TI_R, _TI_B, _TI_C, _TI_D, _TI_ROWS, _TI_COLS, _TI_FLAGS, _TABLE_I = range(9, 18)
_TD_LR, _TD_RHO, _TD_W2, _TD_EPS1, _TD_CARRIED, _TD_ALPHA, _TD_RMS = range(7)
_TD_NEW_SQ, _TD_OLD_SQ, _TD_STATUS, _TABLE_D = range(7, 11)
_OVERFLOW = 2  # TD_STATUS (C: ERR_OVERFLOW): a finite gradient overflowed float32, left untouched
_GROUP_D, _GROUP_I = 8, 6
_F_BF16, _F_MBF16, _F_FACTORED, _F_CARRY, _F_USE_CARRIED, _F_WANT_X = 1, 2, 4, 8, 16, 32
_F_VERIFY = 64


class GroupTables:
    """The kernel's view of one param group: per-tensor pointers and layout, cached across steps.

    Built once for a list of (param, state); the caller (:mod:`adafactor.ops`) reuses it while
    every pointer, shape and dtype is unchanged. Each step refreshes only the gradient and noise
    pointers and the carry flags. It also carries each parameter's sum of x^2 from one step to the
    next: ``carry_version`` is the parameter's version counter when the sum was taken, valid for
    the next step if the counter moved by ``carry_bumps`` since (1: this op's own bump; a
    compiled step's wrapper bumps mutated inputs once more, learned when a sum the counter ruled
    out proves equal to x's re-sum) and ``carry_ok`` marks the valid sums; a parameter caught
    changing behind its version counter is marked on the parameter itself (``_CARRY_ATTR``), so
    that it stays re-read when the tables are rebuilt.
    """

    def __init__(self, params: list[Tensor], states: list[dict[str, Tensor]], dims: list[Any]):
        n = len(params)
        self.ints = torch.zeros(n, _TABLE_I, dtype=torch.int64)
        self.doubles = torch.zeros(n, _TABLE_D, dtype=torch.float64)
        rows = []
        for p, st, d in zip(params, states, dims):
            flags = (_F_BF16 if p.dtype == torch.bfloat16 else 0) | (_F_FACTORED if d else 0)
            m = st.get("exp_avg")
            if m is not None and m.dtype == torch.bfloat16:
                flags |= _F_MBF16
            R = B = C = D = rows_total = cols_total = 1
            if d is not None:
                _, R, B, C, D = factor_layout(tuple(p.shape), d)
                rows_total, cols_total = p.shape[d.row_dim], p.shape[d.col_dim]
            rows.append([p.numel(), R, B, C, D, rows_total, cols_total, flags])
        self.ints[:, _TI_NUMEL:] = torch.tensor(rows, dtype=torch.int64).reshape(n, -1)
        self.ints[:, _TI_X : _TI_COMP + 1] = torch.tensor(
            _pointers(params, states), dtype=torch.int64
        ).reshape(n, -1)
        self.flags = self.ints[:, _TI_FLAGS].clone()
        self.carry_version = torch.zeros(n, dtype=torch.int64)
        self.carry_bumps = torch.ones(n, dtype=torch.int64)
        self.carry_off = torch.tensor([getattr(p, _CARRY_ATTR, None) is False for p in params])
        self.carry_ok = torch.zeros(n, dtype=torch.bool)


def _pointers(params: list[Tensor], states: list[dict[str, Tensor]]) -> list[int]:
    """x, m, v, row_var, col_var, step, kahan_comp pointers of every tensor (0 where absent),
    flat."""
    out = []
    for p, st in zip(params, states):
        m, v, r, c = st.get("exp_avg"), st.get("variance"), st.get("row_var"), st.get("col_var")
        k = st.get("kahan_comp")
        out += [
            p.data_ptr(),
            m.data_ptr() if m is not None else 0,
            v.data_ptr() if v is not None else 0,
            0,  # noise: per step
            r.data_ptr() if r is not None else 0,
            c.data_ptr() if c is not None else 0,
            st["step"].data_ptr(),
            k.data_ptr() if k is not None and k.numel() else 0,
        ]
    return out


def group_step(
    tables: GroupTables,
    params: list[Tensor],
    grads: list[Tensor],
    plan: GroupPlan,
    scalars_of: Any,
    grad_scale: float,
    noise: list[Tensor] | None,
) -> GroupOutcome:
    """Every tensor of ``tables`` in one kernel call (their step counters advanced first).

    ``scalars_of(t)`` gives the :class:`StepScalars` of step ``t``.
    """
    lib = load()
    ints, doubles, n = tables.ints, tables.doubles, len(params)
    ints[:, _TI_G] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    if noise is not None:
        ints[:, _TI_NOISE] = torch.tensor([z.data_ptr() for z in noise], dtype=torch.int64)
    flags = tables.flags
    carry = plan.scale_parameter and plan.carry_param_rms
    if plan.scale_parameter:
        flags = flags | _F_WANT_X
    if carry:
        flags = flags | _F_CARRY
        versions = torch.tensor([p._version for p in params], dtype=torch.int64)
        # valid: taken last step, and only the bumps a step makes since (this op's own; under
        # torch.compile also AOTAutograd's of the mutated inputs: learned in _keep_carry)
        use = tables.carry_ok & (versions == tables.carry_version + tables.carry_bumps)
        if bool(use.any()):  # pass 1 skips x where the carried sum stands in
            flags = torch.where(use, (flags | _F_USE_CARRIED) & ~_F_WANT_X, flags)
        # a held sum the counter rules out: pass 3 re-sums the old x^2 to learn the bumps
        flags = torch.where(tables.carry_ok & ~use, flags | _F_VERIFY, flags)
    ints[:, _TI_FLAGS] = flags
    t = torch.empty(n, dtype=torch.float64)
    i64p, f64p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)
    ints_p = ctypes.cast(ints.data_ptr(), i64p)
    lib.af_advance_steps(n, ints_p, ctypes.cast(t.data_ptr(), f64p))
    _fill_scalars(doubles, t, plan, params, scalars_of)
    gd = torch.tensor(
        [
            -1.0 if plan.maximize else 1.0,
            math.inf if plan.clipvalue is None else plan.clipvalue,
            1.0 - (plan.beta1 or 0.0),
            plan.eps2,
            plan.weight_decay,
            plan.clipnorm or 0.0,
            plan.clip_threshold or 0.0,
            grad_scale,
        ],
        dtype=torch.float64,
    )
    gi = torch.tensor(
        [
            plan.weight_decay_mode,
            plan.momentum,
            int(plan.scale_parameter),
            int(plan.eps1_mode == Eps1Mode.CLAMP),
            torch.get_num_threads(),
            parallel_min_numel,
        ],
        dtype=torch.int64,
    )
    failed = lib.af_group_step(
        n,
        ints_p,
        ctypes.cast(doubles.data_ptr(), f64p),
        ctypes.cast(gd.data_ptr(), f64p),
        ctypes.cast(gi.data_ptr(), i64p),
    )
    if failed:
        raise MemoryError(
            f"the fused Adafactor kernel could not allocate work buffers for {failed} of {n} "
            "tensors (those were left unchanged, their step counters advanced); free memory or "
            "use impl='reference'"
        )
    status = doubles[:, _TD_STATUS]
    overflowed = (status == _OVERFLOW).nonzero().flatten().tolist() if bool(status.any()) else []
    stale = _keep_carry(tables, params, use, versions, overflowed) if carry else []
    return GroupOutcome(t, doubles[:, _TD_ALPHA], doubles[:, _TD_RMS], stale, overflowed)


class GroupOutcome(NamedTuple):
    """What :func:`group_step` did, one entry per tensor of the group (float64 tensors)."""

    t: Tensor  # the step each tensor took
    alpha: Tensor  # alpha_t
    update_rms: Tensor  # RMS(U) before clipping
    stale: list[tuple[tuple[int, ...], float]]  # (shape, RMS(x) error) of stale carried sums
    overflowed: list[int]  # tensors left untouched: a finite gradient overflowed float32


def _fill_scalars(
    doubles: Tensor, t: Tensor, plan: GroupPlan, params: list[Tensor], scalars_of: Any
) -> None:
    """The per-tensor scalar columns from each tensor's t (computed once per distinct t)."""
    t0 = float(t[0])
    if bool((t == t0).all()):
        sc = scalars_of(t0)
        eps1 = {dt: _eps1(plan, dt) for dt in {p.dtype for p in params}}
        doubles[:, _TD_LR] = _lr_float(sc.lr)
        doubles[:, _TD_RHO] = _lr_float(sc.rho)
        doubles[:, _TD_W2] = 1.0 - float(sc.beta2)
        if len(eps1) == 1:
            doubles[:, _TD_EPS1] = next(iter(eps1.values()))
        else:
            doubles[:, _TD_EPS1] = torch.tensor(
                [eps1[p.dtype] for p in params], dtype=torch.float64
            )
        return
    cache: dict[float, StepScalars] = {}
    rows = []
    for ti, p in zip(t.tolist(), params):
        sc = cache.get(ti) or cache.setdefault(ti, scalars_of(ti))
        rows.append(
            [_lr_float(sc.lr), _lr_float(sc.rho), 1.0 - float(sc.beta2), _eps1(plan, p.dtype)]
        )
    doubles[:, _TD_LR : _TD_EPS1 + 1] = torch.tensor(rows, dtype=torch.float64)


def _keep_carry(
    tables: GroupTables, params: list[Tensor], use: Tensor, versions: Tensor, overflowed: list[int]
) -> list[tuple[tuple[int, ...], float]]:
    """Keep each parameter's new sum of x^2 for the next step; return the stale carried ones."""
    doubles = tables.doubles
    carried, old = doubles[:, _TD_CARRIED], doubles[:, _TD_OLD_SQ]
    ok = ~tables.carry_off
    if overflowed:  # stepped elsewhere (no pass 3 here): re-read x next time
        ok[overflowed] = False
    # a sum near float32's largest value may hold a row whose float32 sum overflowed, which pass
    # 1 sums again from float64 squares and pass 3 does not: re-read such weights (rare: |x|
    # near 2^64, only after an outlier without update clipping)
    ok &= doubles[:, _TD_NEW_SQ] <= _CARRY_MAX
    # a carried sum must equal pass 3's re-sum of the same x bit for bit (NaN counts as equal)
    stale_mask = use & ok & (carried != old) & ~(carried.isnan() & old.isnan())
    stale = []
    if bool(stale_mask.any()):
        for i in stale_mask.nonzero().flatten().tolist():
            c, o = float(carried[i]), float(old[i])
            stale.append((tuple(params[i].shape), abs(math.sqrt(c / o) - 1) if o > 0 else math.inf))
            setattr(params[i], _CARRY_ATTR, False)  # re-read every step from now on
        tables.carry_off |= stale_mask
        ok &= ~stale_mask
    # a held sum the counter ruled out, yet x unchanged bit for bit: the counter moves by more
    # than this op's bump each step (a compiled step's wrapper bumps mutated inputs again)
    learn = tables.carry_ok & ~use & ok & (carried == old)
    if bool(learn.any()):
        tables.carry_bumps = torch.where(learn, versions - tables.carry_version, tables.carry_bumps)
    doubles[:, _TD_CARRIED] = doubles[:, _TD_NEW_SQ]
    tables.carry_version, tables.carry_ok = versions, ok
    return stale


def factor_layout(shape: tuple[int, ...], dims: FactorDims) -> tuple[int, int, int, int, int]:
    """The [A, R, B, C, D] view of ``shape`` the kernel iterates (R, C: the factored dims)."""
    r, c = dims
    return (
        math.prod(shape[:r]),
        shape[r],
        math.prod(shape[r + 1 : c]),
        shape[c],
        math.prod(shape[c + 1 :]),
    )
