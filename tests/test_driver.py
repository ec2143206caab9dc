"""The one pass driver (adafactor._driver): plain tensors and shards run the same loop."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import Tensor

from adafactor import Adafactor, _driver, ops
from adafactor import _reference as ref
from adafactor._plan import GroupPlan, plan_of, step_scalars
from adafactor.factoring import FactorDims, factor_dims

F32_MAX = torch.finfo(torch.float32).max
BF16_MAX = torch.finfo(torch.bfloat16).max


def _plan(**kwargs: Any) -> GroupPlan:
    opt = Adafactor([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    return plan_of(opt.param_groups[0], impl=kwargs.get("impl", "auto"), carry_param_rms=False)


class _TwoThreads(_driver.Reduction):
    """Two ranks as two threads of this process, each holding some rows (dim 0) of every
    tensor: a sum over dim 0 is partial, and the threads add theirs."""

    collective = True

    def __init__(self, rank: int, slots: list[Any], barrier: threading.Barrier) -> None:
        self.rank, self.slots, self.barrier = rank, slots, barrier
        self.rounds = 0

    def peers(self, index: int, dims: tuple[int, ...] | None) -> Any:
        return ("rows",) if dims is None or 0 in dims else ()

    def all_reduce(self, values: list[Tensor], peers: list[Any]) -> list[Tensor]:
        self.rounds += 1
        self.slots[self.rank] = [v.clone() for v in values]
        self.barrier.wait()
        totals = [a + b for a, b in zip(*self.slots)]  # the same order on both: equal totals
        self.barrier.wait()
        return totals


SHAPES = [(5, 6), (7,), (4, 3, 2)]
SPLIT = 3  # rank 0 holds the first 3 rows (dim 0) of every tensor, rank 1 the rest
ROWS = (slice(0, SPLIT), slice(SPLIT, None))


def _new_state(shape: tuple[int, ...], dims: FactorDims | None) -> dict[str, Tensor]:
    state = {"step": torch.zeros((), dtype=torch.float64), "exp_avg": torch.zeros(shape)}
    if dims is None:
        state["variance"] = torch.zeros(shape)
    else:
        row, col = list(shape), list(shape)
        row[dims.col_dim], col[dims.row_dim] = 1, 1
        state["row_var"], state["col_var"] = torch.zeros(row), torch.zeros(col)
    return state


def _split(value: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether a state tensor is split by rows like its parameter: not the step, nor a factor
    whose size-1 (reduced) dim is dim 0; every rank holds those whole."""
    return value.dim() > 0 and value.shape[0] == shape[0]


def _rank_state(whole: dict[str, Tensor], shape: tuple[int, ...], rank: int) -> dict[str, Tensor]:
    """A rank's state: views of its rows (its writes land in ``whole``), its own copy of what
    every rank holds whole."""
    return {
        key: value[ROWS[rank]] if _split(value, shape) else value.clone()
        for key, value in whole.items()
    }


def _passes(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    plan: GroupPlan,
    shape: tuple[int, ...],
    dims: FactorDims | None,
) -> _driver.LocalPasses:
    state["step"] += 1
    scalars = step_scalars(plan, float(state["step"]), 1e-2)
    return _driver.local_passes(param, grad, state, plan, scalars, dims, shape)


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    """Equal up to the rounding of sums taken in another order: 1e-6 of the whole tensor's norm
    (the float32 path; the float64 one sums the same squares exactly enough)."""
    diff = (actual.double() - expected.double()).norm()
    assert float(diff) <= 1e-6 * float(expected.double().norm()), float(diff)


def _two_ranks(
    plan: GroupPlan,
    params: list[Tensor],
    grads: list[Tensor],
    rank_states: list[list[dict[str, Tensor]]],
    dims: list[FactorDims | None],
) -> list[int]:
    """One step of the row shards on two threads; returns each one's number of rounds."""
    slots: list[Any] = [None, None]
    barrier = threading.Barrier(2, timeout=20)

    def rank_step(rank: int) -> int:
        reduction = _TwoThreads(rank, slots, barrier)
        rows = ROWS[rank]
        args = zip(params, grads, rank_states[rank], SHAPES, dims)
        local = [_passes(p[rows], g[rows], st, plan, s, d) for p, g, st, s, d in args]
        _driver.run_passes(local, plan, reduction)
        return reduction.rounds

    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(rank_step, r) for r in (0, 1)]]


