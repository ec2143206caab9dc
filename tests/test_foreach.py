"""The multi-tensor foreach implementation (the CUDA default) against the reference, on CPU.

``_foreach.group_step`` is the op's CUDA kernel. Here it runs on CPU tensors two ways: through
``Adafactor.step`` with the op's CPU dispatch sent to the CUDA registration function (so the
optimizer, the op's checks and the impl selection all run as on a GPU), and directly, in
*capturable* mode (per-step scalars computed from the counters as tensors, skips masked with
``torch.where``), which is what a CUDA graph would capture. Tolerances: ``test_impl_parity``'s.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adafactor import Adafactor, _foreach, ops
from adafactor._plan import GroupPlan, Impl
from adafactor.functional import global_grad_scale, group_op_args, group_plan
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput
from tests.test_impl_parity import _assert_matches

SHAPES = [
    (),
    (1,),
    (4097,),
    (1, 4097),
    (4097, 1),
    (1, 7),
    (5, 3),
    (5, 31, 37),
    (16, 4, 8),
    (8, 4, 3, 3),
    (0,),
    (0, 3),
]
STEPS = 7


@pytest.fixture
def foreach_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op's CPU kernel runs the CUDA registration function (impl 'auto' -> foreach)."""

    real = ops._run

    def run(on_cpu: bool, op: ops.OpArgs, plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if plan.impl in (Impl.AUTO, Impl.FUSED):
            return ops._step_cuda(*op, *plan.as_args())
        return real(on_cpu, op, plan)

    monkeypatch.setattr(ops, "_run", run)


def _assert_states_match(
    pr: torch.Tensor, pf: torch.Tensor, sr: dict, sf: dict, where: str, bf16_state: bool
) -> None:
    for key in sr:
        if key == "kahan_comp":  # float32-level residuals: compare the sums x + comp
            xr, xf = pr.detach().float() + sr[key].float(), pf.detach().float() + sf[key].float()
            _assert_matches(xf, xr, f"{where} x + kahan_comp", bf16_state=True)
            continue
        _assert_matches(sf[key], sr[key], f"{where} state[{key!r}]", bf16_state)


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    init = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=init) * 0.1).to(dtype).requires_grad_(True) for s in shapes]


def _run(
    sample: AdafactorInput, impl: str, shapes: list[tuple[int, ...]], dtype: torch.dtype
) -> tuple[list[torch.Tensor], Adafactor]:
    params = _params(shapes, dtype)
    opt = Adafactor(params, impl=impl, generator=torch.Generator().manual_seed(1), **sample.kwargs)
    grads = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * 1e-2).to(dtype)
        opt.step()
    return params, opt


def _compare(
    ref: tuple[list[torch.Tensor], Adafactor], got: tuple[list[torch.Tensor], Adafactor], desc: str
) -> None:
    (ref_params, ref_opt), (params, opt) = ref, got
    for pr, pf in zip(ref_params, params):
        where = f"{desc} {tuple(pr.shape)}"
        sr, sf = ref_opt.state[pr], opt.state[pf]
        bf16_state = sr.get("exp_avg", pr).dtype == torch.bfloat16
        _assert_matches(pf.detach(), pr.detach(), f"{where} param", bf16_state)
        assert sorted(sr) == sorted(sf), where
        _assert_states_match(pr, pf, sr, sf, where, bf16_state)
    for gr, gf in zip(ref_opt.last_step_stats, opt.last_step_stats):
        assert gr is not None and gf is not None
        torch.testing.assert_close(gf.alpha, gr.alpha, rtol=1e-6, atol=0)
        torch.testing.assert_close(gf.update_rms, gr.update_rms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
def test_foreach_step_matches_reference(sample: AdafactorInput, foreach_dispatch: None) -> None:
    dtype = torch.bfloat16 if sample.bf16 else torch.float32
    ref = _run(sample, "reference", SHAPES, dtype)
    calls = []
    real = _foreach.group_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_foreach, "group_step", counted)
        got = _run(sample, "auto", SHAPES, dtype)
    assert len(calls) == STEPS  # one call per group and step: the foreach path ran
    _compare(ref, got, sample.desc)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta1": 0.9, "momentum_dtype": torch.bfloat16}, {"stochastic_rounding": True}],
    ids=["defaults", "bf16-momentum", "stochastic-rounding"],
)
def test_foreach_bf16_params_match_reference(kwargs: dict, foreach_dispatch: None) -> None:
    sample = AdafactorInput(f"bf16 {kwargs}", kwargs)
    ref = _run(sample, "reference", SHAPES, torch.bfloat16)
    _compare(ref, _run(sample, "auto", SHAPES, torch.bfloat16), sample.desc)


