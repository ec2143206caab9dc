"""The fused CPU path against the reference math, over every sample of the option table.

Tolerances (after 7 steps, on parameters and every state tensor):

* float32 tensors: ``|fused - ref| <= 1e-6 * max|ref|`` elementwise (1e-6 relative to the
  tensor's scale; an elementwise relative bound is ill-posed where ``x - update`` cancels to ~0).
* bfloat16 tensors (parameters, bf16 momentum): at most 1% of the elements differ at all, each
  by at most ``2^-7 * max|ref|``: float32 results that differ by a few ulps can round to
  neighbouring bf16 values (and a flipped momentum element stays flipped for a few steps).
* float32 tensors of a run with bf16 momentum: the momentum's rare one-ulp flips (``2^-8``
  relative) flow into the parameter through the update, so there the 1e-6 bound must hold on 99%
  of the elements and every element stays within ``2^-7 * max|ref|``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import adafactor._fused_cpu as fused
from adafactor import Adafactor, ops
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler for the fused path")

SHAPES = [
    (),
    (1,),
    (4097,),
    (1, 7),
    (5, 3),
    (5, 31, 37),
    (16, 4, 8),
    (8, 4, 3, 3),
    (0,),
    (0, 3),
]
# >= 32768 elements: the multi-threaded path (its threshold lowered to 32768 in these tests);
# run on a subset of samples to keep the time low
LARGE_SHAPES = [(64, 600), (40000,), (3, 130, 97)]
LARGE_SAMPLES = {
    "defaults",
    "unfactored",
    "momentum grad",
    "momentum update",
    "eps1 clamp",
    "largest2, min size 4",
    "weight decay alpha",
    "clipvalue",
}
STEPS = 7


def _run(
    sample: AdafactorInput, impl: str, shapes: list[tuple[int, ...]], dtype: torch.dtype
) -> tuple[list[torch.Tensor], Adafactor]:
    init = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=init) * 0.1).to(dtype).requires_grad_(True) for s in shapes]
    opt = Adafactor(params, impl=impl, generator=torch.Generator().manual_seed(1), **sample.kwargs)
    grads = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * 1e-2).to(dtype)
        opt.step()
    return params, opt


def _assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, what: str, bf16_state: bool = False
) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    if expected.dtype == torch.bfloat16:
        scale = e.abs().max().item()
        assert bool((diff <= 2.0**-7 * scale).all()), f"{what}: beyond 2^-7 of the tensor scale"
        frac = (diff > 0).double().mean().item()
        assert frac <= 0.01, f"{what}: {frac:.2%} of the elements differ"
    else:
        scale = e.abs().max().item()
        worst = diff.max().item()
        if bf16_state:
            assert worst <= 2.0**-7 * scale, f"{what}: max diff {worst:.3g} vs scale {scale:.3g}"
            frac = (diff > 1e-6 * scale).double().mean().item()
            assert frac <= 0.01, f"{what}: {frac:.2%} of the elements beyond 1e-6"
        else:
            assert worst <= 1e-6 * scale, f"{what}: max diff {worst:.3g} vs scale {scale:.3g}"


def _compare(sample: AdafactorInput, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
    ref_params, ref_opt = _run(sample, "reference", shapes, dtype)
    fus_params, fus_opt = _run(sample, "fused", shapes, dtype)
    for pr, pf in zip(ref_params, fus_params):
        where = f"{sample.desc} {tuple(pr.shape)}"
        sr, sf = ref_opt.state[pr], fus_opt.state[pf]
        bf16_state = sr.get("exp_avg", pr).dtype == torch.bfloat16
        _assert_matches(pf.detach(), pr.detach(), f"{where} param", bf16_state)
        assert sorted(sr) == sorted(sf), where
        for key in sr:
            _assert_matches(sf[key], sr[key], f"{where} state[{key!r}]", bf16_state)
    for gr, gf in zip(ref_opt.last_step_stats, fus_opt.last_step_stats):
        assert gr is not None and gf is not None
        torch.testing.assert_close(gf.alpha, gr.alpha, rtol=1e-6, atol=0)
        torch.testing.assert_close(gf.update_rms, gr.update_rms, rtol=1e-5, atol=0)


def _without_carry(sample: AdafactorInput) -> AdafactorInput:
    # pass 1 then sums x^2 every step, in its loop over g (the kernel's X_FUSED)
    kwargs = {**sample.kwargs, "carry_param_rms": False}
    return AdafactorInput(f"{sample.desc}, no carry", kwargs, sample.bf16)


@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
def test_fused_matches_reference(sample: AdafactorInput) -> None:
    _compare(sample, SHAPES, torch.bfloat16 if sample.bf16 else torch.float32)


@pytest.mark.parametrize("carry", [True, False], ids=["carry", "no-carry"])
@pytest.mark.parametrize(
    "sample", [s for s in OPTIM_INPUTS if s.desc in LARGE_SAMPLES], ids=lambda s: s.desc
)
def test_fused_matches_reference_multithreaded(
    sample: AdafactorInput, carry: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors on the multi-threaded path, and small ones beside them; without the carried
    sum of x^2, pass 1 sums it in its loop over g (the kernel's X_FUSED)."""
    monkeypatch.setattr(fused, "parallel_min_numel", 32768)
    _compare(sample if carry else _without_carry(sample), SHAPES + LARGE_SHAPES, torch.float32)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta1": 0.9, "momentum_dtype": torch.bfloat16}, {"stochastic_rounding": True}],
    ids=["defaults", "bf16-momentum", "stochastic-rounding"],
)
def test_fused_matches_reference_bf16(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "parallel_min_numel", 32768)
    _compare(AdafactorInput(f"bf16 {kwargs}", kwargs), SHAPES + LARGE_SHAPES, torch.bfloat16)


