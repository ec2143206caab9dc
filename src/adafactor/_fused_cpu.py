"""The fused CPU path: the reference's three passes as OpenMP C loops over each tensor.

``csrc/adafactor_cpu.c`` is compiled at first use with the system C compiler (``$CC``, else
``cc``/``gcc``) into ``$ADAFACTOR_CACHE_DIR`` (default ``~/.cache/adafactor``), keyed by a hash
of the source, flags and CPU, and called through :mod:`ctypes` with data pointers: no torch
headers, about one second to build, nothing to build at install time.

Memory traffic per tensor (factored, no momentum): pass 1 reads g (and x, unless RMS(x) is
carried from the previous step's pass 3), pass 2 reads g, pass 3 reads g and x and writes x. U is
never stored: pass 3 recomputes it from g and the (small) factors, so the step allocates no
full-size temporary (stochastic rounding draws one int32 noise tensor per parameter, to reuse the
reference's random stream exactly).

Numerics: element math in float32 like the reference; sums are float32 within a row or segment
and float64 across them, added in order (thread-count independent). Differences from the
reference are a few float32 ulps (e.g. ``g * (1/sqrt(R/mean R)) * (1/sqrt(C))`` for
``g * rsqrt(R/mean R * C)``). The scalars between the passes (clip scale, alpha_t, RMS(U), the
clip factor) are computed in C from the group's options, in float64 like Python floats.

:func:`tensor_step` runs an unsharded tensor's whole step in one call into the kernel. The
passes are also separate entry points on a *local* tensor (:func:`prepare`,
:func:`grad_square_sums`, :func:`finish_statistics`, :func:`update_square_sum`,
:func:`apply_update`), mirroring :mod:`adafactor._reference`, so a sharded driver can all-reduce
the pass-1 and pass-2 sums between them.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _reference as ref
from .factoring import FactorDims, factor_dims

__all__ = [
    "FusedStep",
    "FusedUnavailableError",
    "apply_update",
    "available",
    "factor_scales",
    "finish_statistics",
    "grad_square_sums",
    "load",
    "prepare",
    "supports",
    "tensor_step",
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
_MODES = {(True, "add"): 0, (True, "clamp"): 1, (False, "add"): 2, (False, "clamp"): 3}
_MOMENTUM = {None: 0, "grad": 1, "normalized_update": 2, "update": 3}
_ENTRY_POINTS = ("af_stats", "af_finish", "af_factor_scales", "af_update_sq", "af_apply", "af_step")
_WEIGHT_DECAY = {"lr": 0, "lr_before": 1, "alpha": 2, "unscaled": 3}
_X_FUSED, _X_SUMSQ = 1, 2  # Args.want_x: how pass 1 sums x^2 (see the C enum)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

# The carried sum of x^2 lives on the parameter itself: (data_ptr, version, sum), or False once a
# change that bypassed the version counter was caught (the parameter is then re-read every step).
_CARRY_ATTR = "_adafactor_param_sq"


# Tensors with fewer elements run on one thread. Every parallel region costs a fork/join: on an
# idle machine a few microseconds (GPT-2-small, 2 threads: 2^16 beat 2^20 by 7-10 %), but on a
# loaded one waking the second thread can cost a scheduler time slice (~ms) per region.
parallel_min_numel = 1 << 16


class FusedUnavailableError(RuntimeError):
    """The C kernel could not be built or loaded (no compiler, no OpenMP, ...)."""


class _Args(ctypes.Structure):
    # Mirrors ``Args`` in csrc/adafactor_cpu.c field for field.
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("g", "x", "m", "v", "noise", "row", "col")),
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
    ]


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU sharing the cache directory.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join([cc, *_FLAGS]).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("ADAFACTOR_CACHE_DIR", Path.home() / ".cache" / "adafactor"))
    target = cache / f"adafactor_cpu_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise FusedUnavailableError(
                f"compiling {_SOURCE.name} with {cc!r} failed:\n{result.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL:
    """The compiled kernel library, building it on first use; raises FusedUnavailableError."""
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                cc = _compiler()
                if cc is None:
                    raise FusedUnavailableError(
                        "no C compiler found (tried $CC, cc, gcc, clang); install gcc, or set "
                        "CC=/path/to/compiler, or use impl='reference'"
                    )
                lib = ctypes.CDLL(str(_build(cc)))
                for name in _ENTRY_POINTS:
                    fn = getattr(lib, name)
                    fn.argtypes = [ctypes.POINTER(_Args)]
                    fn.restype = None
                _lib = lib
            except (OSError, FusedUnavailableError) as exc:
                _lib_error = str(exc)
        if _lib is None:
            raise FusedUnavailableError(
                f"impl='fused' is unavailable: {_lib_error}. Use impl='reference' or "
                "impl='auto' (falls back to the reference)"
            )
        return _lib


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
    m = state.get("exp_avg")
    return m is None or (m.dtype in _DTYPES and m.is_contiguous())


class FusedStep:
    """One tensor's step on the fused path: the C argument block and the scalars between passes."""

    __slots__ = (
        "alpha",
        "args",
        "carry",
        "dims",
        "group",
        "keep",
        "numel",
        "param",
        "shape",
        "sizes",
        "stale_rms",
        "state",
        "update_rms",
    )

    def __init__(self) -> None:
        self.keep: list[Tensor] = []  # tensors whose pointers the argument block holds
        self.stale_rms: float | None = None  # set when the carried sum proved stale

    def work(self, index: int) -> Tensor:
        """A view of the float64 work buffer: 0 row sums, 1 col sums of g^2, 2 sums of R over
        rows (flat, in row_var / col_var order). A sharded caller reduces them in place."""
        start = sum(self.sizes[:index])
        return self.keep[0][start : start + self.sizes[index]]


