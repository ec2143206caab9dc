"""Lightning: configure_optimizers returning this optimizer with an LR scheduler, the
LearningRateMonitor (momentum included), ModelCheckpoint and a bit-exact resume."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from adafactor import Adafactor  # noqa: E402
from adafactor.integrations import relative_step_schedule  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # Lightning's own chatter on a tiny CPU run (few workers, small logging interval)
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]

BATCHES = 3  # per epoch


class _Module(pl.LightningModule):
    def __init__(self, schedule: str = "lambda", beta1: float | None = 0.9) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.schedule = schedule
        self.beta1 = beta1

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.schedule == "relative":  # the paper's relative step, reported for the monitor
            opt = Adafactor(self.parameters(), lr=1.0, relative_step=True, beta1=self.beta1)
            schedule = relative_step_schedule(opt)
        else:
            opt = Adafactor(
                self.parameters(), lr=1e-2, relative_step=False, scale_parameter=False,
                beta1=self.beta1,
            )  # fmt: skip
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4 * BATCHES, 8, generator=g)
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def _trainer(tmp_path, max_steps: int, **kwargs) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    return pl.Trainer(**{**base, **kwargs})


@pytest.mark.parametrize("schedule", ["lambda", "relative"])
def test_learning_rate_monitor_logs_numbers(tmp_path, schedule):
    """LearningRateMonitor(log_momentum=True) with a CSVLogger: every logged value is a number
    (before the momentum_kind rename the group's "momentum" held a string and this crashed)."""
    module = _Module(schedule)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step", log_momentum=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You have set log_momentum=True", RuntimeWarning)
        warnings.filterwarnings("ignore", "You have set log_momentum=True", UserWarning)
        _trainer(tmp_path, 2 * BATCHES, logger=logger, callbacks=[monitor]).fit(module)
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    lr_key = "lr-Adafactor"
    lrs = [float(r[lr_key]) for r in rows if r.get(lr_key)]
    momenta = [r[f"{lr_key}-momentum"] for r in rows if r.get(f"{lr_key}-momentum")]
    assert len(lrs) == len(momenta) == 2 * BATCHES
    assert all(isinstance(float(m), float) for m in momenta)
    if schedule == "lambda":
        assert lrs == pytest.approx([1e-2 / (1 + i) for i in range(2 * BATCHES)])
    else:  # the monitor reads group["lr"] (here the cap), not the scheduler's get_last_lr()
        assert lrs == [1.0] * (2 * BATCHES)
        steps = 2 * BATCHES
        assert module.lr_schedulers().get_last_lr() == [pytest.approx(1 / math.sqrt(steps + 1))]


@pytest.mark.parametrize("schedule", ["lambda", "relative"])
def test_checkpoint_resume_is_bit_exact(tmp_path, schedule):
    """ModelCheckpoint at the end of epoch 1, then Trainer(max_steps=6).fit(ckpt_path=...) ends
    where an uninterrupted 6-step run ends, bit for bit (parameters and optimizer state). At an
    epoch boundary: Lightning restarts a partly done epoch from its first batch unless the
    dataloader is resumable, which no optimizer can make exact."""
    whole = _Module(schedule)
    _trainer(tmp_path / "whole", 2 * BATCHES).fit(whole)

    first = _Module(schedule)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=BATCHES, save_top_k=-1, save_last=True
    )
    _trainer(tmp_path / "first", BATCHES, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first
    )
    path = checkpoint.last_model_path
    assert path, "no checkpoint written"
    saved = torch.load(path, weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["momentum_kind"] == "update"

    resumed = _Module(schedule)
    trainer = _trainer(tmp_path / "second", 2 * BATCHES)
    trainer.fit(resumed, ckpt_path=path)
    assert trainer.global_step == 2 * BATCHES
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    whole_opt = whole.trainer.optimizers[0]
    resumed_opt = trainer.optimizers[0]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        for key, value in whole_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == (
        whole.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    )