@pytest.fixture
def portable_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernel built without AVX-512 (its portable bodies, which run on CPUs without it:
    this machine and CI have it, so nothing else tests them); restored after the test."""
    monkeypatch.setattr(fused, "_FLAGS", [*fused._FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_lib_error", None)
    monkeypatch.setattr(fused, "parallel_min_numel", 32768)


@pytest.mark.parametrize("carry", [True, False], ids=["carry", "no-carry"])
@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=lambda s: s.desc)
@pytest.mark.usefixtures("portable_kernel")
def test_portable_kernel_matches_reference(sample: AdafactorInput, carry: bool) -> None:
    dtype = torch.bfloat16 if sample.bf16 else torch.float32
    shapes = SHAPES + LARGE_SHAPES if sample.desc in LARGE_SAMPLES else SHAPES
    _compare(sample if carry else _without_carry(sample), shapes, dtype)
    assert fused._lib is not None and "-mno-avx512f" in fused._FLAGS  # (this kernel ran)


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [(torch.bfloat16, {}), (torch.float32, {"beta1": 0.9, "momentum_dtype": torch.bfloat16})],
    ids=["bf16-params", "bf16-momentum"],
)
def test_subnormal_bf16_stores_match_the_reference(dtype: torch.dtype, kwargs: dict) -> None:
    """bf16 stores keep float32 subnormals, as torch does (a plain vcvtneps2bf16 flushes them)."""
    results = []
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        p = torch.nn.Parameter((torch.randn(64, 600) * 1e-39).to(dtype))
        opt = Adafactor(
            [p], lr=3e-39, relative_step=False, scale_parameter=False, impl=impl, **kwargs
        )
        for _ in range(3):
            p.grad = torch.randn(64, 600).to(dtype)
            opt.step()
        stored = opt.state[p]["exp_avg"] if kwargs else p
        results.append(stored.detach().clone())
    assert (results[1] != 0).float().mean() > 0.75  # subnormal values, not flushed to zero
    assert results[1].abs().float().median() < torch.finfo(torch.float32).tiny
    assert torch.equal(results[0], results[1])


def _carry_run(shape: tuple[int, ...], carry: bool, steps: int, dtype: torch.dtype) -> Adafactor:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = Adafactor([p], impl="fused", beta1=0.9, carry_param_rms=carry)
    with warnings.catch_warnings():
        # a carried sum that differs from pass 3's re-sum of the same x (another order of adds)
        # would be reported as stale: fail on it
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(steps):
            p.grad = torch.randn(shape).to(dtype)
            opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 600), (5, 31, 37), (4097,), (3, 5)])
def test_carried_param_sq_is_bit_identical(
    shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking RMS(x) from the sum of x^2 that the previous pass 3 computed gives the same bits as
    re-reading x in pass 1 (both threaded and single-threaded)."""
    monkeypatch.setattr(fused, "parallel_min_numel", 32768)
    carried, fresh = (_carry_run(shape, carry, 5, dtype) for carry in (True, False))
    p_carried, p_fresh = (opt.param_groups[0]["params"][0] for opt in (carried, fresh))
    assert torch.equal(p_carried, p_fresh)
    assert carried.last_step_stats[0].alpha.item() == fresh.last_step_stats[0].alpha.item()
    tables = _tables_of(p_carried)
    assert bool(tables.carry_ok[0]) and int(tables.carry_version[0]) == p_carried._version
    expected = p_carried.detach().double().square().sum().item()
    cached = float(tables.doubles[0, fused._TD_CARRIED])
    assert abs(cached - expected) <= 1e-6 * expected
    assert not bool(_tables_of(p_fresh).carry_ok.any())