def _lr_float(lr: float | Tensor) -> float:
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def prepare(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    lr: float | Tensor,
    shape: tuple[int, ...] | None = None,
    carry_param_rms: bool = False,
) -> FusedStep:
    """Resolve the step's scalars and pointers (``state['step']`` already incremented).

    ``param``/``grad`` are the local contiguous tensors; ``shape`` is the unsharded shape (used
    for the factoring decision and the element count of the RMS). ``carry_param_rms`` reuses the
    sum of x^2 of the previous step's pass 3 (unsharded tensors only, see :func:`apply_update`).
    """
    fs = FusedStep()
    fs.param, fs.state, fs.group = param, state, group
    fs.shape = tuple(param.shape) if shape is None else tuple(shape)
    fs.numel = math.prod(fs.shape)
    fs.carry = (
        carry_param_rms
        and group["scale_parameter"]
        and param.numel() == fs.numel
        and getattr(param, _CARRY_ATTR, None) is not False
    )
    t = int(state["step"].item())
    lr_t = _lr_float(lr)
    beta2 = ref.beta2_at(t, group["beta2_decay"], group["beta2_cap"], group["beta2"])
    fs.dims = factor_dims(
        fs.shape, group["factor_dims"], group["min_dim_size_to_factor"], group["factored"]
    )
    eps1 = group["eps1"]
    eps1 = torch.finfo(param.dtype).eps if eps1 is None else float(eps1)
    a = _Args()
    a.g, a.x = grad.data_ptr(), param.data_ptr()
    a.numel, a.numel_total = param.numel(), fs.numel
    # the options af_finish / af_apply turn into the step's scalars
    a.lr = lr_t
    a.rho = float(ref.relative_step_size(lr_t, t, group["relative_step"], group["warmup_init"]))
    a.eps2, a.wd, a.wd_mode = (
        group["eps2"],
        group["weight_decay"],
        _WEIGHT_DECAY[group["weight_decay_mode"]],
    )
    a.clipnorm = group["clipnorm"] or 0.0
    a.clip_d = group["clip_threshold"] or 0.0
    a.scale_param, a.gscale = group["scale_parameter"], 1.0
    a.sign = -1.0 if group["maximize"] else 1.0
    a.clipv = math.inf if group["clipvalue"] is None else group["clipvalue"]
    a.eps1, a.eps_sq = eps1, eps1 * eps1
    a.w2 = 1.0 - beta2
    momentum = group["momentum_kind"] if group["beta1"] else None
    a.mom = _MOMENTUM[momentum]
    if momentum is not None:
        m = state["exp_avg"]
        a.m, a.mdt = m.data_ptr(), _DTYPES[m.dtype]
        a.w1 = 1.0 - group["beta1"]
    a.dt = _DTYPES[param.dtype]
    a.mode = _MODES[(fs.dims is not None, group["eps1_mode"])]
    a.R = a.B = a.C = a.D = 1
    a.nt, a.par_min = torch.get_num_threads(), parallel_min_numel
    if fs.dims is not None:
        _, a.R, a.B, a.C, a.D = factor_layout(tuple(param.shape), fs.dims)
        nrow, ncol = state["row_var"].numel(), state["col_var"].numel()
        fs.sizes = (nrow, ncol, nrow // a.R)
        # two allocations per tensor step (each torch.empty costs ~1 us of a ~10 us step):
        # float64 row sums | col sums | sums of R, float32 row factors | col factors | mean R
        work64 = torch.empty(sum(fs.sizes), dtype=torch.float64)
        clamp = group["eps1_mode"] == "clamp"
        work32 = torch.empty(nrow * (2 if clamp else 1) + ncol, dtype=torch.float32)
        fs.keep += [work64, work32]
        a.row = work64.data_ptr()
        a.col, a.rsum = a.row + 8 * nrow, a.row + 8 * (nrow + ncol)
        a.fr = work32.data_ptr()
        a.fc = a.fr + 4 * nrow
        a.rm = a.fc + 4 * ncol if clamp else None
        a.rows_total, a.cols_total = fs.shape[fs.dims.row_dim], fs.shape[fs.dims.col_dim]
        a.rstate, a.cstate = state["row_var"].data_ptr(), state["col_var"].data_ptr()
    else:
        a.v = state["variance"].data_ptr()
    fs.args = a
    return fs


def _select_x_sum(fs: FusedStep) -> None:
    """How pass 1 gets the sum of x^2: from the previous step's pass 3 (carried), or by reading x
    (in pass 3's order when the carry is on, so the sums it carries agree with fresh ones)."""
    a, p = fs.args, fs.param
    cached = getattr(p, _CARRY_ATTR, None) if fs.carry else None
    if cached is not None and cached[:2] == (p.data_ptr(), p._version):
        a.carried, a.use_carried = cached[2], 1
    if not fs.group["scale_parameter"] or a.use_carried:
        a.want_x = 0
    else:
        a.want_x = _X_SUMSQ if fs.carry else _X_FUSED


def grad_square_sums(fs: FusedStep) -> tuple[float, float]:
    """Pass 1 (local): the sum of g^2 and the sum of x^2; row and col sums of g^2 go to
    ``fs.work(0)`` / ``fs.work(1)`` when factored."""
    _select_x_sum(fs)
    a = fs.args
    load().af_stats(ctypes.byref(a))
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
    load().af_finish(ctypes.byref(a))
    fs.alpha = a.alpha_out


def factor_scales(fs: FusedStep) -> None:
    """The per-row and per-column factors of passes 2-3 from R, C and the row sums of R."""
    if fs.dims is not None:
        load().af_factor_scales(ctypes.byref(fs.args))


def update_square_sum(fs: FusedStep) -> float:
    """Pass 2 (local): update V (and the 'grad' momentum); return the local sum of U^2."""
    a = fs.args
    load().af_update_sq(ctypes.byref(a))
    return a.out[2]


def _pass3_inputs(fs: FusedStep, generator: torch.Generator | None) -> None:
    """Stochastic-rounding noise and the carry flags of pass 3."""
    a, p = fs.args, fs.param
    if p.dtype == torch.bfloat16 and fs.group["stochastic_rounding"]:
        noise = torch.randint(
            0, 1 << 16, p.shape, dtype=torch.int32, device=p.device, generator=generator
        )
        fs.keep.append(noise)
        a.noise = noise.data_ptr()
    a.carry_x, a.verify_x = int(fs.carry), a.use_carried


def _pass3_outputs(fs: FusedStep) -> None:
    """RMS(U), and the carried sum of x^2: kept for the next step, or found stale."""
    a, p = fs.args, fs.param
    fs.update_rms = a.update_rms
    carried, fresh = a.carried, a.out[3]
    if a.use_carried and not (carried == fresh or (math.isnan(carried) and math.isnan(fresh))):
        fs.stale_rms = abs(math.sqrt(carried / fresh) - 1) if fresh > 0 else math.inf
        setattr(p, _CARRY_ATTR, False)  # this parameter is re-read every step from now on
    elif fs.carry:
        setattr(p, _CARRY_ATTR, (p.data_ptr(), p._version, a.out[1]))


def apply_update(fs: FusedStep, update_sq_sum: float, generator: torch.Generator | None) -> None:
    """Pass 3 (local): clip U by RMS(U) (from the all-reduced ``update_sq_sum``), momentum,
    weight decay, write the parameter.

    With the carry on, it also sums the written x^2 for the next step, and when this step used a
    carried sum, it re-sums the old x^2 before writing (in the same order, so equal bit for bit
    unless the parameter was changed behind the version counter; that is reported)."""
    a = fs.args
    a.out[2] = update_sq_sum
    _pass3_inputs(fs, generator)
    load().af_apply(ctypes.byref(a))
    _pass3_outputs(fs)


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
        stacklevel=4,
    )


def tensor_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    lr: float | Tensor,
    global_grad_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
    carry_param_rms: bool = False,
) -> FusedStep:
    """All three passes on one unsharded tensor in one call into the kernel; ``alpha``,
    ``update_rms`` and ``stale_rms`` of the returned step say what happened."""
    fs = prepare(param, grad, state, group, lr, carry_param_rms=carry_param_rms)
    _select_x_sum(fs)
    if global_grad_scale is not None:
        fs.args.gscale = _lr_float(global_grad_scale)
    _pass3_inputs(fs, generator)
    load().af_step(ctypes.byref(fs.args))
    fs.alpha = fs.args.alpha_out
    _pass3_outputs(fs)
    return fs


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
