"""The Adafactor step of one param group as a registered op: ``torch.ops.adafactor.step_``.

Like ``torch._fused_adamw_`` the op takes the group's tensor lists and options and updates them
in place. Registering it with :mod:`torch.library` makes it a citizen of PyTorch: autograd bumps
the version counter of every tensor it writes (a backward through an updated weight raises
instead of silently using the new values), ``torch.compile`` treats it as one opaque node (no
graph breaks, no recompiles as the step advances), the profiler shows it, and its fake
implementation gives shapes on ``meta`` and fake tensors.

Implementations, one per backend:

* CPU: the fused C kernel (:mod:`adafactor._fused_cpu`), one call for the group, for the tensors
  it supports; the reference math for the rest, or for all with ``impl="reference"``;
* CUDA: the multi-tensor ``torch._foreach`` implementation (:mod:`adafactor._foreach`), the
  default until the Triton kernels have passed the GPU check (docs/gpu.md); with
  ``impl="triton"`` (opt-in) the Triton kernels, one launch per pass per bucket of tensors;
* every other device, and ``impl="reference"``: the reference math (:mod:`adafactor._reference`);
* fake / meta: output shapes only.

Every implementation checks its inputs before touching a pointer (:func:`check_inputs`).

Schema (the plan's options follow in :class:`adafactor._plan.GroupPlan` order)::

    step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] steps, Tensor(c!)[] row_vars,
          Tensor(d!)[] col_vars, Tensor(e!)[] variances, Tensor(f!)[] exp_avgs,
          Tensor(g!)[] emas, Tensor[] noise, Tensor(i!)[] kahan_comps, int[] factor_dims,
          Tensor lr, Tensor? grad_scale, Tensor? found_inf, Tensor(h!) skipped_steps, <plan>)
        -> (Tensor alpha, Tensor update_rms)

``row_vars``/``col_vars`` hold the factored tensors' statistics in order, ``variances`` the
others'; ``factor_dims`` holds two entries per parameter (``-1, -1``: not factored);
``exp_avgs``, ``emas`` and ``noise`` are empty or hold one tensor per parameter (``noise``: the
stochastic-rounding draws of bf16 parameters, empty tensors for the others; ``kahan_comps``:
with ``kahan_summation`` the bf16 compensation buffers of bf16 parameters, empty tensors for the
others, updated with them). ``steps`` are the
float64 step counters, advanced by the op. With ``found_inf`` nonzero the op changes nothing but
``skipped_steps += 1`` (and reports ``alpha = 0``). ``alpha`` and ``update_rms`` are float32, one
entry per parameter: :math:`\\alpha_t` and RMS(U) before update clipping.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _fused_cpu
from . import _reference as ref
from ._driver import LOCAL, LocalPasses, ReferencePasses, run_passes, update_ema
from ._plan import GroupPlan, Impl, StepScalars, step_scalars
from ._validation import check_lr
from .factoring import FactorDims
from .kernels import triton_module

__all__ = ["SCHEMA", "OpArgs", "check_inputs", "step_"]

SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] steps, Tensor(c!)[] row_vars, "
    "Tensor(d!)[] col_vars, Tensor(e!)[] variances, Tensor(f!)[] exp_avgs, Tensor(g!)[] emas, "
    "Tensor[] noise, Tensor(i!)[] kahan_comps, int[] factor_dims, Tensor lr, Tensor? grad_scale, "
    f"Tensor? found_inf, Tensor(h!) skipped_steps, {GroupPlan.schema_args()}) -> (Tensor, Tensor)"
)
_MUTATED = ("params", "steps", "row_vars", "col_vars", "variances", "exp_avgs", "emas")
_MUTATED += ("kahan_comps", "skipped_steps")


class OpArgs(NamedTuple):
    """The op's tensor arguments, in schema order (the plan's options follow them)."""

    params: list[Tensor]
    grads: list[Tensor]
    steps: list[Tensor]
    row_vars: list[Tensor]
    col_vars: list[Tensor]
    variances: list[Tensor]
    exp_avgs: list[Tensor]
    emas: list[Tensor]
    noise: list[Tensor]
    kahan_comps: list[Tensor]
    factor_dims: list[int]
    lr: Tensor
    grad_scale: Tensor | None
    found_inf: Tensor | None
    skipped_steps: Tensor


_CHECKED = OpArgs._fields[: OpArgs._fields.index("factor_dims") + 1]  # what the checks read


def _split(args: Sequence[Any]) -> tuple[OpArgs, GroupPlan]:
    n = len(OpArgs._fields)
    return OpArgs(*args[:n]), GroupPlan(*args[n:])


def _dims(factor_dims: Sequence[int], i: int) -> FactorDims | None:
    r, c = factor_dims[2 * i], factor_dims[2 * i + 1]
    return None if r < 0 else FactorDims(r, c)


def check_inputs(op: OpArgs) -> None:
    """Every tensor against its parameter: count, shape, device, dtype, layout. Raises ValueError
    (or TypeError for dtypes) naming the tensor, the expected and the actual value."""
    (params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise, kahan_comps,
     factor_dims) = op[: len(_CHECKED)]  # fmt: skip
    n = len(params)
    factored = (
        sum(1 for i in range(n) if factor_dims[2 * i] >= 0) if len(factor_dims) == 2 * n else 0
    )
    counts = {
        "grads": (len(grads), n),
        "steps": (len(steps), n),
        "factor_dims": (len(factor_dims), 2 * n),
        "row_vars": (len(row_vars), factored),
        "col_vars": (len(col_vars), factored),
        "variances": (len(variances), n - factored),
    }
    for name, seq in (
        ("exp_avgs", exp_avgs),
        ("emas", emas),
        ("noise", noise),
        ("kahan_comps", kahan_comps),
    ):
        counts[name] = (len(seq), n if seq else 0)
    for name, (got, want) in counts.items():
        if got != want:
            raise ValueError(f"adafactor.step_: {name} has {got} entries, expected {want}")
    if not _all_fit(op):
        _explain(op)


_POINTED = ("params", "steps", "row_vars", "col_vars", "variances", "exp_avgs", "emas")
_POINTED += ("kahan_comps",)
_LISTED = (*_POINTED, "grads", "noise")

try:  # dynamo's C++ tensor check: Python type, dispatch keys, dtype, device, sizes, strides
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this package supports has it
    _TensorGuards = None


class _Signature:
    """Everything :func:`check_inputs` and the kernel's cached tables read from the inputs:
    the Python type, dtype, device, layout, sizes and strides of every tensor and the data
    pointer of every parameter and state tensor (the gradients and noise are new tensors each
    step). Inputs that match a checked signature pass the checks.

    Compared at C speed by dynamo's tensor check (about 0.1 us a tensor, against 0.6 us for
    reading the attributes from Python); where that check is unavailable or refuses the
    tensors, by tuples of the attributes. Raises ``RuntimeError`` when a tensor has no data
    pointer (fake and functional tensors)."""

    __slots__ = ("counts", "factor_dims", "guards", "meta", "pointers")

    def __init__(self, op: OpArgs) -> None:
        self.pointers = self._pointers(op)
        self.factor_dims = list(op.factor_dims)
        self.counts = [len(getattr(op, name)) for name in _LISTED]
        tensors = list(chain.from_iterable(getattr(op, name) for name in _LISTED))
        self.guards = self.meta = None
        if _TensorGuards is not None:
            try:
                self.guards = _TensorGuards(
                    *tensors,
                    dynamic_dims_sizes=[list(t.size()) for t in tensors],
                    dynamic_dims_strides=[list(t.stride()) for t in tensors],
                )
            except Exception:  # an API change in a later torch: the tuples below
                self.guards = None
        if self.guards is None:
            self.meta = self._meta(tensors)

    @staticmethod
    def _pointers(op: OpArgs) -> list[int]:
        return list(map(Tensor.data_ptr, chain.from_iterable(getattr(op, n) for n in _POINTED)))

    @staticmethod
    def _meta(tensors: list[Tensor]) -> list[Any]:
        return list(zip(map(type, tensors), map(_META, tensors), map(Tensor.stride, tensors)))

    def matches(self, op: OpArgs) -> bool:
        if [len(getattr(op, name)) for name in _LISTED] != self.counts:
            return False
        if list(op.factor_dims) != self.factor_dims:
            return False
        tensors = list(chain.from_iterable(getattr(op, name) for name in _LISTED))
        try:
            if self._pointers(op) != self.pointers:
                return False
            if self.guards is not None:
                return self.guards.check(*tensors)
            return self._meta(tensors) == self.meta
        except RuntimeError:  # no data pointer, or no strides (sparse): check in full
            return False


_META = operator.attrgetter("shape", "dtype", "device", "layout")


_STATE_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16))
_FACTOR_SHAPES: dict[tuple[torch.Size, int, int], tuple[torch.Size, torch.Size]] = {}


def _factor_shapes(shape: torch.Size, r: int, c: int) -> tuple[torch.Size, torch.Size]:
    """The shapes of row_var and col_var (cached: symbolic shapes of fake tensors are not)."""
    try:
        return _FACTOR_SHAPES[(shape, r, c)]
    except (KeyError, TypeError):
        row, col = list(shape), list(shape)
        row[c], col[r] = 1, 1
        out = (torch.Size(row), torch.Size(col))
        if all(isinstance(d, int) for d in shape):
            _FACTOR_SHAPES[(shape, r, c)] = out
        return out


def _fits(t: Tensor, shape: torch.Size, device: torch.device) -> bool:
    return (
        t.shape == shape
        and t.device == device
        and t.dtype in _STATE_DTYPES
        and t.layout == torch.strided
    )


def _comp_fits(k: Tensor, p: Tensor, shape: torch.Size, device: torch.device) -> bool:
    return (
        p.dtype == torch.bfloat16
        and k.shape == shape
        and k.device == device
        and k.dtype == torch.bfloat16
        and k.layout == torch.strided
    )


def _all_fit(op: OpArgs) -> bool:
    """The common case in one quick pass (a few attribute reads per tensor); :func:`_explain`
    finds and names the first mismatch."""
    (params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise, kahan_comps,
     factor_dims) = op[: len(_CHECKED)]  # fmt: skip
    fi = vi = 0
    f64 = torch.float64
    for i, p in enumerate(params):
        shape, device, g, s = p.shape, p.device, grads[i], steps[i]
        if not (g.shape == shape and g.device == device and g.layout == torch.strided):
            return False
        if not g.is_floating_point() or s.dtype != f64 or s.numel() != 1 or not s.is_cpu:
            return False
        r, c = factor_dims[2 * i], factor_dims[2 * i + 1]
        if r >= 0:
            if not 0 <= r < c < len(shape):
                return False
            row, col = _factor_shapes(shape, r, c)
            if not (_fits(row_vars[fi], row, device) and _fits(col_vars[fi], col, device)):
                return False
            fi += 1
        else:
            if not _fits(variances[vi], shape, device):
                return False
            vi += 1
        if (exp_avgs and not _fits(exp_avgs[i], shape, device)) or (
            emas and not _fits(emas[i], shape, device)
        ):
            return False
        z = noise[i] if noise else None
        if z is not None and z.numel() and (z.shape != shape or z.dtype != torch.int32):
            return False
        k = kahan_comps[i] if kahan_comps else None
        if k is not None and k.numel() and not _comp_fits(k, p, shape, device):
            return False
    return True


def _explain(op: OpArgs) -> None:
    """Raise the error that names the first tensor that does not fit its parameter."""
    (params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise, kahan_comps,
     factor_dims) = op[: len(_CHECKED)]  # fmt: skip
    fi = 0
    vi = 0
    for i, p in enumerate(params):
        g = grads[i]
        _same(f"grads[{i}]", g, p, "shape", tuple(p.shape), tuple(g.shape))
        _same(f"grads[{i}]", g, p, "device", p.device, g.device)
        _same(f"grads[{i}]", g, p, "layout", torch.strided, g.layout)
        if not g.dtype.is_floating_point:
            raise TypeError(f"adafactor.step_: grads[{i}] has dtype {g.dtype}, expected floating")
        s = steps[i]
        if s.numel() != 1 or s.dtype != torch.float64 or s.device.type != "cpu":
            raise ValueError(
                f"adafactor.step_: steps[{i}] must be a one-element float64 CPU tensor, got "
                f"shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}"
            )
        dims = _dims(factor_dims, i)
        if dims is not None:
            if not 0 <= dims.row_dim < dims.col_dim < p.dim():
                raise ValueError(
                    f"adafactor.step_: factor_dims of params[{i}] (shape {tuple(p.shape)}) are "
                    f"{tuple(dims)}; expected two increasing dims of the parameter"
                )
            row = list(p.shape)
            row[dims.col_dim] = 1
            col = list(p.shape)
            col[dims.row_dim] = 1
            _state(f"row_vars[{fi}]", row_vars[fi], p, tuple(row))
            _state(f"col_vars[{fi}]", col_vars[fi], p, tuple(col))
            fi += 1
        else:
            _state(f"variances[{vi}]", variances[vi], p, tuple(p.shape))
            vi += 1
        if exp_avgs:
            _state(f"exp_avgs[{i}]", exp_avgs[i], p, tuple(p.shape), low_precision=True)
        if emas:
            _state(f"emas[{i}]", emas[i], p, tuple(p.shape))
        if noise and noise[i].numel():
            _same(f"noise[{i}]", noise[i], p, "shape", tuple(p.shape), tuple(noise[i].shape))
            _same(f"noise[{i}]", noise[i], p, "dtype", torch.int32, noise[i].dtype)
        if kahan_comps and kahan_comps[i].numel():
            k, name = kahan_comps[i], f"kahan_comps[{i}]"
            _same(name, k, p, "shape", tuple(p.shape), tuple(k.shape))
            _same(name, k, p, "device", p.device, k.device)
            _same(name, k, p, "layout", torch.strided, k.layout)
            _same(name, k, p, "dtype", torch.bfloat16, k.dtype)
            if p.dtype != torch.bfloat16:
                raise ValueError(
                    f"adafactor.step_: {name} is a Kahan compensation buffer, but its parameter "
                    f"has dtype {p.dtype}; only bfloat16 parameters take one (pass an empty tensor)"
                )
    raise AssertionError("adafactor.step_: an input check failed without a reason")  # not reached


def _same(name: str, t: Tensor, p: Tensor, what: str, want: Any, got: Any) -> None:
    if got != want:
        raise ValueError(
            f"adafactor.step_: {name} has {what} {got}, but its parameter (shape "
            f"{tuple(p.shape)}, dtype {p.dtype}, device {p.device}) needs {what} {want}"
        )


def _state(name: str, t: Tensor, p: Tensor, shape: tuple[int, ...], low_precision: bool = False):
    _same(name, t, p, "shape", shape, tuple(t.shape))
    _same(name, t, p, "device", p.device, t.device)
    _same(name, t, p, "layout", torch.strided, t.layout)
    allowed = (torch.float32, torch.float64, torch.bfloat16)
    if t.dtype not in allowed:
        raise TypeError(f"adafactor.step_: {name} has dtype {t.dtype}; expected one of {allowed}")


# ---------------------------------------------------------------------------------------------
# the op and its implementations
# ---------------------------------------------------------------------------------------------
def _reference_impl(
    plan: GroupPlan,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    dims: Sequence[FactorDims | None],
    lr: Tensor,
    grad_scale: Tensor | None,
    noise: Sequence[Tensor],
    alphas: Tensor,
    rmss: Tensor,
    index: Sequence[int],
    advance: bool = True,
    wide: bool = False,
) -> None:
    """The reference math through the driver with no collectives (``index``: positions in the
    outputs; ``advance=False``: the step counters were advanced already; ``wide``: in float64)."""
    lr_value: float | Tensor = lr if lr.device.type != "cpu" else float(lr)
    stepped: list[int] = []  # positions of the non-empty tensors, in the driver's order

    def tensors() -> Iterator[LocalPasses]:  # each made when the driver gets to it
        for k in range(len(index)):
            p, step = params[k], states[k]["step"]
            if advance:
                step += 1
            if p.numel() == 0:  # counted, nothing to update (alpha and RMS(U) stay 0)
                continue
            scalars = step_scalars(plan, float(step), lr_value)
            ts = ref.prepare(p, grads[k], states[k], plan, scalars, dims[k])
            if wide:
                ts.widen()
            stepped.append(k)
            yield ReferencePasses(ts)

    draws = (lambda j: noise[stepped[j]]) if noise else None
    out = run_passes(tensors(), plan, LOCAL, grad_scale, draws)
    for k, (alpha, rms) in zip(stepped, out):
        alphas[index[k]] = alpha
        rmss[index[k]] = rms


def _states(
    op: OpArgs, index: Sequence[int] | None = None
) -> tuple[list[dict[str, Tensor]], list[FactorDims | None]]:
    """Per-parameter state dicts (the reference's view) and factored dims from the flat lists,
    for the parameters at ``index`` (default all)."""
    states, dims = [], []
    fi = vi = 0
    wanted = range(len(op.params)) if index is None else set(index)
    for i in range(len(op.params)):
        d = _dims(op.factor_dims, i)
        factored = d is not None
        if i in wanted:
            st = {"step": op.steps[i]}
            if factored:
                st["row_var"], st["col_var"] = op.row_vars[fi], op.col_vars[fi]
            else:
                st["variance"] = op.variances[vi]
            if op.exp_avgs:
                st["exp_avg"] = op.exp_avgs[i]
            if op.emas:
                st["ema"] = op.emas[i]
            if op.kahan_comps and op.kahan_comps[i].numel():
                st["kahan_comp"] = op.kahan_comps[i]
            states.append(st)
            dims.append(d)
        fi, vi = (fi + 1, vi) if factored else (fi, vi + 1)
    return states, dims


def _run(on_cpu: bool, op: OpArgs, plan: GroupPlan) -> tuple[Tensor, Tensor]:
    """The CPU (``on_cpu``) and reference implementations: the kernel chosen by ``plan.impl`` for
    the tensors it supports, the reference math for the rest."""
    if not plan.kahan_summation:  # the buffers are used only with the option
        op = op._replace(kahan_comps=[])
    check_lr(op.lr)  # a compiled step passes a float lr unchecked (_validation.check_lr)
    fused = on_cpu and plan.impl in (Impl.AUTO, Impl.FUSED) and _fused_cpu.available()
    group = _fused_group(op) if fused else None  # checks the inputs (cached)
    if group is None:
        check_inputs(op)
    n = len(op.params)
    device = op.params[0].device if op.params else op.lr.device
    alphas = torch.zeros(n, dtype=torch.float32, device=device)
    rmss = torch.zeros(n, dtype=torch.float32, device=device)
    if op.found_inf is not None and bool(op.found_inf):  # skip_nonfinite: change nothing
        op.skipped_steps.add_(1)
        return alphas, rmss
    fast: list[int] = []
    if plan.impl == Impl.TRITON:  # opt-in: kernels not yet run on a GPU
        tk = triton_module()
        states, dims = _states(op)
        fast = [
            i for i in range(n) if tk.supports(op.params[i], op.grads[i], states[i], plan, dims[i])
        ]
        if fast:  # one batched step for all of them
            tk.run_part(
                plan, op.params, op.grads, states, dims, op.noise, op.lr, op.grad_scale, fast,
                alphas, rmss,
            )  # fmt: skip
    elif group is not None and group.fast:
        fast = group.fast
        _kernel_part(op, plan, group, alphas, rmss)
    taken = set(fast)
    rest = [i for i in range(n) if i not in taken]
    if rest:
        _reference_rest(op, plan, rest, alphas, rmss)
    return alphas, rmss


def _reference_rest(
    op: OpArgs,
    plan: GroupPlan,
    index: list[int],
    alphas: Tensor,
    rmss: Tensor,
    advance: bool = True,
    wide: bool = False,
) -> None:
    """The reference math for the parameters at ``index``."""
    states, dims = _states(op, index)
    _reference_impl(
        plan,
        [op.params[i] for i in index],
        [op.grads[i] for i in index],
        states,
        dims,
        op.lr,
        op.grad_scale,
        [op.noise[i] for i in index] if op.noise else [],
        alphas,
        rmss,
        index,
        advance=advance,
        wide=wide,
    )


class _FusedGroup(NamedTuple):
    """A param group's checked inputs, as the fused kernel sees them (cached across steps)."""

    refs: list[weakref.ref[Tensor]]  # the parameters (an id can be reused once one is gone)
    signature: _Signature | None  # of the inputs that passed the checks
    fast: list[int]  # the parameters the kernel steps
    tables: _fused_cpu.GroupTables | None


_FUSED_GROUPS: dict[tuple[int, ...], _FusedGroup] = {}
_MAX_GROUPS = 4096  # least recently used beyond (one per tensor under gradient release)


def _fused_group(op: OpArgs) -> _FusedGroup:
    """Check the inputs and find the tensors the kernel supports, or reuse the last step's
    answer when the inputs match its signature (the common case: about 0.2 us a tensor)."""
    key = tuple(map(id, op.params))
    group = _FUSED_GROUPS.pop(key, None)
    if (
        group is not None
        and group.signature is not None
        and group.signature.matches(op)
        and all(map(operator.is_, [r() for r in group.refs], op.params))
    ):
        _FUSED_GROUPS[key] = group  # reinserted last: the dict's order is recency
        return group
    check_inputs(op)
    states, dims = _states(op)
    params, grads = op.params, op.grads
    fast = [
        i
        for i in range(len(params))
        if params[i].numel() and _fused_cpu.supports(params[i], grads[i], states[i])
    ]
    tables = None
    if fast:
        tables = _fused_cpu.GroupTables(
            [params[i] for i in fast], [states[i] for i in fast], [dims[i] for i in fast]
        )
    try:
        signature = _Signature(op)
    except RuntimeError:  # a tensor without a data pointer: checked again next step
        signature = None
    group = _FusedGroup([weakref.ref(p) for p in params], signature, fast, tables)
    if signature is not None:
        if len(_FUSED_GROUPS) >= _MAX_GROUPS:
            del _FUSED_GROUPS[next(iter(_FUSED_GROUPS))]
        _FUSED_GROUPS[key] = group
    return group


def _kernel_part(
    op: OpArgs, plan: GroupPlan, group: _FusedGroup, alphas: Tensor, rmss: Tensor
) -> None:
    index = group.fast
    assert group.tables is not None
    whole = len(index) == len(op.params)
    lr_value = float(op.lr)

    def scalars_of(t: float) -> StepScalars:
        return step_scalars(plan, t, lr_value)

    noise = None
    if op.noise:
        noise = op.noise if whole else [op.noise[i] for i in index]
    out = _fused_cpu.group_step(
        group.tables,
        op.params if whole else [op.params[i] for i in index],
        op.grads if whole else [op.grads[i] for i in index],
        plan,
        scalars_of,
        1.0 if op.grad_scale is None else float(op.grad_scale),
        noise,
    )
    if whole:
        alphas.copy_(out.alpha)
        rmss.copy_(out.update_rms)
    else:
        where = torch.tensor(index)
        alphas[where] = out.alpha.float()
        rmss[where] = out.update_rms.float()
    wide = [index[k] for k in out.overflowed]
    if wide:  # untouched by the kernel (step counted): the reference's float64 path
        _reference_rest(op, plan, wide, alphas, rmss, advance=False, wide=True)
    if plan.use_ema:  # (the float64 path above updated its own)
        done = set(wide)
        ts = out.t.tolist()
        for k, i in enumerate(index):
            if i not in done:
                update_ema(op.params[i], op.emas[i], plan, ts[k])
    if out.stale:
        _fused_cpu.warn_stale_rms(out.stale)


def _step_default(*args: Any) -> tuple[Tensor, Tensor]:
    """Any device: the reference math (arguments: :data:`SCHEMA`)."""
    return _run(False, *_split(args))


def _step_cpu(*args: Any) -> tuple[Tensor, Tensor]:
    """CPU: the fused C kernel for the tensors it supports, the reference for the rest."""
    return _run(True, *_split(args))


def _step_cuda(*args: Any) -> tuple[Tensor, Tensor]:
    """CUDA: the multi-tensor foreach implementation (:mod:`adafactor._foreach`) for
    ``impl="auto"`` and ``"fused"``; ``"reference"`` and ``"triton"`` as on other devices."""
    from . import _foreach

    op, plan = _split(args)
    if plan.impl not in (Impl.AUTO, Impl.FUSED):
        return _run(False, op, plan)
    check_inputs(op)
    check_lr(op.lr)
    return _foreach.group_step(op, plan)


# Defined with the low-level torch.library API, one kernel per dispatch key: the
# torch.library.custom_op wrappers (an autograd.Function, a pytree walk and an aliasing check
# over every tensor) cost about 3 ms a call for 2000 parameters, a quarter of such a step.
_LIB = torch.library.Library("adafactor", "DEF")
_LIB.define("step_" + SCHEMA)
step_ = torch.ops.adafactor.step_.default
_MUTATED_INDEX = [i for i, arg in enumerate(step_._schema.arguments) if arg.name in _MUTATED]


def _bump(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Bump the version counter of every tensor the op writes, one call per mutated list
    (torch.library's generic kernel bumps tensor by tensor from Python)."""
    names = step_._schema.arguments
    for i in _MUTATED_INDEX:
        value = args[i] if i < len(args) else kwargs[names[i].name]
        torch._C._increment_version(value if isinstance(value, list) else [value])


def _bump_versions(keyset: Any, *args: Any, **kwargs: Any) -> Any:
    """ADInplaceOrView, reached alone only below autograd (the Autograd kernel skips it)."""
    _bump(args, kwargs)
    return step_.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)


def _autograd(keyset: Any, *args: Any, **kwargs: Any) -> Any:
    """Autograd: an optimizer step has no derivative (its outputs never require grad); like
    every in-place op, it refuses a leaf that requires grad while grad mode is on.

    Every Python kernel the dispatcher reaches converts each tensor of the lists between C++
    and Python (about 0.35 us a tensor: 3 ms for 2000 parameters with their gradients and
    state), so this kernel also does ADInplaceOrView's work, and calls the backend's kernel
    itself when that is the next the dispatcher would call (a CPU or CUDA tensor with no
    Python, functionalization or other key in between)."""
    if torch.is_grad_enabled():
        params = args[0] if args else kwargs["params"]
        if any(p.requires_grad for p in params):
            raise RuntimeError(
                "adafactor.step_ updates parameters in place: call it under torch.no_grad() "
                "(Adafactor.step does), as for any in-place update of a leaf that requires grad"
            )
    _bump(args, kwargs)
    below = keyset & torch._C._after_ADInplaceOrView_keyset
    backend = _BACKENDS.get(below.highestPriorityTypeId())
    if backend is not None and not kwargs:
        return backend(*args)
    return step_.redispatch(below, *args, **kwargs)


_BACKENDS = {torch._C.DispatchKey.CPU: _step_cpu, torch._C.DispatchKey.CUDA: _step_cuda}
_LIB.impl("step_", _step_default, "CompositeExplicitAutograd")
_LIB.impl("step_", _step_cpu, "CPU")
_LIB.impl("step_", _step_cuda, "CUDA")
_LIB.impl("step_", _bump_versions, "ADInplaceOrView", with_keyset=True)
_LIB.impl("step_", _autograd, "Autograd", with_keyset=True)


@torch.library.register_fake("adafactor::step_", lib=_LIB)
def _step_fake(*args: Any) -> tuple[Tensor, Tensor]:
    op, _ = _split(args)
    check_inputs(op)
    like = op.params[0] if op.params else op.lr
    n = len(op.params)
    return like.new_empty(n, dtype=torch.float32), like.new_empty(n, dtype=torch.float32)