@pytest.mark.parametrize("factored", [True, False])
def test_foreach_float64_state_of_float32_params(factored: bool, foreach_dispatch: None) -> None:
    """state_dtype=float64 with float32 weights: the unfactored tensors' float32 math stores
    its average in float64 (unscaled in float64, saturated at float64's largest value)."""
    sample = AdafactorInput("float64 state", {"state_dtype": torch.float64, "factored": factored})
    ref = _run(sample, "reference", SHAPES, torch.float32)
    _compare(ref, _run(sample, "auto", SHAPES, torch.float32), sample.desc)


# ---------------------------------------------------------------------------------------------
# direct calls: capturable mode, masking, host reads, buckets, memory
# ---------------------------------------------------------------------------------------------
class _Group:
    """An optimizer's first group turned into the op's arguments (state initialised)."""

    def __init__(self, opt: Adafactor, params: list[torch.Tensor]) -> None:
        group = opt.param_groups[0]
        self.opt, self.group, self.params = opt, group, params
        self.states = [opt._state_of(p, group) for p in params]
        self.plan: GroupPlan = group_plan(group, "auto", True)

    def op(
        self,
        grads: list[torch.Tensor],
        skipped: torch.Tensor,
        *,
        lr: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> ops.OpArgs:
        if lr is None:
            lr = torch.tensor(float(self.group["lr"]), dtype=torch.float64)
        op = group_op_args(
            self.params, grads, self.states, self.group, self.plan, lr=lr,
            grad_scale=grad_scale, found_inf=found_inf, generator=generator,
        )  # fmt: skip
        return op._replace(skipped_steps=skipped)


def _snapshot(g: _Group) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in g.params]
    for s in g.states:
        out += [v.clone() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def _grads(shapes: list[tuple[int, ...]], step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in shapes]


_DIRECT_SAMPLES = [s for s in OPTIM_INPUTS if not callable(s.kwargs.get("lr"))]


@pytest.mark.parametrize("sample", _DIRECT_SAMPLES, ids=lambda s: s.desc)
def test_capturable_mode_matches_reference(sample: AdafactorInput) -> None:
    """Per-step scalars from the counters as tensors (what a CUDA graph captures): same results
    as the reference through the optimizer."""
    dtype = torch.bfloat16 if sample.bf16 else torch.float32
    shapes = [(1,), (4097,), (1, 65), (65, 1), (5, 31, 37), (8, 4, 3, 3), (0,)]
    ref = _run(sample, "reference", shapes, dtype)
    params = _params(shapes, dtype)
    kwargs = {k: v for k, v in sample.kwargs.items()}
    opt = Adafactor(params, generator=torch.Generator().manual_seed(1), **kwargs)
    g = _Group(opt, params)
    gens = torch.Generator().manual_seed(2)
    skipped = g.group["skipped_steps"]
    for _ in range(STEPS):
        grads = [(torch.randn(p.shape, generator=gens) * 1e-2).to(dtype) for p in params]
        lr = g.group["lr"]
        lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64)
        scale = None
        if opt.global_clipnorm:
            scale = global_grad_scale(grads, opt.global_clipnorm)
        op = g.op(grads, skipped, lr=lr_t, generator=opt.generator, grad_scale=scale)
        alpha, rms = _foreach.group_step(op, g.plan, capturable=True)
    # the optimizer's last_step_stats are not filled on this path: compare the tensors only
    ref_params, ref_opt = ref
    for pr, pf in zip(ref_params, params):
        where = f"{sample.desc} {tuple(pr.shape)}"
        sr, sf = ref_opt.state[pr], opt.state[pf]
        bf16_state = sr.get("exp_avg", pr).dtype == torch.bfloat16
        _assert_matches(pf.detach(), pr.detach(), f"{where} param", bf16_state)
        _assert_states_match(pr, pf, sr, sf, where, bf16_state)
    last = ref_opt.last_step_stats[0]
    assert last is not None
    torch.testing.assert_close(alpha, last.alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(rms, last.update_rms, rtol=1e-5, atol=0)


def _make_group(shapes: list[tuple[int, ...]], dtype=torch.float32, **kwargs: Any) -> _Group:
    params = _params(shapes, dtype)
    return _Group(Adafactor(params, **kwargs), params)


MASK_OPTIONS = {"beta1": 0.9, "use_ema": True, "ema_overwrite_frequency": 1, "weight_decay": 0.1}


@pytest.mark.parametrize("kwargs", [MASK_OPTIONS, {"factored": False, **MASK_OPTIONS}])
def test_found_inf_skips_without_a_host_read(kwargs: dict) -> None:
    """A skipped step changes nothing, counts the skip, reports zeros, and reads nothing."""
    shapes = [(5, 31, 37), (4097,), (1, 7)]
    g = _make_group(shapes, **kwargs)
    skipped = torch.zeros((), dtype=torch.int64)
    for _ in range(2):  # two ordinary steps, so that the state is not trivial
        op = g.op(_grads(shapes, 0, torch.float32), skipped, found_inf=torch.tensor(False))
        _foreach.group_step(op, g.plan, capturable=True)
    assert int(skipped) == 0 and float(g.states[0]["step"]) == 2.0
    before = _snapshot(g)
    bad = _grads(shapes, 1, torch.float32)
    bad[0][1, 2, 3] = float("nan")
    bad[1][7] = float("inf")
    op = g.op(bad, skipped, found_inf=torch.tensor(True))
    with _no_host_reads():
        alpha, rms = _foreach.group_step(op, g.plan, capturable=True)
    after = _snapshot(g)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(skipped) == 1
    assert not alpha.any() and not rms.any()


class _ScalarReads(TorchDispatchMode):
    """Raises on the ATen ops that copy a tensor's value to the host (``item()`` and what calls
    it inside C++, ``is_nonzero``, ``equal``), except on the storages in ``allowed``."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
    )

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed = allowed

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.READS:
            t = args[0]
            if t.untyped_storage().data_ptr() not in self.allowed:
                raise AssertionError(f"host read: {func} on shape {tuple(t.shape)}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _no_host_reads(allowed: tuple[torch.Tensor, ...] = ()) -> Iterator[list[str]]:
    """Every way of reading a tensor's value on the host raises, except for ``allowed``: the
    Python methods, and the ATen ops behind them (which C++ code calls directly)."""
    ok = {id(t) for t in allowed}
    reads: list[str] = []
    names = ["item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    mp = pytest.MonkeyPatch()
    for name in names:
        real = getattr(torch.Tensor, name)

        def guarded(self: torch.Tensor, *a: Any, _real: Any = real, _name: str = name) -> Any:
            if id(self) not in ok:
                raise AssertionError(f"host read: Tensor.{_name} on shape {tuple(self.shape)}")
            reads.append(_name)
            return _real(self, *a)

        mp.setattr(torch.Tensor, name, guarded)
    try:
        with _ScalarReads({t.untyped_storage().data_ptr() for t in allowed}):
            yield reads
    finally:
        mp.undo()


ALL_OPTIONS = [
    {},
    {"beta1": 0.9, "momentum_kind": "grad", "clipnorm": 0.05},
    {"beta1": 0.9, "momentum_kind": "normalized_update", "weight_decay": 0.1,
     "weight_decay_mode": "alpha", "maximize": True, "clipvalue": 0.01},
    {"beta1": 0.9, "momentum_dtype": torch.bfloat16, "weight_decay": 0.1,
     "weight_decay_mode": "lr_before", "eps1_mode": "clamp", "eps1": None},
    {"use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.1,
     "weight_decay_mode": "unscaled", "warmup_init": True},
    {"relative_step": False, "lr": 1e-3, "beta2": 0.999, "weight_decay": 0.1},
]  # fmt: skip


@pytest.mark.parametrize("capturable", [True, False])
@pytest.mark.parametrize("kwargs", ALL_OPTIONS)
def test_no_host_reads(kwargs: dict, capturable: bool) -> None:
    """Capturable mode reads no tensor on the host; with host counters only the counters (CPU
    tensors) are read: nothing that would synchronise with a device."""
    shapes = [(5, 31, 37), (4097,), (1, 7), ()]
    g = _make_group(shapes, **kwargs)
    skipped = torch.zeros((), dtype=torch.int64)
    lr = torch.tensor(float(g.group["lr"]), dtype=torch.float64)
    scale = torch.tensor(0.5) if capturable else None  # global_clipnorm's factor
    op = g.op(_grads(shapes, 0, torch.float32), skipped, lr=lr, grad_scale=scale)
    allowed = () if capturable else (*op.steps, lr)
    with _no_host_reads(allowed) as reads:
        _foreach.group_step(op, g.plan, capturable=capturable)
    assert capturable or "__float__" in reads  # the counters, read as host floats
    assert all(p.isfinite().all() for p in g.params)


@pytest.mark.parametrize("kwargs", ALL_OPTIONS)
def test_runs_on_meta_tensors(kwargs: dict) -> None:
    """Parameters, gradients and state on ``meta`` (no values at all): any host read raises, so
    completing is proof that nothing is read. Counters on meta too (capturable mode)."""
    shapes = [(5, 31, 37), (4097,), (1, 7), ()]
    g = _make_group(shapes, **kwargs)
    meta = torch.device("meta")
    g.params = [p.detach().to(meta) for p in g.params]
    g.states = [
        {k: (v.to(meta) if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for s in g.states
    ]
    grads = [torch.empty(s, device=meta) for s in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=meta)
    found_inf = torch.empty((), dtype=torch.bool, device=meta)
    skipped = torch.empty((), dtype=torch.int64, device=meta)
    alpha, rms = _foreach.group_step(g.op(grads, skipped, lr=lr, found_inf=found_inf), g.plan)
    assert alpha.device == meta and alpha.shape == (len(shapes),) and rms.shape == alpha.shape


def test_buckets_do_not_change_results() -> None:
    """One tensor per bucket or all in one: the same bits (every op is per element or per
    tensor)."""
    shapes = [(5, 31, 37), (4097,), (1, 7), (64, 65), (300,)]
    results = []
    for limit in (1, 1 << 30):
        g = _make_group(shapes, beta1=0.9, weight_decay=0.1, weight_decay_mode="alpha")
        skipped = torch.zeros((), dtype=torch.int64)
        for step in range(3):
            op = g.op(_grads(shapes, step, torch.float32), skipped)
            out = _foreach.group_step(op, g.plan, bucket_numel=limit)
        results.append((_snapshot(g), out))
    (a, (aa, ar)), (b, (ba, br)) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(aa, ba) and torch.equal(ar, br)


def test_buckets_are_bounded() -> None:
    shapes = [(100, 10)] * 7 + [(5000,)] + [(3,)] * 4
    g = _make_group(shapes)
    op = g.op(_grads(shapes, 0, torch.float32), torch.zeros((), dtype=torch.int64))
    buckets = _foreach._buckets(op, capturable=False, limit=2500)
    for b in buckets:
        assert b.numel <= 2500 or len(b.params) == 1
    assert sorted(i for b in buckets for i in b.index) == list(range(len(shapes)))
    kinds = {(b.dims[0] is None) for b in buckets}
    assert kinds == {True, False}
    assert all(len({d is None for d in b.dims}) == 1 for b in buckets)


class _PeakMemory(TorchDispatchMode):
    """Bytes held by tensors that ops created and that are still alive: the peak of the sum.

    Each new storage is counted once, from the op that created it until it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (list, tuple)) else [out]
        for t in flat:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