def _tables_of(p: torch.Tensor) -> fused.GroupTables:
    tables = ops._FUSED_GROUPS[(id(p),)].tables
    assert tables is not None
    return tables


def test_carried_param_sq_is_dropped_after_a_version_bump() -> None:
    opt = _carry_run((64, 600), True, 2, torch.float32)
    p = opt.param_groups[0]["params"][0]
    with torch.no_grad():
        p.mul_(3.0)  # bumps p._version: the carried sum is stale
    x_before = p.detach().double().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    # alpha of step 3 = RMS(x) * min(lr, 1/sqrt(3)) of the tripled weights, not the carried sum
    expected_alpha = x_before.square().mean().sqrt().item() * 1e-2
    assert abs(opt.last_step_stats[0].alpha.item() - expected_alpha) <= 1e-6 * expected_alpha


def test_change_behind_the_version_counter_is_reported_and_stops_the_carry() -> None:
    opt = _carry_run((64, 600), True, 2, torch.float32)
    p = opt.param_groups[0]["params"][0]
    p.data.mul_(3.0)  # .data: no version bump, so the carried sum looks valid
    p.grad = torch.randn_like(p)
    stale = r"1 parameter\(s\) of shape \(64, 600\) were changed outside .* p\.data"
    with pytest.warns(RuntimeWarning, match=stale):
        opt.step()
    assert getattr(p, fused._CARRY_ATTR) is False
    assert bool(_tables_of(p).carry_off[0])
    p.data.mul_(0.5)  # from now on x is re-read: this change is seen at once, without a warning
    x_before = p.detach().double().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    expected_alpha = x_before.square().mean().sqrt().item() * 1e-2
    assert abs(opt.last_step_stats[0].alpha.item() - expected_alpha) <= 1e-6 * expected_alpha


def test_compiled_steps_keep_the_carry() -> None:
    """A compiled step's wrapper bumps the mutated parameters' version counters once more than
    the op does; the tables learn that from a sum proved unchanged and keep using the carry, with
    the same bits as eager steps."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 600))
        opt = Adafactor([p], impl="fused")
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(5):
            p.grad = torch.randn(64, 600)
            step()
        tables = _tables_of(p)
        assert int(tables.carry_bumps[0]) == (2 if compiled else 1)
        assert int(tables.ints[0, fused._TI_FLAGS]) & fused._F_USE_CARRIED  # used at step 5
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_a_learned_bump_count_still_catches_changes() -> None:
    """Learned from an in-place op that changed nothing, two bumps a step pass; a change with
    the same count is then caught at the next step (as any change behind the counter)."""
    opt = _carry_run((64, 600), True, 2, torch.float32)
    p = opt.param_groups[0]["params"][0]
    for _ in range(2):
        with torch.no_grad():
            p.add_(0.0)  # bumps the counter, changes no bit
        p.grad = torch.randn_like(p)
        opt.step()
    assert int(_tables_of(p).carry_bumps[0]) == 2
    with torch.no_grad():
        p.mul_(3.0)  # one bump, as learned: looks valid
    p.grad = torch.randn_like(p)
    with pytest.warns(RuntimeWarning, match=r"were changed outside"):
        opt.step()
    assert bool(_tables_of(p).carry_off[0])


def test_unsupported_tensors_fall_back_to_reference() -> None:
    """float64 and non-contiguous parameters take the reference path under impl='fused'."""
    for make in (
        lambda: torch.randn(6, 5, dtype=torch.float64),
        lambda: torch.randn(5, 6).t(),
    ):
        results = []
        for impl in ("reference", "fused"):
            torch.manual_seed(0)
            p = make().requires_grad_(True)
            opt = Adafactor([p], impl=impl)
            for _ in range(3):
                p.grad = torch.ones_like(p) * 1e-2
                opt.step()
            results.append(p.detach().clone())
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_no_compiler_errors_clearly_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_lib_error", None)
    monkeypatch.setenv("ADAFACTOR_CACHE_DIR", str(tmp_path))  # nothing cached
    monkeypatch.setenv("PATH", str(tmp_path))  # and no compiler
    monkeypatch.delenv("CC", raising=False)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    with pytest.raises(fused.FusedUnavailableError, match=r"no C compiler found.*impl='reference'"):
        Adafactor([p], impl="fused").step()
    monkeypatch.setattr(fused, "_lib_error", None)  # a fresh process: the first failure warns
    with pytest.warns(RuntimeWarning, match="falling back to the reference path"):
        Adafactor([p], impl="auto").step()  # the reference path, no error
    assert not fused.available()
