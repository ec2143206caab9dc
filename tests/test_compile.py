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


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_float_lr_recompiles_once_then_never(backend: str) -> None:
    """A float lr a scheduler rewrites each step: dynamo's automatic dynamic turns it into a
    symbolic value at its first change (one recompile), then no new value recompiles, with
    inductor and many tensors too (the validation does not compare the traced float)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(24)]
    opt = Adafactor(params, lr=0.01, relative_step=False, scale_parameter=False)
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    torch._dynamo.utils.counters.clear()
    lrs = []
    for i in range(6):
        opt.param_groups[0]["lr"] = 0.01 * 0.9**i
        for p in params:
            p.grad = torch.randn_like(p)
        step()
        lrs.append(float(opt.last_step_stats[0].lr))
    assert lrs == pytest.approx([0.01 * 0.9**i for i in range(6)])
    assert _counters()["unique_graphs"] <= 2


def test_compiled_step_checks_a_bad_float_lr() -> None:
    """Traced, a float lr is not compared in Python (that would specialise the graph), so the
    op checks it: a NaN written into the group is refused before anything changes."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    opt = Adafactor(params, lr=0.01, relative_step=False, scale_parameter=False)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for lr in (0.01, 0.02):  # the second value makes the lr symbolic
        opt.param_groups[0]["lr"] = lr
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = float("nan")
    try:
        with pytest.raises(ValueError, match=r"lr must be finite.*got tensor\(nan"):
            step()
    finally:  # torch leaves grad mode off after an exception inside a compiled no_grad region
        torch.set_grad_enabled(True)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_compiled_step_traces_a_torch_op_lr_schedule() -> None:
    """Traced, a callable lr gets the step counter as a 0-d tensor (Keras passes its iteration
    as a tensor too): a schedule written with torch ops compiles whole and never recompiles."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]

    def warmup(t: Any) -> Any:
        return 0.01 * torch.clamp((t + 1) / 4, max=1.0)

    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adafactor(params, lr=warmup, relative_step=False, scale_parameter=False)
    ref = Adafactor(
        eager_params, lr=lambda t: 0.01 * min((t + 1) / 4, 1.0), relative_step=False,
        scale_parameter=False,
    )  # fmt: skip
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for i in range(7):
        if i == 1:  # after the step that created the state (a graph of its own)
            torch._dynamo.utils.counters.clear()
        for p, q in zip(params, eager_params):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        step()
        ref.step()
        assert float(opt.last_step_stats[0].lr) == pytest.approx(float(ref.last_step_stats[0].lr))
    assert _counters()["unique_graphs"] == 1
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q)


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