@pytest.mark.parametrize("factored", [True, False])
def test_temporaries_stay_within_a_bucket(factored: bool) -> None:
    """Extra memory of a step: a few full-size temporaries of one bucket, never of the model."""
    shapes = [(256, 256)] * 16  # 1M elements, 4 MiB
    g = _make_group(shapes, factored=factored, beta1=0.9, weight_decay=0.1, clipvalue=0.5)
    skipped = torch.zeros((), dtype=torch.int64)
    peaks = {}
    for limit in (65536, 1 << 30):  # one tensor per bucket; the whole group in one bucket
        op = g.op(_grads(shapes, 0, torch.float32), skipped)
        with _PeakMemory() as mem:
            _foreach.group_step(op, g.plan, bucket_numel=limit)
        peaks[limit] = mem.peak
    tensor_bytes = 256 * 256 * 4
    model_bytes = 16 * tensor_bytes
    # a few temporaries of one tensor: the saturating momentum update (_lerp_finite_) holds about
    # 3 full-size temporaries of the tensor it is at, one tensor at a time; the unfactored
    # tensors' float32 path (_full_u: the overflow scale s, the new squares, U) 3 of the bucket
    assert peaks[65536] <= 7 * tensor_bytes, peaks
    assert peaks[1 << 30] <= 4 * model_bytes, peaks
    assert peaks[65536] * 4 < peaks[1 << 30]


