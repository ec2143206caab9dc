"""``torch.ops.adafactor.step_``: a registered op, visible to autograd, the dispatcher, the
profiler and torch.compile, that checks its inputs before touching a pointer."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

import adafactor._fused_cpu as fused
import adafactor.ops as ops
from adafactor import Adafactor
from adafactor.functional import group_op_args, group_plan
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput

IMPLS = ["reference", "auto"]
SHAPES = [(6, 5), (4, 3, 5), (7,), ()]


def _model_params(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype).to(device)) for s in SHAPES
    ]


def _set_grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype).to(p.device)


def _op_args(opt: Adafactor) -> tuple[Any, ...]:
    """The op's arguments for the optimizer's first group, as the optimizer builds them."""
    group = opt.param_groups[0]
    params = [p for p in group["params"] if p.grad is not None]
    states = [opt._state_of(p, group) for p in params]
    plan = group_plan(group, opt.impl, opt.carry_param_rms)
    lr = torch.tensor(0.01, dtype=torch.float64)
    grads = [p.grad for p in params]
    return (*group_op_args(params, grads, states, group, plan, lr=lr), *plan.as_args())


OPCHECK_SAMPLES = [
    s
    for s in OPTIM_INPUTS
    if s.desc
    in {
        "defaults",
        "unfactored",
        "momentum grad",
        "bf16 momentum",
        "weight decay lr_before",
        "eps1 clamp",
        "clipnorm",
        "ema",
        "preset=big_vision",
    }
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: s.desc)
def test_opcheck(sample: AdafactorInput, impl: str) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch of the op."""
    params = _model_params()
    opt = Adafactor(params, impl=impl, **sample.kwargs)
    _set_grads(params, 1)
    opt.step()  # the state exists
    _set_grads(params, 2)
    args = list(_op_args(opt))
    args[0] = [p.detach() for p in args[0]]  # an optimizer step is not differentiated
    torch.library.opcheck(torch.ops.adafactor.step_.default, tuple(args))


@pytest.mark.parametrize("impl", IMPLS)
def test_update_bumps_version_counters_so_autograd_refuses_stale_graphs(impl: str) -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(4, 4, requires_grad=True)
    y = (w * x).sum()  # saves w for the backward
    w.grad = torch.randn(4, 4)
    version = w._version
    Adafactor([w], impl=impl).step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_state_versions_advance_too() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = Adafactor([w], beta1=0.9)
    w.grad = torch.randn(4, 4)
    opt.step()
    before = {k: v._version for k, v in opt.state[w].items()}
    w.grad = torch.randn(4, 4)
    opt.step()
    assert all(opt.state[w][k]._version > v for k, v in before.items())


def test_profiler_shows_the_op() -> None:
    params = _model_params()
    opt = Adafactor(params)
    _set_grads(params, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "adafactor::step_" in names


@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
def test_step_on_meta_parameters_completes(sample: AdafactorInput) -> None:
    """No host read of a device tensor anywhere in a step: meta tensors have no values."""
    if sample.kwargs.get("stochastic_rounding") or isinstance(
        sample.kwargs.get("lr"), torch.Tensor
    ):
        pytest.skip("a CPU generator / CPU lr tensor with meta parameters is not a meta step")
    params = _model_params(torch.bfloat16 if sample.bf16 else torch.float32, "meta")
    opt = Adafactor(params, skip_nonfinite=True, **sample.kwargs)
    for seed in range(2):
        _set_grads(params, seed)
        opt.step()
    stats = opt.last_step_stats[0]
    assert stats is not None and stats.alpha.device.type == "meta"
    assert all(int(opt.state[p]["step"]) == 0 for p in params)  # the fake step changes nothing


def test_mismatched_grad_is_refused_before_anything_changes() -> None:
    for impl in IMPLS:
        p = torch.nn.Parameter(torch.randn(6, 5))
        opt = Adafactor([p], impl=impl)
        p.grad = torch.randn(6, 5)
        opt.step()
        p.grad.data = torch.randn(3, 5)  # bypasses autograd's shape check
        before = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items()}
        with pytest.raises(
            ValueError, match=r"grads\[0\] has shape \(3, 5\).*needs shape \(6, 5\)"
        ):
            opt.step()
        assert torch.equal(p, before)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a[3].__setitem__(0, torch.zeros(5, 5)), r"row_vars\[0\] has shape \(5, 5\)"),
        (lambda a: a.__setitem__(2, a[2][:1]), r"steps has 1 entries, expected 4"),
        (lambda a: a[1].__setitem__(0, a[1][0].to(torch.int32)), r"grads\[0\] has dtype"),
        (lambda a: a.__setitem__(10, a[10][:-2]), r"factor_dims has 6 entries, expected 8"),
        (lambda a: a[5].__setitem__(0, torch.zeros(3)), r"variances\[0\] has shape \(3,\)"),
    ],
)
def test_op_checks_every_input(change: Any, match: str) -> None:
    params = _model_params()
    opt = Adafactor(params)
    _set_grads(params, 1)
    opt.step()
    args = list(_op_args(opt))
    for i in (1, 3, 5):
        args[i] = list(args[i])
    change(args)
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError), match=match), torch.no_grad():
        torch.ops.adafactor.step_(*args)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_one_kernel_call_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fused.group_step
    monkeypatch.setattr(fused, "group_step", lambda *a: calls.append(len(a[1])) or real(*a))
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(30)]
    opt = Adafactor([{"params": params[:20]}, {"params": params[20:], "beta1": 0.9}])
    _set_grads(params, 0)
    opt.step()
    assert calls == [20, 10]


