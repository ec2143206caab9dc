"""Hardware checks of the CUDA path (``pytest -m gpu``; skipped without a CUDA device).

Run by ``scripts/gpu_check.sh``. What they establish on a GPU, which the CPU tests can only
approximate (the foreach implementation on CPU tensors, the Triton kernels under the
interpreter):

* parity: ``impl="auto"`` (the foreach implementation, the CUDA default) and ``impl="triton"``
  against the reference on the same device, every sample of the configuration table, with
  ``test_impl_parity``'s tolerances;
* no host synchronisation in a step (``torch.cuda.set_sync_debug_mode("error")``);
* CUDA-graph capture of a capturable step (device step counters and lr) and replay, bitwise
  equal to eager steps;
* bitwise run-to-run determinism;
* the device guard: parameters on ``cuda:1`` while ``cuda:0`` is current (two GPUs);
* the Triton launch count of a GPT-2-small step, and the foreach path's extra memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from adafactor import Adafactor, _foreach
from adafactor.cli.bench import SHAPE_SETS
from adafactor.functional import _dims_of, group_plan
from adafactor.kernels import HAS_TRITON
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput
from tests.test_impl_parity import _assert_matches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# block boundaries of both implementations, and a few realistic sizes
SHAPES = [(1,), (4097,), (1, 4097), (4097, 1), (5, 31, 37), (768, 2304), (3072,), (8, 4, 3, 3)]
# the Triton table check compiles each option set's kernels for each bucket kind (about 0.5 s
# each): two kinds (the default tile and 1-D chunks) over the table, every kind below
TRITON_SHAPES = [(1,), (4097,), (5, 31, 37), (768, 2304)]
TILE_KINDS = [(4097, 1), (1, 4097), (40, 3), (3, 40), (5, 31, 37), (6, 3, 9, 2), (4097,)]
STEPS = 5
CUDA = torch.device("cuda")


def _run(
    kwargs: dict[str, Any],
    impl: str,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device = CUDA,
    steps: int = STEPS,
) -> tuple[list[torch.Tensor], Adafactor]:
    init = torch.Generator().manual_seed(0)
    params = [
        (torch.randn(s, generator=init) * 0.1).to(dtype).to(device).requires_grad_(True)
        for s in shapes
    ]
    gen = torch.Generator(device=device).manual_seed(1)
    opt = Adafactor(params, impl=impl, generator=gen, **kwargs)
    grads = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * 1e-2).to(dtype).to(device)
        opt.step()
    return params, opt


def _compare(ref: Any, got: Any, desc: str) -> None:
    (ref_params, ref_opt), (params, opt) = ref, got
    for pr, pf in zip(ref_params, params):
        where = f"{desc} {tuple(pr.shape)}"
        sr, sf = ref_opt.state[pr], opt.state[pf]
        bf16_state = sr.get("exp_avg", pr).dtype == torch.bfloat16
        _assert_matches(pf.detach().cpu(), pr.detach().cpu(), f"{where} param", bf16_state)
        for key in sr:
            _assert_matches(sf[key].cpu(), sr[key].cpu(), f"{where} state[{key!r}]", bf16_state)
    gr, gf = ref_opt.last_step_stats[0], opt.last_step_stats[0]
    assert gr is not None and gf is not None
    torch.testing.assert_close(gf.alpha.cpu(), gr.alpha.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(gf.update_rms.cpu(), gr.update_rms.cpu(), rtol=1e-5, atol=0)


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
def test_foreach_matches_reference_on_gpu(
    sample: AdafactorInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    dtype = torch.bfloat16 if sample.bf16 else torch.float32
    ref = _run(sample.kwargs, "reference", SHAPES, dtype)
    calls = _counting(monkeypatch, _foreach, "group_step")
    got = _run(sample.kwargs, "auto", SHAPES, dtype)
    assert len(calls) == STEPS  # the CUDA kernel of the op ran the foreach implementation
    _compare(ref, got, sample.desc)


@needs_triton
@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
def test_triton_matches_reference_on_gpu(
    sample: AdafactorInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adafactor.kernels import triton_module

    dtype = torch.bfloat16 if sample.bf16 else torch.float32
    ref = _run(sample.kwargs, "reference", TRITON_SHAPES, dtype)
    calls = _counting(monkeypatch, triton_module(), "run_part")
    got = _run(sample.kwargs, "triton", TRITON_SHAPES, dtype)
    assert len(calls) == STEPS
    _compare(ref, got, sample.desc)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"factor_dims": "largest2", "beta1": 0.9, "momentum_kind": "grad"},
        {"eps1_mode": "clamp", "eps1": None, "clipnorm": 0.05, "weight_decay": 0.1},
        {"stochastic_rounding": True, "use_ema": True, "ema_overwrite_frequency": 2},
    ],
)
def test_triton_tile_kinds_match_reference_on_gpu(kwargs: dict, dtype: torch.dtype) -> None:
    """Every tile shape (single column and row, tall, wide, default, a strided column dim)."""
    ref = _run(kwargs, "reference", TILE_KINDS, dtype)
    _compare(ref, _run(kwargs, "triton", TILE_KINDS, dtype), str(kwargs))


# ---------------------------------------------------------------------------------------------
# no sync, determinism, memory, launches
# ---------------------------------------------------------------------------------------------
SYNC_OPTIONS = [
    {},
    {"beta1": 0.9, "momentum_kind": "grad", "clipnorm": 0.05, "weight_decay": 0.1},
    {"beta1": 0.9, "momentum_dtype": torch.bfloat16, "eps1_mode": "clamp", "eps1": None},
    {"use_ema": True, "ema_overwrite_frequency": 2, "global_clipnorm": 0.1, "maximize": True},
]


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kwargs", SYNC_OPTIONS)
def test_step_does_not_synchronize(impl: str, kwargs: dict[str, Any]) -> None:
    params = [torch.randn(s, device=CUDA, requires_grad=True) for s in SHAPES]
    opt = Adafactor(params, impl=impl, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()  # first step: state, tables and kernels built (allocations may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.isfinite().all() for p in params)


def _snapshot(params: list[torch.Tensor], opt: Adafactor) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    last = opt.last_step_stats[0]
    assert last is not None
    return [*out, last.alpha.clone(), last.update_rms.clone()]


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_bitwise_deterministic(impl: str) -> None:
    kwargs = {"beta1": 0.9, "clipnorm": 0.05, "weight_decay": 0.1}
    shapes = [(50257 // 8, 768), (768, 3072), (3072, 768), (768,), (4097, 1)]
    runs = [_snapshot(*_run(kwargs, impl, shapes, torch.float32)) for _ in range(3)]
    for i, (a, b, c) in enumerate(zip(*runs)):
        assert torch.equal(a, b) and torch.equal(a, c), f"tensor {i} differs between runs"


@needs_triton
def test_gpt2_step_is_eleven_triton_launches() -> None:
    from adafactor.kernels import adafactor_triton as k

    counts: dict[str, int] = {}
    mp = pytest.MonkeyPatch()
    for kernel in k.KERNELS:
        real = kernel.run

        def run(*a: Any, _real: Any = real, _name: str = kernel.__name__, **kw: Any) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **kw)

        mp.setattr(kernel, "run", run)
    try:
        params = [
            torch.randn(s, device=CUDA, requires_grad=True) for s in SHAPE_SETS["gpt2-small"]()
        ]
        opt = Adafactor(params, impl="triton")
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    finally:
        mp.undo()
    assert sum(counts.values()) == 11, counts


def test_foreach_extra_memory_is_one_bucket() -> None:
    """Peak extra memory of a foreach step: a few temporaries of one bucket, not of the model."""
    shapes = [(1024, 1024)] * 32  # 32M elements, 128 MiB
    params = [torch.randn(s, device=CUDA, requires_grad=True) for s in shapes]
    opt = Adafactor(params, beta1=0.9, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()  # state allocated
    peaks = {}
    for limit in (1 << 20, 1 << 30):
        old = _foreach.BUCKET_NUMEL
        _foreach.BUCKET_NUMEL = limit
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            peaks[limit] = torch.cuda.max_memory_allocated() - base
        finally:
            _foreach.BUCKET_NUMEL = old
    tensor = 1024 * 1024 * 4
    assert peaks[1 << 20] <= 4 * tensor, peaks  # one tensor per bucket
    assert peaks[1 << 30] <= 4 * 32 * tensor, peaks


# ---------------------------------------------------------------------------------------------
# CUDA graphs (capturable mode: step counters and lr on the device)
# ---------------------------------------------------------------------------------------------
def _capturable_group(
    kwargs: dict[str, Any], shapes: list[tuple[int, ...]]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any], Any]:
    torch.manual_seed(0)
    params = [torch.randn(s, device=CUDA, requires_grad=True) for s in shapes]
    opt = Adafactor(params, **kwargs)
    group = opt.param_groups[0]
    states = [opt._state_of(p, group) for p in params]
    for st in states:  # capturable: the counters live on the device
        st["step"] = st["step"].to(CUDA)
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    dims = [_dims_of(p, group) for p in params]
    plan = group_plan(group, "auto", True)
    args = [
        params, grads, [s["step"] for s in states],
        [s["row_var"] for s in states if "row_var" in s],
        [s["col_var"] for s in states if "col_var" in s],
        [s["variance"] for s in states if "variance" in s],
        [s["exp_avg"] for s in states] if plan.momentum else [],
        [s["ema"] for s in states] if plan.use_ema else [],
        [], [i for d in dims for i in (d if d is not None else (-1, -1))],
        torch.tensor(1e-2, dtype=torch.float64, device=CUDA), None,
        torch.zeros((), dtype=torch.bool, device=CUDA),
        torch.zeros((), dtype=torch.int64, device=CUDA),
    ]  # fmt: skip
    tensors = params + [t for s in states for t in s.values() if isinstance(t, torch.Tensor)]
    return tensors, grads, args, plan


def _step_fns() -> list[tuple[str, Callable[..., Any]]]:
    from adafactor.ops import OpArgs

    def foreach(*args: Any, **kwargs: Any) -> Any:  # the op's arguments but kahan_comps
        return _foreach.group_step(OpArgs(*args[:9], [], *args[9:14]), *args[14:], **kwargs)

    fns: list[tuple[str, Callable[..., Any]]] = [("foreach", foreach)]
    if HAS_TRITON:
        from adafactor.kernels import triton_module

        tk = triton_module()

        def triton(*args: Any, **kwargs: Any) -> Any:  # the same arguments as foreach above
            return tk.group_step(OpArgs(*args[:9], [], *args[9:14]), *args[14:], **kwargs)

        fns.append(("triton", triton))
    return fns


@pytest.mark.parametrize("name", [n for n, _ in _step_fns()])
def test_cuda_graph_capture_and_replay(name: str) -> None:
    """Capture one capturable step and replay it: the same bits as eager steps (the counters
    advance on the device, so each replay is the next step)."""
    fn = dict(_step_fns())[name]
    kwargs = {"beta1": 0.9, "use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.1}
    shapes = [(768, 2304), (4097,), (5, 31, 37)]
    eager, _, args_e, plan = _capturable_group(kwargs, shapes)
    for _ in range(5):
        fn(*args_e, plan, capturable=True)
    graphed, _, args_g, plan = _capturable_group(kwargs, shapes)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: tables, kernels and the allocator's pools
        fn(*args_g, plan, capturable=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args_g, plan, capturable=True)
    for _ in range(4):  # capturing runs nothing: the warm-up and 4 replays are 5 steps
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n, _ in _step_fns()])
def test_masked_skip_on_gpu(name: str) -> None:
    fn = dict(_step_fns())[name]
    tensors, grads, args, plan = _capturable_group({"beta1": 0.9, "use_ema": True}, [(64, 300)])
    fn(*args, plan, capturable=True)
    before = [t.clone() for t in tensors]
    grads[0][3, 4] = math.nan
    args[12] = torch.ones((), dtype=torch.bool, device=CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(*args, plan, capturable=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    assert int(args[13]) == 1


# ---------------------------------------------------------------------------------------------
# the device guard
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_triton)])
def test_second_gpu_while_first_is_current(impl: str) -> None:
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        ref = _run({"beta1": 0.9}, "reference", SHAPES, torch.float32, device=dev)
        got = _run({"beta1": 0.9}, impl, SHAPES, torch.float32, device=dev)
    _compare(ref, got, f"cuda:1 {impl}")