def test_cuda_kernel_is_registered() -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("adafactor::step_", "CUDA")


@pytest.mark.parametrize("mode", ["lr", "lr_before", "alpha", "unscaled"])
def test_lr_zero_changes_nothing(mode: str, foreach_dispatch: None) -> None:
    """A step with lr 0 (DCP's get_state_dict takes one) leaves the weights and their EMA exactly
    as they were, in every decay form, overwrite included."""
    params = _params([(5, 31, 37), (4097,), (1, 7)], torch.float32)
    opt = Adafactor(
        params, lr=0.0, relative_step=False, weight_decay=0.1, weight_decay_mode=mode,
        use_ema=True, ema_overwrite_frequency=1, beta1=0.9,
    )  # fmt: skip
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-2
    opt.step()
    for b, p in zip(before, params):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["ema"], b)


# ---------------------------------------------------------------------------------------------
# finite gradients whose squares overflow float32: the float64 path without a host read
# ---------------------------------------------------------------------------------------------
OVERFLOW_OPTIONS = [
    {},
    {"clipnorm": 1.0},
    {"factored": False},
    {"beta1": 0.9, "momentum_kind": "grad"},
    {"preset": "torch"},  # eps1 'clamp'
    {"global_clipnorm": 1.0},
    {"clip_threshold": None, "relative_step": False, "lr": 1e-3, "scale_parameter": False},
]


