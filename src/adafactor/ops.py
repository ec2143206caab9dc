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

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _fused_cpu
from . import _reference as ref
from ._plan import GroupPlan, Impl, StepScalars, step_scalars
from .factoring import FactorDims
from .kernels import triton_module

__all__ = ["SCHEMA", "OpArgs", "check_inputs", "step_", "update_ema"]

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
    """The readable math, one tensor after another (``index``: positions in the outputs;
    ``advance=False``: the step counters were advanced already; ``wide``: in float64)."""
    lr_value: float | Tensor = lr if lr.device.type != "cpu" else float(lr)
    for k, i in enumerate(index):
        p, g, state = params[k], grads[k], states[k]
        step = state["step"]
        if advance:
            step += 1
        if p.numel() == 0:  # counted, nothing to update (alpha and RMS(U) stay 0)
            continue
        t = float(step)
        sc = step_scalars(plan, t, lr_value)
        ts = ref.prepare(p, g, state, plan, sc, dims[k])
        ref.adafactor_tensor_step(ts, grad_scale, noise[k] if noise else None, wide)
        assert ts.update_rms is not None
        alphas[i] = ts.alpha
        rmss[i] = ts.update_rms
        if plan.use_ema:
            update_ema(p, state["ema"], plan, t)


def update_ema(p: Tensor, ema: Tensor, plan: GroupPlan, t: float) -> None:
    """ema <- m * ema + (1 - m) * x; every ``ema_overwrite_frequency`` steps x <- ema (Keras)."""
    m = plan.ema_momentum
    # tf_keras' expression (two products and a sum), so the EMA rounds as it does there; but where
    # x equals the EMA it stays exact (the expression rounds by an ulp, which a step that changes
    # nothing, such as DCP's get_state_dict with lr 0, would write into x at an overwrite)
    x = p.to(ema.dtype)
    ema.copy_(torch.where(x == ema, ema, ema * m + x * (1 - m)))
    freq = plan.ema_overwrite_frequency
    if freq is not None and int(t) % freq == 0:
        p.copy_(ema)


def _states(
    params: Sequence[Tensor],
    steps: Sequence[Tensor],
    row_vars: Sequence[Tensor],
    col_vars: Sequence[Tensor],
    variances: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    emas: Sequence[Tensor],
    factor_dims: Sequence[int],
    kahan_comps: Sequence[Tensor] = (),
) -> tuple[list[dict[str, Tensor]], list[FactorDims | None]]:
    """Per-parameter state dicts (the reference's view) and factored dims from the flat lists."""
    states, dims = [], []
    fi = vi = 0
    for i in range(len(params)):
        d = _dims(factor_dims, i)
        st = {"step": steps[i]}
        if d is not None:
            st["row_var"], st["col_var"] = row_vars[fi], col_vars[fi]
            fi += 1
        else:
            st["variance"] = variances[vi]
            vi += 1
        if exp_avgs:
            st["exp_avg"] = exp_avgs[i]
        if emas:
            st["ema"] = emas[i]
        if kahan_comps and kahan_comps[i].numel():
            st["kahan_comp"] = kahan_comps[i]
        states.append(st)
        dims.append(d)
    return states, dims


def _run(on_cpu: bool, op: OpArgs, plan: GroupPlan) -> tuple[Tensor, Tensor]:
    """The CPU (``on_cpu``) and reference implementations: the kernel chosen by ``plan.impl`` for
    the tensors it supports, the reference math for the rest."""
    check_inputs(op)
    (params, grads, steps, row_vars, col_vars, variances, exp_avgs, emas, noise, kahan_comps,
     factor_dims, lr, grad_scale, found_inf, skipped_steps) = op  # fmt: skip
    n = len(params)
    device = params[0].device if params else lr.device
    alphas = torch.zeros(n, dtype=torch.float32, device=device)
    rmss = torch.zeros(n, dtype=torch.float32, device=device)
    if found_inf is not None and bool(found_inf):  # skip_nonfinite: change nothing
        skipped_steps.add_(1)
        return alphas, rmss
    if not plan.kahan_summation:  # the buffers are used only with the option
        kahan_comps = []
    states, dims = _states(
        params, steps, row_vars, col_vars, variances, exp_avgs, emas, factor_dims, kahan_comps
    )
    fast: list[int] = []
    if plan.impl == Impl.TRITON:  # opt-in: kernels not yet run on a GPU
        tk = triton_module()
        fast = [i for i in range(n) if tk.supports(params[i], grads[i], states[i], plan, dims[i])]
        if fast:  # one batched step for all of them
            tk.run_part(
                plan, params, grads, states, dims, noise, lr, grad_scale, fast, alphas, rmss
            )
    elif on_cpu and plan.impl in (Impl.AUTO, Impl.FUSED) and _fused_cpu.available():
        fast = [
            i
            for i in range(n)
            if params[i].numel() and _fused_cpu.supports(params[i], grads[i], states[i])
        ]
        if fast:
            _kernel_part(
                plan, params, grads, states, dims, noise, lr, grad_scale, fast, alphas, rmss
            )
    done = set(fast)
    rest = [i for i in range(n) if i not in done]
    if rest:
        _reference_impl(
            plan,
            [params[i] for i in rest],
            [grads[i] for i in rest],
            [states[i] for i in rest],
            [dims[i] for i in rest],
            lr,
            grad_scale,
            [noise[i] for i in rest] if noise else [],
            alphas,
            rmss,
            rest,
        )
    return alphas, rmss


