"""torch.compile of a whole training step that includes ``opt.step()``.

Under tracing the dispatcher takes the reference path (``torch.compiler.is_compiling()``), so the
compiled step must equal the eager one (which runs the fused kernel) to the fused/reference
tolerance. The dynamo front end is what can break; backend="eager" keeps the test fast, the
inductor variant is marked slow.
"""

from __future__ import annotations

import pytest
import torch

from adafactor import Adafactor


def _train(compiled: bool, backend: str, impl: str, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = Adafactor(model.parameters(), beta1=0.9, impl=impl)
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step, backend=backend) if compiled else step
    for _ in range(steps):
        fn()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_compiled_training_step_matches_eager(impl: str) -> None:
    torch._dynamo.reset()
    eager = _train(False, "eager", impl)
    compiled = _train(True, "eager", impl)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


@pytest.mark.slow
def test_compiled_training_step_inductor() -> None:
    torch._dynamo.reset()
    eager = _train(False, "inductor", "auto")
    compiled = _train(True, "inductor", "auto")
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