def _overflow_run(impl: str, kwargs: dict, huge: float) -> tuple[list[torch.Tensor], Adafactor]:
    params = _params([(8, 6), (7,), (3, 4, 5), (1, 9), (33, 65)], torch.float32)
    opt = Adafactor(params, impl=impl, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            if step == 1:
                p.grad.view(-1)[p.numel() // 2] = huge
        opt.step()
    return params, opt


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("huge", [2e19, 1e30, 3.3e38])
@pytest.mark.parametrize("kwargs", OVERFLOW_OPTIONS, ids=str)
def test_overflowing_gradients_match_the_float64_reference(
    kwargs: dict, huge: float, foreach_dispatch: None
) -> None:
    """A gradient element whose square overflows float32: foreach stays finite and agrees with
    the reference's float64 path within 1e-5 of each tensor's scale (float32 sums of the scaled
    squares and float32 U where the reference computes in float64). Near float32's largest
    value (3.3e38) U itself exceeds float32 on that step: foreach's U is inf there (RMS(U) inf,
    so update clipping zeroes the step; without clipping U saturates) where the reference's
    float64 U is finite, so only finiteness is checked (docs/algorithm.md)."""
    ref_params, ref_opt = _overflow_run("reference", kwargs, huge)
    params, opt = _overflow_run("auto", kwargs, huge)
    for pr, pf in zip(ref_params, params):
        pairs = [("param", pf.detach(), pr.detach())]
        pairs += [(k, opt.state[pf][k], v) for k, v in ref_opt.state[pr].items()
                  if isinstance(v, torch.Tensor) and k != "step"]  # fmt: skip
        for key, got, want in pairs:
            assert bool(got.isfinite().all()), (key, tuple(pr.shape))
            if huge > 1e30:
                continue
            scale = want.abs().max().item()
            worst = (got.double() - want.double()).abs().max().item()
            assert worst <= 1e-5 * scale, (key, tuple(pr.shape), worst, scale)


@pytest.mark.parametrize("factored", [True, False])
def test_overflowing_gradients_take_the_float64_path_without_a_host_read(factored: bool) -> None:
    """Capturable mode with an overflowing gradient: finite, and nothing read on the host."""
    shapes = [(5, 31, 37), (4097,), (1, 7)]
    g = _make_group(shapes, factored=factored, beta1=0.9, clipnorm=1.0)
    skipped = torch.zeros((), dtype=torch.int64)
    lr = torch.tensor(float(g.group["lr"]), dtype=torch.float64)
    grads = _grads(shapes, 0, torch.float32)
    for t in grads:
        t.view(-1)[3] = 3e38
    op = g.op(grads, skipped, lr=lr)
    with _no_host_reads():
        _foreach.group_step(op, g.plan, capturable=True)
    assert all(bool(t.isfinite().all()) for t in _snapshot(g))


def test_overflowing_gradients_near_the_largest_float32_with_eps1_clamp(
    foreach_dispatch: None,
) -> None:
    """eps1 'clamp' (torch's preset: no update clipping, V_hat floored at eps1^2) near float32's
    largest gradient: foreach agrees with the float64 reference within 1e-3 of each tensor's
    scale. The wide tensors' 1/sqrt(V_hat) is the product of a per-row and a per-column factor;
    one factor alone can be beyond float32 where the product is not (a small row beside the
    huge one), so the product is taken in float64."""
    ref_params, ref_opt = _overflow_run("reference", {"preset": "torch"}, 3.3e38)
    params, opt = _overflow_run("auto", {"preset": "torch"}, 3.3e38)
    for pr, pf in zip(ref_params, params):
        pairs = [("param", pf.detach(), pr.detach())]
        pairs += [(k, opt.state[pf][k], v) for k, v in ref_opt.state[pr].items() if k != "step"]
        for key, got, want in pairs:
            worst = (got.double() - want.double()).abs().max().item()
            assert worst <= 1e-3 * want.abs().max().item(), (key, tuple(pr.shape), worst)


class _ComputeCalls(TorchDispatchMode):
    """Counts the ATen calls that compute (views and host reads of the CPU counters left out),
    by name: about the kernel launches of a step on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("factored", [True, False])
def test_overflow_path_is_multi_tensor(factored: bool) -> None:
    """The float64 path of overflowing gradients (chosen per tensor or per element on the
    device) costs no call per tensor: unfactored, a step is the same calls for 3 tensors as
    for 30 (multi-tensor calls only); factored, the choice between the float32 and the float64
    statistics and factors is the same few ``where`` calls."""
    calls = []
    for n in (3, 30):
        shapes = [(6, 5) if factored else (16,)] * n
        g = _make_group(shapes, factored=factored)
        op = g.op(_grads(shapes, 0, torch.float32), torch.zeros((), dtype=torch.int64))
        with _ComputeCalls() as mode:
            _foreach.group_step(op, g.plan)
        calls.append(mode.calls)
    if factored:
        assert calls[0]["where"] == calls[1]["where"], calls
    else:
        assert calls[0] == calls[1]


# ---------------------------------------------------------------------------------------------
# the weights' EMA near its dtype's largest value
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.99, 1.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ema_saturates_at_its_dtype(sign: float, m: float) -> None:
    """float32 weights at float32's largest value and a bfloat16 EMA: x rounds to inf in
    bfloat16, which made the average inf (NaN at m = 1). x and the average saturate at
    bfloat16's largest value instead; every finite average keeps its bits."""
    shapes = [(4, 3), (5,)]
    g = _make_group(
        shapes, use_ema=True, ema_momentum=m, state_dtype=torch.bfloat16, relative_step=False,
        lr=1e-3, scale_parameter=False,
    )  # fmt: skip
    big, bf = torch.finfo(torch.float32).max, torch.finfo(torch.bfloat16).max
    emas = [s["ema"] for s in g.states]
    with torch.no_grad():
        for p, e in zip(g.params, emas):
            p.fill_(sign * big)
            e.copy_(torch.linspace(-1, 1, e.numel(), dtype=torch.float64).view(e.shape) * bf)
    x = torch.tensor(sign * bf, dtype=torch.bfloat16)  # the weights, saturated
    want = [torch.where(x == e, e, (e * m + x * (1 - m)).clamp(-bf, bf)) for e in emas]
    skipped = torch.zeros((), dtype=torch.int64)
    grads = [torch.zeros(s) for s in shapes]  # U = 0: the weights stay where they are
    _foreach.group_step(g.op(grads, skipped), g.plan)
    for p, e, w in zip(g.params, emas, want):
        assert bool((p == sign * big).all())
        assert bool(e.isfinite().all()), e
        assert torch.equal(e, w)