_TABLES: dict[tuple[int, ...], _fused_cpu.GroupTables] = {}


def _kernel_part(
    plan: GroupPlan,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    dims: list[FactorDims | None],
    noise: list[Tensor],
    lr: Tensor,
    grad_scale: Tensor | None,
    index: list[int],
    alphas: Tensor,
    rmss: Tensor,
) -> None:
    ps = [params[i] for i in index] if len(index) < len(params) else params
    sts = [states[i] for i in index] if len(index) < len(params) else states
    key = tuple(id(p) for p in ps)
    tables = _TABLES.get(key)
    if tables is None or not tables.valid_for(ps, sts):
        tables = _fused_cpu.GroupTables(ps, sts, [dims[i] for i in index])
        if len(_TABLES) > 64:  # groups of optimizers that are gone
            _TABLES.clear()
        _TABLES[key] = tables
    lr_value = float(lr)

    def scalars_of(t: float) -> StepScalars:
        return step_scalars(plan, t, lr_value)

    sr = [noise[i] for i in index] if noise else None
    out = _fused_cpu.group_step(
        tables,
        ps,
        [grads[i] for i in index],
        plan,
        scalars_of,
        1.0 if grad_scale is None else float(grad_scale),
        sr,
    )
    if len(index) == len(params):
        alphas.copy_(out.alpha)
        rmss.copy_(out.update_rms)
    else:
        where = torch.tensor(index)
        alphas[where] = out.alpha.float()
        rmss[where] = out.update_rms.float()
    if out.overflowed:  # untouched by the kernel (step counted): the reference's float64 path
        wide = [index[k] for k in out.overflowed]
        _reference_impl(
            plan,
            [params[i] for i in wide],
            [grads[i] for i in wide],
            [states[i] for i in wide],
            [dims[i] for i in wide],
            lr,
            grad_scale,
            [noise[i] for i in wide] if noise else [],
            alphas,
            rmss,
            wide,
            advance=False,
            wide=True,
        )
    if plan.use_ema:  # (the float64 path above updated its own)
        done = {index[k] for k in out.overflowed}
        for i in index:
            if i not in done:
                update_ema(params[i], states[i]["ema"], plan, float(states[i]["step"]))
    if out.stale:
        _fused_cpu.warn_stale_rms(out.stale)


@torch.library.custom_op("adafactor::step_", mutates_args=_MUTATED, schema=SCHEMA)
def step_(*args: Any) -> tuple[Tensor, Tensor]:
    """Any device: the reference math (arguments: :data:`SCHEMA`)."""
    return _run(False, *_split(args))


_MUTATED_INDEX = [
    i for i, arg in enumerate(step_._opoverload._schema.arguments) if arg.name in _MUTATED
]


def _bump_versions(keyset: Any, *args: Any, **kwargs: Any) -> Any:
    """Autograd's view of the op: bump the version counter of every tensor it writes.

    Replaces torch.library's generic kernel, which bumps tensor by tensor from Python (about 2 us
    each: 15 ms a step for 2000 parameters); here one call per mutated list."""
    names = step_._opoverload._schema.arguments
    for i in _MUTATED_INDEX:
        value = args[i] if i < len(args) else kwargs[names[i].name]
        torch._C._increment_version(value if isinstance(value, list) else [value])
    after = keyset & torch._C._after_ADInplaceOrView_keyset
    return step_._opoverload.redispatch(after, *args, **kwargs)


step_._lib.impl("step_", _bump_versions, "ADInplaceOrView", with_keyset=True)


@step_.register_kernel("cpu")
def _step_cpu(*args: Any) -> tuple[Tensor, Tensor]:
    """CPU: the fused C kernel for the tensors it supports, the reference for the rest."""
    return _run(True, *_split(args))


@step_.register_kernel("cuda")
def _step_cuda(*args: Any) -> tuple[Tensor, Tensor]:
    """CUDA: the multi-tensor foreach implementation (:mod:`adafactor._foreach`) for
    ``impl="auto"`` and ``"fused"``; ``"reference"`` and ``"triton"`` as on other devices."""
    from . import _foreach

    op, plan = _split(args)
    if plan.impl not in (Impl.AUTO, Impl.FUSED):
        return _run(False, op, plan)
    check_inputs(op)
    k = OpArgs._fields.index("kahan_comps")  # a keyword of the foreach step
    return _foreach.group_step(*op[:k], *op[k + 1 :], plan, kahan_comps=op.kahan_comps)


@step_.register_fake
def _step_fake(*args: Any) -> tuple[Tensor, Tensor]:
    op, _ = _split(args)
    check_inputs(op)
    like = op.params[0] if op.params else op.lr
    n = len(op.params)
    return like.new_empty(n, dtype=torch.float32), like.new_empty(n, dtype=torch.float32)
