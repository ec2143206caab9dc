"""The numerical guarantees of docs/algorithm.md, "Numerics and failure modes"."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adafactor import Adafactor, ops
from adafactor._plan import GroupPlan, Impl

HUGE = [2e19, 1e30, 3.3e38]  # finite float32 values whose squares overflow float32
CONFIGS: list[dict[str, Any]] = [
    {},
    {"clipnorm": 1.0},
    {"factored": False},
    {"beta1": 0.9, "momentum_kind": "grad"},
    {"beta1": 0.9, "momentum_dtype": torch.bfloat16},
    {"global_clipnorm": 1.0},
    {"skip_nonfinite": True},
    {"weight_decay": 0.1, "weight_decay_mode": "alpha"},
    {"use_ema": True},
    {"preset": "torch"},
    {"preset": "keras"},
    {"preset": "transformers"},
    {"preset": "optax"},
    {"preset": "t5"},
]


def _train(impl: str, kwargs: dict[str, Any], huge: float, dtype: torch.dtype) -> Adafactor:
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (7,), (3, 4, 5), (1, 9)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    opt = Adafactor(params, impl=impl, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for step in range(4):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(dtype)
                if step == 1:
                    p.grad.view(-1)[p.numel() // 2] = huge  # one element of every gradient
            opt.step()
    return opt


@pytest.mark.parametrize(
    ("kwargs", "huge"), list(itertools.product(CONFIGS, HUGE)), ids=lambda v: str(v)
)
def test_finite_gradients_never_give_non_finite_weights_or_state(
    kwargs: dict[str, Any], huge: float
) -> None:
    """With update clipping (every preset but big_vision), a gradient element whose square
    overflows float32 gives finite parameters and state, and the implementations agree."""
    runs = {impl: _train(impl, kwargs, huge, torch.float32) for impl in ("reference", "fused")}
    for opt in runs.values():
        for p in opt.param_groups[0]["params"]:
            assert bool(torch.isfinite(p).all()), (kwargs, huge, tuple(p.shape))
            for key, value in opt.state[p].items():
                assert bool(torch.isfinite(value).all()), (kwargs, huge, key)
    ref, fus = (runs[k].param_groups[0]["params"] for k in ("reference", "fused"))
    for a, b in zip(ref, fus):
        scale = a.detach().abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * scale, (kwargs, huge, tuple(a.shape))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_bf16_parameters_survive_huge_gradients(impl: str) -> None:
    opt = _train(impl, {}, 3.3e38, torch.bfloat16)
    for p in opt.param_groups[0]["params"]:
        assert bool(torch.isfinite(p).all())


def test_without_the_outlier_the_float64_path_is_never_taken() -> None:
    """Ordinary gradients keep the float32 path: fused and reference stay within 1e-6."""
    runs = {impl: _train(impl, {}, 1e-2, torch.float32) for impl in ("reference", "fused")}
    ref, fus = (runs[k].param_groups[0]["params"] for k in ("reference", "fused"))
    for a, b in zip(ref, fus):
        assert (a - b).abs().max().item() <= 1e-6 * a.detach().abs().max().item()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_skip_nonfinite_with_global_clipnorm_skips_every_group(impl: str) -> None:
    """A NaN in one group's gradient skips all groups (their clip factor would use it)."""
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, 4, generator=g))]
    b = [torch.nn.Parameter(torch.randn(5, generator=g))]
    opt = Adafactor(
        [{"params": a}, {"params": b}], global_clipnorm=1.0, skip_nonfinite=True, impl=impl
    )
    for p in a + b:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    before = [p.detach().clone() for p in a + b]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in a + b}
    a[0].grad = torch.randn(6, 4, generator=g)
    b[0].grad = torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0])  # only the second group
    opt.step()
    for p, x in zip(a + b, before):
        assert torch.equal(p, x)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())
    assert [int(grp["skipped_steps"]) for grp in opt.param_groups] == [1, 1]


def test_skip_nonfinite_with_empty_parameters() -> None:
    """Found by tests/test_fuzz.py: the max-abs norm of an empty gradient has no value."""
    p, empty = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(0))
    opt = Adafactor([p, empty], skip_nonfinite=True)
    p.grad, empty.grad = torch.ones(3), torch.ones(0)
    opt.step()
    assert int(opt.param_groups[0]["skipped_steps"]) == 0 and not torch.equal(p, torch.ones(3))
    only_empty = Adafactor([torch.nn.Parameter(torch.ones(0, 2))], skip_nonfinite=True)
    only_empty.param_groups[0]["params"][0].grad = torch.ones(0, 2)
    only_empty.step()


