"""torch.compile: ``opt.step`` traces whole (one opaque op per group) and equals eager.

backend="eager" keeps most tests fast (dynamo is where breaks and recompiles come from); the
inductor variants are marked slow.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adafactor import Adafactor


def _setup(**kwargs: Any) -> tuple[torch.nn.Module, Adafactor, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])
    opt = Adafactor(model.parameters(), **kwargs)
    data = torch.Generator().manual_seed(1)

    def backward() -> None:
        opt.zero_grad()
        model(torch.randn(8, 16, generator=data)).square().mean().backward()

    return model, opt, backward


def _counters() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["stats"])


@pytest.mark.parametrize("kwargs", [{}, {"beta1": 0.9, "weight_decay": 0.1}, {"use_ema": True}])
def test_step_has_no_graph_breaks(kwargs: dict[str, Any]) -> None:
    torch._dynamo.reset()
    _, opt, backward = _setup(**kwargs)
    backward()
    opt.step()  # creates the state eagerly
    backward()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fullgraph_step_equals_eager_and_fills_stats(backend: str) -> None:
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt, backward = _setup(lr=torch.tensor(0.01), beta1=0.9)
        step = torch.compile(opt.step, fullgraph=True, backend=backend) if compiled else opt.step
        for _ in range(4):
            backward()
            step()
        stats = opt.last_step_stats[0]
        assert stats is not None and stats.alpha.shape == (16,) and bool((stats.alpha > 0).all())
        results.append(([p.detach().clone() for p in model.parameters()], stats.alpha))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)  # the same kernel runs: bit for bit
    assert torch.equal(results[0][1], results[1][1])


def test_no_recompile_across_steps_or_tensor_lr_schedules() -> None:
    torch._dynamo.reset()
    _, opt, backward = _setup(lr=torch.tensor(0.01), relative_step=False)
    backward()
    opt.step()  # the state exists: the first compiled call need not create it
    # compiled before the scheduler wraps opt.step (dynamo skips lr_scheduler's wrapper)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # writes lr in place
    torch._dynamo.utils.counters.clear()
    lrs = []
    for _ in range(6):
        backward()
        step()
        lrs.append(float(opt.last_step_stats[0].lr))
        sched.step()
    assert len(set(lrs)) == 6  # the schedule did change the lr every step
    assert _counters()["unique_graphs"] == 1


def test_float_lr_recompiles_at_most_once_with_few_tensors() -> None:
    """Documented: dynamo may specialise a float lr; with few tensors it turns it dynamic after
    one recompile (docs/performance.md recommends a tensor lr under torch.compile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = Adafactor(model.parameters(), lr=0.01, relative_step=False)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    torch._dynamo.utils.counters.clear()
    for i in range(5):
        opt.param_groups[0]["lr"] = 0.01 * 0.9**i
        model(torch.randn(4, 8)).sum().backward()
        step()
    assert _counters()["unique_graphs"] <= 2


@pytest.mark.slow
def test_compiled_training_step_inductor() -> None:
    """torch.compile of a whole training step (forward, backward, opt.step) equals eager."""
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt, _ = _setup(beta1=0.9)
        data = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))

        def train_step(model=model, opt=opt, data=data) -> torch.Tensor:
            opt.zero_grad()
            loss = model(data).square().mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(3):
            fn()
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
