"""accelerate: prepare(model, optimizer, dataloader) on the CPU, save_state / load_state, and a
resumed run that ends bit for bit where an uninterrupted one ends."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from adafactor import Adafactor  # noqa: E402
from adafactor.integrations import relative_step_schedule  # noqa: E402

pytestmark = pytest.mark.integration

STEPS, SAVE_AT = 6, 3


def _setup():
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = Adafactor(model.parameters(), beta1=0.9, weight_decay=1e-2)
    schedule = relative_step_schedule(opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * STEPS, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    model, opt, loader, schedule = accelerator.prepare(model, opt, loader, schedule)
    return accelerator, model, opt, loader, schedule


def _train(accelerator, model, opt, loader, schedule, start: int, stop: int) -> None:
    for i, (x, y) in enumerate(loader):
        if i < start:
            continue
        if i >= stop:
            break
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        schedule.step()
        opt.zero_grad()


def test_prepare_train_save_load_resume(tmp_path):
    accelerator, model, opt, loader, schedule = _setup()
    assert isinstance(opt.optimizer, Adafactor)  # AcceleratedOptimizer around ours
    initial = [p.detach().clone() for p in model.parameters()]
    _train(accelerator, model, opt, loader, schedule, 0, STEPS)
    whole = [p.detach().clone() for p in model.parameters()]
    whole_state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    whole_lr = schedule.get_last_lr()
    assert all(not torch.equal(a, b) for a, b in zip(initial, whole))

    accelerator, model, opt, loader, schedule = _setup()
    _train(accelerator, model, opt, loader, schedule, 0, SAVE_AT)
    accelerator.save_state(str(tmp_path / "state"))

    accelerator, model, opt, loader, schedule = _setup()
    accelerator.load_state(str(tmp_path / "state"))
    assert float(opt.optimizer.state[next(model.parameters())]["step"]) == SAVE_AT
    assert schedule.scheduler.last_epoch == SAVE_AT
    _train(accelerator, model, opt, loader, schedule, SAVE_AT, STEPS)
    for a, b in zip(whole, model.parameters()):
        assert torch.equal(a, b)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, whole_state[key]), key
    assert schedule.get_last_lr() == whole_lr