def test_kernel_layout_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library whose argument layout differs from the Python mirror is never called."""
    lib = fused.load()
    monkeypatch.setattr(fused, "_TABLE_I", fused._TABLE_I + 1)
    with pytest.raises(fused.FusedUnavailableError, match="layout"):
        fused._bind(lib)
    assert ctypes.sizeof(fused._Args) == lib.af_layout(0)


def test_a_mode_the_kernel_lacks_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new enum member without a kernel branch fails when the library loads, not mid-step."""
    import enum

    from adafactor import _plan

    lib = fused.load()
    extended = enum.IntEnum("Momentum", {**{m.name: int(m) for m in _plan.Momentum}, "NEW": 4})
    monkeypatch.setattr(fused, "Momentum", extended)
    with pytest.raises(fused.FusedUnavailableError, match=r"does not implement Momentum \['NEW'\]"):
        fused._bind(lib)


_CHANGES = {
    "state tensor replaced": lambda opt, p: opt.state[p].__setitem__(
        "row_var", opt.state[p]["row_var"].clone()
    ),
    "param made a transposed view (same pointer and shape)": lambda opt, p: setattr(
        p, "data", p.data.t()
    ),
    "param replaced by a copy": lambda opt, p: setattr(p, "data", p.data.clone()),
    "transposed gradient": lambda opt, p: setattr(p, "grad", p.grad.t().contiguous().t()),
}


@pytest.mark.parametrize("guards", [True, False], ids=["tensor-guards", "tuples"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_cached_inputs_follow_changes_between_steps(
    change: str, guards: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel caches each group's checked inputs and tables across steps; a change to any
    tensor between steps is seen (the step equals the reference's on the changed inputs), with
    dynamo's C++ tensor check and with the attribute tuples used where it is unavailable."""
    if not guards:
        monkeypatch.setattr(ops, "_TensorGuards", None)
    runs = []
    for impl in ("auto", "reference"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 8))
        opt = Adafactor([p], impl=impl, beta1=0.9)
        for step in range(4):
            p.grad = torch.randn(8, 8)
            if step == 2:
                _CHANGES[change](opt, p)
            opt.step()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p_auto, s_auto), (p_ref, s_ref) = runs
    torch.testing.assert_close(p_auto, p_ref, rtol=1e-6, atol=1e-7)
    for key, value in s_ref.items():
        torch.testing.assert_close(s_auto[key], value, rtol=1e-6, atol=1e-7)


def test_versions_advance_below_autograd_too() -> None:
    """The Autograd kernel bumps the versions itself and skips ADInplaceOrView; dispatched below
    autograd, the ADInplaceOrView kernel bumps them."""
    params = _model_params()
    opt = Adafactor(params)
    _set_grads(params, 1)
    opt.step()
    args = _op_args(opt)
    before = [p._version for p in params]
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        torch.ops.adafactor.step_(*args)
    assert all(p._version > v for p, v in zip(params, before))


def test_op_refuses_leaves_that_require_grad_in_grad_mode() -> None:
    """Like any in-place op on a leaf that requires grad: refused in grad mode, before anything
    changes (Adafactor.step runs it under torch.no_grad())."""
    params = _model_params()
    opt = Adafactor(params)
    _set_grads(params, 1)
    opt.step()
    args = _op_args(opt)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"in place: call it under torch.no_grad\(\)"):
        torch.ops.adafactor.step_(*args)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with torch.no_grad():
        torch.ops.adafactor.step_(*args)
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_dispatch_modes_see_the_op() -> None:
    """The Autograd kernel calls the CPU kernel itself only when the dispatcher would call it
    next; a key in between (here a dispatch mode's) gets the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[Any] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return func(*args, **(kwargs or {}))

    params = _model_params()
    opt = Adafactor(params)
    _set_grads(params, 1)
    before = [p.detach().clone() for p in params]
    with Record():
        opt.step()
    assert torch.ops.adafactor.step_.default in seen
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