# ---------------------------------------------------------------------------------------------
# without update clipping: saturation (docs/algorithm.md, "Numerics and failure modes")
# ---------------------------------------------------------------------------------------------
NO_CLIP_HUGE = [1e19, 3e19, 1e30, 3.38e38]  # 3.38e38: below bf16 max (3.4e38 rounds to inf)
NO_CLIP_CONFIGS: list[dict[str, Any]] = [
    {"clip_threshold": None},
    {"clip_threshold": None, "beta1": 0.9},
    {"clip_threshold": None, "beta1": 0.0},  # lerp weight 1: (m - U) overflowing gave NaN
    {"clip_threshold": None, "beta1": 0.9, "momentum_kind": "grad",
     "momentum_dtype": torch.bfloat16},
    {"clip_threshold": None, "beta1": 0.9, "momentum_kind": "normalized_update"},
    {"clip_threshold": None, "relative_step": False, "lr": 1e-3, "scale_parameter": False,
     "weight_decay": 0.1, "weight_decay_mode": "alpha"},
    {"clip_threshold": None, "factored": False, "beta1": 0.9},
    {"preset": "big_vision"},
    {"preset": "big_vision", "lr": 1e-3},
    {"clip_threshold": None, "kahan_summation": True},  # (bf16 parameters: x + comp saturates)
    {"clip_threshold": None, "stochastic_rounding": True},
]  # fmt: skip
NO_CLIP_SHAPES = [(32, 24), (24,), (2, 17, 20), (1, 40)]  # factored under big_vision too


@contextlib.contextmanager
def _impl(name: str) -> Iterator[str]:
    """``impl`` for Adafactor; "foreach": the CUDA implementation on CPU tensors (the op's CPU
    dispatch sent to the CUDA registration function, as tests/test_foreach.py does)."""
    if name != "foreach":
        yield name
        return
    real = ops._run

    def run(on_cpu: bool, op: ops.OpArgs, plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if plan.impl in (Impl.AUTO, Impl.FUSED):
            return ops._step_cuda(*op, *plan.as_args())
        return real(on_cpu, op, plan)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "_run", run)
        yield "auto"


Snapshot = list[tuple[str, torch.Tensor]]


