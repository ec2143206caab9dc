"""The numerical guarantees of docs/algorithm.md, "Numerics and failure modes"."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch

from adafactor import Adafactor

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
