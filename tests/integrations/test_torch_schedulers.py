"""torch.optim.lr_scheduler with this optimizer: cycle_momentum is refused at construction with
torch's own ValueError (the groups hold no "momentum" or "betas"), the rest train."""

from __future__ import annotations

import math

import pytest
import torch

lr_scheduler = pytest.importorskip("torch.optim.lr_scheduler")

from adafactor import Adafactor  # noqa: E402

pytestmark = pytest.mark.integration

STEPS = 6


def _setup(lr=1e-2, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = Adafactor(model.parameters(), lr=lr, relative_step=False, scale_parameter=False, **kwargs)
    return model, opt


def _train(model, opt, schedule, steps=STEPS, plateau=False) -> list[float]:
    """Train ``steps`` steps, stepping ``schedule`` after each; the lr_t each step used."""
    before = [p.detach().clone() for p in model.parameters()]
    used = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 6, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        opt.step()
        opt.zero_grad()
        used.append(float(opt.last_step_stats[0].lr))
        schedule.step(1.0) if plateau else schedule.step()  # a flat loss for the plateau
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return used


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS),
        lambda opt: lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_cycle_momentum_is_refused_at_construction(make):
    """Default cycle_momentum=True: torch's ValueError when the scheduler is built, not a
    KeyError (or a string momentum overwritten by a float) at the first step."""
    for beta1 in (None, 0.9):
        _, opt = _setup(beta1=beta1)
        with pytest.raises(ValueError, match="momentum"):
            make(opt)
        assert "momentum" not in opt.param_groups[0]
        assert opt.param_groups[0]["momentum_kind"] == "update"


def test_one_cycle_without_cycle_momentum():
    model, opt = _setup()
    schedule = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS, cycle_momentum=False)
    used = _train(model, opt, schedule)
    assert used[0] == pytest.approx(1e-2 / 25)  # OneCycleLR's div_factor
    assert max(used) > used[0] and used[-1] < max(used)


def test_cyclic_without_cycle_momentum():
    model, opt = _setup(beta1=0.9)
    schedule = lr_scheduler.CyclicLR(
        opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2, cycle_momentum=False
    )
    used = _train(model, opt, schedule)
    assert used == pytest.approx([1e-3, 5.5e-3, 1e-2, 5.5e-3, 1e-3, 5.5e-3])


def test_reduce_lr_on_plateau_float_lr():
    model, opt = _setup()
    schedule = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    used = _train(model, opt, schedule, plateau=True)
    assert used == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])
    assert isinstance(opt.param_groups[0]["lr"], float)


@pytest.mark.parametrize("name", ["LambdaLR", "CosineAnnealingLR"])
def test_tensor_lr(name):
    """A tensor lr (the torch.compile-friendly form) is updated in place by the scheduler."""
    lr = torch.tensor(1e-2)
    model, opt = _setup(lr=lr)
    if name == "LambdaLR":
        schedule = lr_scheduler.LambdaLR(opt, lambda i: 0.5**i)
        expected = [1e-2 * 0.5**i for i in range(STEPS)]
    else:
        schedule = lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
        expected = [1e-2 * (1 + math.cos(math.pi * i / STEPS)) / 2 for i in range(STEPS)]
    used = _train(model, opt, schedule)
    assert used == pytest.approx(expected, rel=1e-6)
    assert opt.param_groups[0]["lr"] is lr  # the same tensor, filled in place
    assert float(lr) == pytest.approx(schedule.get_last_lr()[0])