@pytest.mark.parametrize("options", [{}, {"beta1": 0.9, "clipnorm": 1.0}], ids=str)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_row_shards_step_like_whole_tensors(impl: str, options: dict[str, Any]) -> None:
    """The driver on whole tensors (no collectives) and on row shards held by two threads (sums
    exchanged between the passes) gives the same parameters and state, also when only one
    shard's gradient overflows float32 (1e30): both ranks then take the float64 path."""
    plan = _plan(impl=impl, **options)
    gen = torch.Generator().manual_seed(0)
    dims = [factor_dims(s, "last2", 2, True) for s in SHAPES]
    whole = [torch.randn(s, generator=gen) for s in SHAPES]
    states = [_new_state(s, d) for s, d in zip(SHAPES, dims)]
    sharded = [w.clone() for w in whole]
    sharded_states = [_new_state(s, d) for s, d in zip(SHAPES, dims)]
    rank_states = [[_rank_state(st, s, r) for st, s in zip(sharded_states, SHAPES)] for r in (0, 1)]
    for step in range(3):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        if step == 0:  # rank 1's rows only; the next steps see the saturated statistics
            grads[0][-1, -1] = 1e30
            grads[1][-1] = -1e30
        args = zip(whole, grads, states, SHAPES, dims)
        _driver.run_passes([_passes(p, g, st, plan, s, d) for p, g, st, s, d in args], plan)

        rounds = _two_ranks(plan, sharded, grads, rank_states, dims)
        assert rounds == [4, 4] if step == 0 else [3, 3]  # round 1 again for float64
        if step == 0 and not options:  # float64 stores the 1e30 row's statistics saturated
            assert float(states[0]["row_var"][-1]) == F32_MAX
            assert float(sharded_states[0]["row_var"][-1]) == F32_MAX

    for k in range(len(SHAPES)):
        _assert_close(sharded[k], whole[k])
        for key, value in states[k].items():
            assert bool(torch.isfinite(value).all()), (k, key)
            split = _split(value, SHAPES[k])
            for got in [sharded_states[k][key]] if split else [rs[k][key] for rs in rank_states]:
                _assert_close(got, value)


def test_one_device_steps_one_tensor_at_a_time() -> None:
    """Without collectives the driver takes each tensor from the iterable only when the one
    before is written: one tensor's temporaries (U, a float32 copy of a bf16 gradient) at a
    time, as a per-tensor loop."""
    plan = _plan(impl="reference")
    events: list[str] = []

    class Logged(_driver.ReferencePasses):
        def apply_update(self, update_sq: Tensor, noise: Tensor | None) -> Any:
            events.append(f"write {tuple(self.param.shape)}")
            return super().apply_update(update_sq, noise)

    def tensors() -> Any:
        for shape in SHAPES:
            events.append(f"make {shape}")
            p, dims = torch.randn(shape), factor_dims(shape, "last2", 2, True)
            state = _new_state(shape, dims)
            state["step"] += 1
            ts = ref.prepare(
                p, torch.randn(shape), state, plan, step_scalars(plan, 1.0, 1e-2), dims
            )
            yield Logged(ts)

    out = _driver.run_passes(tensors(), plan)
    assert len(out) == len(SHAPES)
    assert events == [e for s in SHAPES for e in (f"make {s}", f"write {s}")]


def test_no_overflow_test_off_the_cpu() -> None:
    """The overflow probe reads nothing on the host for device tensors (a CUDA read would
    sync): there is no float64 path off the CPU. Shown on the meta device."""
    plan = _plan(impl="reference")
    shape, dims = (4, 3), FactorDims(0, 1)
    p = torch.empty(shape, device="meta")
    state = {
        key: value.to("meta") if key != "step" else value
        for key, value in _new_state(shape, dims).items()
    }
    ts = ref.prepare(
        p, torch.empty(shape, device="meta"), state, plan, step_scalars(plan, 1.0, 1e-2), dims
    )
    passes = _driver.ReferencePasses(ts)
    assert passes.overflow_probe(passes.grad_square_sums()) is None


