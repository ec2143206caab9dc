"""timm: register_timm() makes timm's optimizer factory build this optimizer, with timm's own
keywords and numbers (skipped where timm does not import: PyPI's torchvision, which timm
imports, does not load beside a CPU build of torch)."""

from __future__ import annotations

import pytest
import torch

from adafactor import Adafactor
from adafactor.integrations import register_timm

pytestmark = pytest.mark.integration


def test_register_timm_rejects_names_timm_would_split():
    for name in ("adafactor_project", "AdaFactorX", ""):
        with pytest.raises(ValueError, match="timm optimizer name"):
            register_timm(name)


def _timm():
    try:
        import timm.optim
    except Exception as e:  # ImportError, or torchvision's operator registration failing
        pytest.skip(f"timm does not import here: {type(e).__name__}: {e}")
    return timm.optim


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 20))


def _steps(model, opt, steps: int = 5) -> list[torch.Tensor]:
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 24, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return start


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        ("adafactorx", "adafactor", {"lr": None, "weight_decay": 1e-2}),
        ("adafactorx", "adafactor", {"lr": 1e-2, "weight_decay": 1e-2, "betas": (0.9, 0.999)}),
        ("adafactorbvx", "adafactorbv", {"lr": 1e-2, "weight_decay": 1e-2}),
    ],
)
def test_create_optimizer_v2_builds_ours_with_timms_numbers(ours, theirs, kwargs):
    optim = _timm()
    assert register_timm() == ["adafactorx", "adafactorbvx"]
    register_timm()  # idempotent
    assert {"adafactorx", "adafactorbvx"} <= set(optim.list_optimizers())

    model = _model()
    opt = optim.create_optimizer_v2(model, ours, **kwargs)
    assert isinstance(opt, Adafactor)
    # timm's param groups: no weight decay for biases (1-d parameters)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-2]
    start = _steps(model, opt)

    reference = _model()
    _steps(reference, optim.create_optimizer_v2(reference, theirs, **kwargs))
    for x0, p, q in zip(start, model.parameters(), reference.parameters()):
        moved = (q - x0).abs().max()
        assert moved > 0
        assert (p - q).abs().max() <= 1e-4 * moved


def test_lookahead_prefix_and_timm_names():
    optim = _timm()
    register_timm()
    model = _model()
    opt = optim.create_optimizer_v2(model, "lookahead_adafactorx", lr=1e-2)
    assert isinstance(opt, optim.Lookahead)
    assert "momentum_kind" in opt.param_groups[0]  # the groups are this optimizer's
    start = _steps(model, opt)
    assert all(not torch.equal(a, p) for a, p in zip(start, model.parameters()))
    try:  # take over timm's own names, then give them back
        register_timm("adafactor", "adafactorbv")
        assert isinstance(optim.create_optimizer_v2(_model(), "adafactor"), Adafactor)
    finally:
        registry = optim._optim_factory.default_registry
        registry.register(optim.OptimInfo("adafactor", optim.Adafactor, has_betas=True))
        registry.register(
            optim.OptimInfo("adafactorbv", optim.AdafactorBigVision, has_momentum=True)
        )
