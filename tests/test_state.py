"""Per-parameter state (adafactor._state): created at the first step, completed or pruned when a
group's options change later, recreated when missing, for every implementation."""

from __future__ import annotations

import pytest
import torch

from adafactor import Adafactor
from adafactor._state import expected_state

IMPLS = ["reference", "auto"]


def _stepped(impl: str, steps: int = 2, **kwargs) -> tuple[torch.nn.Parameter, Adafactor]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = Adafactor([p], impl=impl, relative_step=False, scale_parameter=False, **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(6, 5)
        opt.step()
    return p, opt


def _step(p: torch.nn.Parameter, opt: Adafactor) -> None:
    p.grad = torch.randn(6, 5)
    opt.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_momentum_turned_on_later_starts_from_zero_and_off_again_is_dropped(impl: str) -> None:
    p, opt = _stepped(impl)
    group = opt.param_groups[0]
    group["beta1"] = 0.9
    _step(p, opt)
    m = opt.state[p]["exp_avg"]
    assert m.abs().sum() > 0  # created (zeros) and updated by this step
    group["beta1"] = None
    _step(p, opt)
    assert "exp_avg" not in opt.state[p]  # the option is off: no stale buffer is kept
    group["beta1"] = 0.9
    x_before = p.detach().clone()
    _step(p, opt)
    # a fresh buffer: m = (1 - beta1) * update, so the step moved x by a tenth of the update
    assert torch.allclose(x_before - p.detach(), opt.state[p]["exp_avg"], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_ema_turned_on_later_starts_at_the_weights(impl: str) -> None:
    p, opt = _stepped(impl)
    x_before = p.detach().clone()
    opt.param_groups[0]["use_ema"] = True
    _step(p, opt)
    m = opt.param_groups[0]["ema_momentum"]
    expected = m * x_before + (1 - m) * p.detach()
    torch.testing.assert_close(opt.state[p]["ema"], expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_factoring_turned_off_later_swaps_the_statistics(impl: str) -> None:
    p, opt = _stepped(impl)
    assert {"row_var", "col_var"} <= set(opt.state[p])
    opt.param_groups[0]["factored"] = False
    _step(p, opt)
    assert "variance" in opt.state[p] and "row_var" not in opt.state[p]
    assert set(opt.state[p]) == set(expected_state(p, opt.param_groups[0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_state_cleared_by_the_user_is_recreated(impl: str) -> None:
    p, opt = _stepped(impl)
    opt.state[p].clear()
    _step(p, opt)
    assert int(opt.state[p]["step"]) == 1
    assert set(opt.state[p]) == set(expected_state(p, opt.param_groups[0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_group_added_after_steps_gets_state(impl: str) -> None:
    p, opt = _stepped(impl)
    q = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [q], "beta1": 0.5})
    q.grad = torch.randn(4)
    _step(p, opt)
    assert set(opt.state[q]) == {"step", "variance", "exp_avg"}
    assert int(opt.state[q]["step"]) == 1 and int(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_a_narrower_ema_starts_saturated(impl: str) -> None:
    """A bf16 EMA (state_dtype) of float32 weights beyond bf16's range starts at bf16's largest
    value, not inf (which every later average would keep)."""
    p = torch.nn.Parameter(torch.full((6,), 3.4e38))
    p.data[1::2] *= -1
    opt = Adafactor([p], impl=impl, use_ema=True, state_dtype=torch.bfloat16, lr=0.0)
    p.grad = torch.ones(6)
    opt.step()
    ema = opt.state[p]["ema"]
    assert ema.dtype == torch.bfloat16 and torch.isfinite(ema).all()
    assert torch.equal(ema.abs(), torch.full((6,), torch.finfo(torch.bfloat16).max).bfloat16())