def test_the_reference_op_runs_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference implementation of torch.ops.adafactor.step_ runs the driver's loop, one
    tensor per batch (the sharded step runs it with all tensors in one batch: the overflow
    scenario of tests/distributed)."""
    calls = []
    step = _driver._step
    monkeypatch.setattr(
        _driver, "_step", lambda batch, *a: calls.append(len(batch)) or step(batch, *a)
    )
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Adafactor(params, impl="reference")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert calls == [1, 1, 1]  # one tensor per call: no collectives, nothing to wait for


# (weights, EMA) near the largest values: float32 weights saturated by a step (3.4e38 rounds to
# inf in bfloat16) under a bfloat16 EMA (state_dtype), float64 weights beyond float32 under a
# float32 one; beside them ordinary elements, whose results must keep their bits
EMA_EDGES = [
    (
        torch.tensor([F32_MAX, -F32_MAX, 3.0e38, 1.5, -2.25, 0.1], dtype=torch.float32),
        torch.tensor([BF16_MAX, -1.0, BF16_MAX, 1.5, 7.0, -0.3], dtype=torch.bfloat16),
    ),
    (
        torch.tensor([1e300, -1e39, 2.0, F32_MAX, 0.7], dtype=torch.float64),
        torch.tensor([F32_MAX, 3.0, 1.0, -F32_MAX, 0.2], dtype=torch.float32),
    ),
]


@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("case", range(len(EMA_EDGES)))
def test_ema_saturates_and_keeps_every_finite_result(case: int, m: float) -> None:
    """ema <- ema m + x (1 - m) in the EMA's dtype is saturated at that dtype's largest value:
    weights cast to a narrower EMA dtype round to inf near the top (the EMA became inf, or NaN
    at m = 1: inf * 0). Every result that was finite keeps its bits, x == ema stays exact, and
    the overwrite copies the EMA into the weights."""
    p, ema = (t.clone() for t in EMA_EDGES[case])
    before = ema.double()
    x = p.to(ema.dtype)
    old = torch.where(x == ema, ema, ema * m + x * (1 - m))  # the unsaturated expression
    plan = _plan(use_ema=True, ema_momentum=m, ema_overwrite_frequency=2)
    _driver.update_ema(p, ema, plan, 1.0)
    assert bool(ema.isfinite().all()), ema
    finite = old.isfinite()
    assert not bool(finite.all())  # (the case has an element that overflowed)
    assert torch.equal(ema[finite], old[finite])  # bit for bit
    big = torch.finfo(ema.dtype).max
    # the others: the average of the weights saturated in the EMA dtype
    saturated = p.double().clamp(-big, big)
    want = torch.where(saturated == before, before, before * m + saturated * (1 - m))
    assert torch.allclose(ema.double()[~finite], want.clamp(-big, big)[~finite], rtol=2**-7)
    _driver.update_ema(p, ema, plan, 2.0)  # an overwrite step: x <- ema
    assert torch.equal(p, ema.to(p.dtype))


def _edge_grads() -> dict[str, Tensor]:
    """Finite gradients at float32's edge, each the float64 path's test in one form."""
    g = torch.Generator().manual_seed(3)
    grads = {name: torch.randn(shape, generator=g) for name, shape in SWITCH_SHAPES.items()}
    grads["total only, unfactored"].fill_(1e19)  # squares 1e38: their sum (7e38) only
    grads["total only, factored"].fill_(0.0).fill_diagonal_(1.5e19)  # rows, cols 2.25e38
    grads["a row sum"][1, :2] = 1.5e19  # that row's sum 4.5e38
    grads["a square"][2] = 2e19  # 4e38
    return grads


SWITCH_SHAPES = {
    "total only, unfactored": (7,),
    "total only, factored": (4, 3),
    "a row sum": (4, 3),
    "a square": (5,),
    "ordinary": (6, 5),
}
WIDE = {"a row sum", "a square"}  # beyond float32: a square, or a row or column sum


@pytest.mark.parametrize(
    "options",
    [{}, {"clipnorm": 1e-3}, {"global_clipnorm": 1e-3}, {"preset": "torch"}],
    ids=["plain", "clipnorm", "global_clipnorm", "torch"],
)
def test_reference_and_kernel_take_the_float64_path_on_the_same_tensors(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference decides the float64 path from float64 sums with the C kernel's test: a
    square of g or a row or column sum beyond float32, not the sum over the whole tensor (only
    clipnorm uses it, in float64). Both switch on the same tensors, and where float32 loses the
    extreme statistics (clipnorm's scale^2 / n underflows beside 1e38 squares) it loses them alike
    in both: the results agree to float32 rounding."""
    widened: dict[str, list[tuple[int, ...]]] = {"reference": [], "fused": []}
    widen = _driver.ReferencePasses.widen
    rest = ops._reference_rest

    def reference_widen(self: _driver.ReferencePasses) -> Any:
        widened["reference"].append(tuple(self.param.shape))
        return widen(self)

    def kernel_rest(op: Any, plan: Any, index: list[int], *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("wide"):  # the tensors the kernel handed over, untouched
            widened["fused"] += [tuple(op.params[i].shape) for i in index]
        return rest(op, plan, index, *args, **kwargs)

    monkeypatch.setattr(_driver.ReferencePasses, "widen", reference_widen)
    monkeypatch.setattr(ops, "_reference_rest", kernel_rest)
    runs = {}
    for impl in ("reference", "fused"):
        gen = torch.Generator().manual_seed(4)
        params = {
            name: torch.nn.Parameter(torch.randn(shape, generator=gen))
            for name, shape in SWITCH_SHAPES.items()
        }
        opt = Adafactor(list(params.values()), impl=impl, **options)
        for step in range(2):
            grads = _edge_grads() if step == 0 else {n: g * 1e-2 for n, g in _edge_grads().items()}
            for name, p in params.items():
                p.grad = grads[name]
            opt.step()
        runs[impl] = (params, opt)
    want = sorted(SWITCH_SHAPES[name] for name in WIDE)
    assert sorted(widened["reference"]) == sorted(widened["fused"]) == want, widened
    (ref_params, ref_opt), (fused_params, fused_opt) = runs["reference"], runs["fused"]
    for name in SWITCH_SHAPES:
        pr, pf = ref_params[name], fused_params[name]
        pairs = [("param", pr.detach(), pf.detach())]
        pairs += [(k, v, fused_opt.state[pf][k]) for k, v in ref_opt.state[pr].items()]
        for key, expected, actual in pairs:
            assert bool(torch.isfinite(actual).all()), (name, key)
            scale = expected.double().abs().max().item()
            worst = (actual.double() - expected.double()).abs().max().item()
            assert worst <= 1e-5 * scale, (name, key, worst, scale)
