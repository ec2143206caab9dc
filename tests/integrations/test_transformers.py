"""transformers' Trainer with this optimizer: optimizers=, optimizer_cls_and_kwargs=, the step-size
schedule in place of AdafactorSchedule, and a bit-exact resume from a Trainer checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adafactor import Adafactor  # noqa: E402
from adafactor.integrations import RelativeStepSchedule, relative_step_schedule  # noqa: E402

pytestmark = pytest.mark.integration

STEPS = 6


class _Tokens(torch.utils.data.Dataset):
    """12 fixed sequences of 8 tokens (language modelling: labels are the inputs)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _args(tmp_path, **kwargs) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,  # 3 steps per epoch
        max_steps=STEPS,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**base, **kwargs})


def _logged_lrs(trainer) -> list[float]:
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_optimizers_tuple_with_step_size_schedule(tmp_path):
    """optimizers=(Adafactor, relative_step_schedule): trains, and Trainer logs rho_t."""
    model = _model()
    before = _params(model)
    opt = Adafactor(model.parameters(), lr=1.0, relative_step=True)  # rho_t = 1/sqrt(t)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        optimizers=(opt, relative_step_schedule(opt)),
    )
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert _logged_lrs(trainer) == pytest.approx([1 / math.sqrt(t) for t in range(1, STEPS + 1)])
    assert opt.param_groups[0]["lr"] == 1.0  # the schedule reports and never writes


def test_optimizer_cls_and_kwargs(tmp_path):
    """optimizer_cls_and_kwargs=(Adafactor, {...}): Trainer's param groups (weight decay off for
    biases and norms) and its default linear schedule drive a plain-lr Adafactor."""
    model = _model()
    kwargs = {"lr": 1e-2, "relative_step": False, "scale_parameter": False}
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, weight_decay=0.1, lr_scheduler_type="linear"),
        train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(Adafactor, kwargs),
    )
    trainer.train()
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    assert isinstance(opt, Adafactor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["relative_step"] is False for g in opt.param_groups)
    assert opt.param_groups[0]["momentum_kind"] == "update"
    # linear decay from 1e-2 to 0 over STEPS steps, logged after each step
    assert _logged_lrs(trainer) == pytest.approx([1e-2 * (STEPS - t) / STEPS for t in range(STEPS)])
    assert float(opt.last_step_stats[0].lr) == pytest.approx(1e-2 / STEPS)


def test_transformers_adafactor_schedule_needs_its_own_adafactor(tmp_path):
    """transformers' AdafactorSchedule calls transformers.Adafactor._get_lr (the issue's
    AttributeError) and would write alpha_t into group["lr"]; relative_step_schedule replaces it."""
    model = _model()
    opt = Adafactor(model.parameters())
    schedule = transformers.optimization.AdafactorSchedule(opt)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_Tokens(),
        optimizers=(opt, schedule),
    )
    with pytest.raises(AttributeError, match="_get_lr"):
        trainer.train()


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    """A run saved at step 3 and resumed with resume_from_checkpoint ends where an uninterrupted
    run of the same 6 steps ends, bit for bit (parameters, optimizer state and reported lr)."""

    def run(out, resume=None, save=False):
        model = _model()
        opt = Adafactor(model.parameters(), beta1=0.9)
        schedule = relative_step_schedule(opt)
        args = _args(out, save_strategy="steps" if save else "no", save_steps=3)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, schedule)
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, opt, schedule

    whole, whole_opt, whole_schedule = run(tmp_path / "whole")
    run(tmp_path / "first", save=True)
    checkpoint = tmp_path / "first" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed, resumed_opt, resumed_schedule = run(tmp_path / "second", resume=str(checkpoint))
    _assert_bit_equal(_params(whole), _params(resumed))
    for p, q in zip(whole.parameters(), resumed.parameters()):
        for key, value in whole_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
    assert float(resumed_opt.state[next(resumed.parameters())]["step"]) == STEPS
    assert resumed_schedule.get_last_lr() == whole_schedule.get_last_lr()
    assert resumed_schedule.last_epoch == whole_schedule.last_epoch == STEPS


def test_schedule_values_without_trainer():
    """get_last_lr() after step t is rho_{t+1} per group: min(lr, 1/sqrt t), the warm-up cap
    1e-6 t, lr itself without relative step, a callable lr at the 0-based index; before any step,
    step 1's. The groups' lr stays as it was; the state dict round-trips."""
    w = torch.nn.Parameter(torch.full((4, 3), 0.5))
    b = torch.nn.Parameter(torch.zeros(3))
    v = torch.nn.Parameter(torch.ones(2))
    u = torch.nn.Parameter(torch.ones(2))
    s = torch.nn.Parameter(torch.ones(2))
    opt = Adafactor(
        [
            {"params": [w, b]},
            {"params": [v], "relative_step": False, "lr": 3e-3},
            {"params": [u], "warmup_init": True},
            {"params": [s], "relative_step": False, "lr": lambda i: 1e-3 * (i + 1)},
        ],
        lr=0.1,
        relative_step=True,
    )
    schedule = relative_step_schedule(opt)

    def expected(t):
        return [min(0.1, 1 / math.sqrt(t)), 3e-3, min(0.1, 1e-6 * t), 1e-3 * t]

    assert schedule.get_last_lr() == pytest.approx(expected(1))
    for t in range(1, 5):
        for p in (w, b, v, u, s):
            p.grad = torch.full_like(p, 0.1)
        opt.step()
        lrs = [float(st.lr) for st in opt.last_step_stats]  # lr_t: rho_t for plain-lr groups
        assert [lrs[1], lrs[3]] == pytest.approx([expected(t)[1], expected(t)[3]])
        schedule.step()
        assert schedule.get_last_lr() == pytest.approx(expected(t + 1))
    assert [g["lr"] for g in opt.param_groups[:3]] == [0.1, 3e-3, 0.1]
    restored = RelativeStepSchedule(opt)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()
    assert restored.last_epoch == 4
    assert "_adafactor" not in schedule.state_dict()
    with pytest.raises(TypeError, match="Adafactor"):
        relative_step_schedule(torch.optim.SGD([v], lr=0.1))