def _train_no_clip(
    impl: str, kwargs: dict[str, Any], huge: float, dtype: torch.dtype
) -> tuple[list[Snapshot], list[str]]:
    """Five steps, the outlier in one element of every gradient at the second. Returns the
    parameters, state and RMS(U) after each step and what was not finite."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in NO_CLIP_SHAPES]
    snaps: list[Snapshot] = []
    bad: list[str] = []
    with _impl(impl) as name, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = Adafactor(params, impl=name, generator=torch.Generator().manual_seed(1), **kwargs)
        for step in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(dtype)
                if step == 1:
                    p.grad.view(-1)[p.numel() // 3] = huge
            opt.step()
            snap: Snapshot = []
            for i, p in enumerate(params):
                tensors = {"param": p.detach(), **opt.state[p]}
                for key, t in tensors.items():
                    # (kahan_comp: a residual below half an ulp of x, compared through x)
                    if isinstance(t, torch.Tensor) and key not in ("step", "kahan_comp"):
                        snap.append((f"param {i} {key}", t.clone()))
                        if not bool(torch.isfinite(t).all()):
                            bad.append(f"step {step + 1} param {i} {key}")
            stats = opt.last_step_stats[0]  # (without clipping RMS(U) moves no weight)
            snap.append(("RMS(U)", stats.update_rms.clone()))
            snaps.append(snap)
    return snaps, bad


NO_CLIP_IMPLS = ["reference", "fused", "foreach"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("kwargs", "huge"), list(itertools.product(NO_CLIP_CONFIGS, NO_CLIP_HUGE)), ids=str
)
def test_without_update_clipping_finite_gradients_give_finite_weights_and_state(
    kwargs: dict[str, Any], huge: float, dtype: torch.dtype
) -> None:
    """An outlier makes the factored estimator give U beyond float32 to the elements far from
    it; U, the momentum and the parameter saturate at the largest finite value instead of
    becoming inf or NaN, in every implementation, and the implementations agree after every
    step."""
    runs = {impl: _train_no_clip(impl, kwargs, huge, dtype) for impl in NO_CLIP_IMPLS}
    for impl, (_, bad) in runs.items():
        assert not bad, (impl, bad[:6])
    ref_snaps, _ = runs["reference"]
    for impl in NO_CLIP_IMPLS[1:]:
        if impl == "foreach" and huge > 1e30:
            # U beyond float32 on the outlier step: the reference's float64 path keeps it (only
            # x saturates), foreach computes U in float32 from float64 statistics (U saturates)
            continue
        # every step, also those whose weights have float32 squares that overflow: each
        # implementation takes the true RMS(x) there
        for step in range(len(ref_snaps)):
            for (what, want), (_, got) in zip(ref_snaps[step], runs[impl][0][step]):
                where = f"{impl} step {step + 1} {what}"
                if what == "RMS(U)":  # per tensor (inf where U saturated, in every impl)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=where)
                else:
                    _assert_close_saturated(got, want, where)


def _assert_close_saturated(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Elementwise within 1e-5 (float32) or 2^-7 (bfloat16) of max(|want|, 0.1 * the largest
    unsaturated |want|): saturated elements are equal (a relative bound of the saturated scale
    would accept anything), the others agree to rounding (1e-6 of the tensor's scale at
    least, as tests/test_impl_parity.py)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    a, e = got.double(), want.double()
    rtol = 2.0**-7 if want.dtype == torch.bfloat16 else 1e-5
    unsaturated = e.abs()[e.abs() < 1e38]
    floor = 0.1 * unsaturated.max().item() if unsaturated.numel() else 0.0
    bound = rtol * torch.maximum(e.abs(), torch.full_like(e, floor))
    worst = ((a - e).abs() - bound).max().item()
    assert worst <= 0, f"{what}: beyond the bound by {worst:.3g} (max |want| {e.abs().max():.3g})"


@pytest.mark.parametrize("impl", NO_CLIP_IMPLS)
@pytest.mark.parametrize("lr", [0.0, 1e-3])
def test_weights_whose_squares_overflow_keep_a_finite_step_size(impl: str, lr: float) -> None:
    """Weights near float32's largest value: their float32 squares, and float32 sums of them,
    overflow. Every implementation takes the true RMS(x) from float64 squares, so alpha_t is
    finite (never inf * 0 = NaN at lr = 0: the weights stay as they are), on the first step and
    on the next, where the C kernel does not carry such a sum of x^2 from pass 3 (its float32
    row sums overflow there)."""
    p = torch.nn.Parameter(torch.full((3, 4), 3.4e38))
    p.data[:, 1::2] *= -1
    q = torch.nn.Parameter(torch.full((5,), -3.0e38))
    with _impl(impl) as name, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a stale carried sum warns)
        warnings.simplefilter("ignore", UserWarning)
        opt = Adafactor([p, q], impl=name, lr=lr, use_ema=True)
        before = [p.detach().clone(), q.detach().clone()]
        for _ in range(2):
            rms = torch.stack([t.detach().double().square().mean().sqrt() for t in (p, q)])
            p.grad, q.grad = torch.ones(3, 4), torch.ones(5)
            opt.step()
            alpha = opt.last_step_stats[0].alpha
            assert torch.isfinite(alpha).all(), alpha
            torch.testing.assert_close(alpha, rms.float() * lr)
    for t in (p, q, *(opt.state[t]["ema"] for t in (p, q))):
        assert torch.isfinite(t).all()
    if lr == 0:
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])


@pytest.mark.parametrize("impl", NO_CLIP_IMPLS)
def test_an_update_whose_squares_overflow_float32_is_clipped_not_zeroed(impl: str) -> None:
    """With update clipping (the paper's defaults) an outlier makes U beside it far larger than
    2^64, so U^2 overflows float32. RMS(U) comes from float64 squares, finite, and the clipped
    update has RMS d exactly as on any other step (float32 squares gave RMS(U) = inf, and an
    update of 0 that froze the tensor while its statistics stayed huge)."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 24, generator=g))
    with _impl(impl) as name:
        opt = Adafactor([p], impl=name)
        for step in range(3):
            p.grad = torch.randn(32, 24, generator=g) * 1e-8
            if step == 1:
                p.grad[5, 7] = 1e13
            before = p.detach().double()
            opt.step()
            stats = opt.last_step_stats[0]
            rms_u, alpha = float(stats.update_rms[0]), float(stats.alpha[0])
            assert math.isfinite(rms_u) and (rms_u > 2.0**64 or step == 0), (step, rms_u)
            moved = (p.detach().double() - before).square().mean().sqrt().item()
            assert moved == pytest.approx(alpha * 1.0, rel=1e-4), (step, moved, alpha)
