"""Glue for training frameworks: a step-size scheduler for loggers, and timm registration.

:func:`relative_step_schedule` replaces ``transformers.optimization.AdafactorSchedule``, which
reads private methods of transformers' own Adafactor (``_get_lr``) and writes the step size
back into ``group["lr"]``, where this optimizer reads the cap of the relative step.

:func:`register_timm` makes ``timm.optim.create_optimizer_v2(model, "adafactorx")`` build this
optimizer. ``docs/integrations.md`` has one recipe per framework (transformers' Trainer,
Lightning, accelerate, torch.distributed.checkpoint, torch's LR schedulers, timm).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._plan import plan_of, step_scalars
from ._validation import resolve_lr
from .optimizer import Adafactor

__all__ = ["RelativeStepSchedule", "register_timm", "relative_step_schedule"]


def _adafactor_of(optimizer: Optimizer) -> Any:
    """The Adafactor inside framework wrappers (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer keep it under ``.optimizer``)."""
    seen = optimizer
    while not hasattr(seen, "last_step_stats"):
        inner = getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            raise TypeError(
                "relative_step_schedule needs an adafactor.Adafactor, got "
                f"{type(optimizer).__name__}"
            )
        seen = inner
    return seen


class RelativeStepSchedule(LRScheduler):
    r"""A scheduler that *reports* Adafactor's step size and changes nothing.

    As with every torch scheduler, :meth:`get_last_lr` holds one float per param group: the
    learning rate the group's next step will use, here its step size :math:`\rho_t =
    \min(\text{lr}_t, 1/\sqrt t\,[, 10^{-6}t])` with ``relative_step`` (the warm-up cap with
    ``warmup_init``) and :math:`\text{lr}_t` without it, where ``t`` is the group's next step
    (one more than its first parameter's step count) and ``lr_t`` the group's lr (a callable lr
    evaluated at that step). Call :meth:`step` after each ``opt.step()``, as for any scheduler:
    transformers' Trainer then logs, as ``learning_rate``, the step size of the step it just
    took. The per-parameter step size :math:`\alpha_t` (times RMS(x) under
    ``scale_parameter``), which ``transformers.optimization.AdafactorSchedule`` reports for the
    group's first parameter, is in ``opt.last_step_stats[i].alpha``.

    ``step()`` never writes ``group["lr"]``: there, lr is an input (the cap of the relative
    step), so feeding a step size back would change training. Its state dict holds only counters
    and the last values, so checkpoints resume as with any torch scheduler; other schedulers
    may still change ``group["lr"]``, and this one reports what they set.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._adafactor = _adafactor_of(optimizer)
        super().__init__(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_adafactor"}

    def get_lr(self) -> list[float]:  # type: ignore[override]
        opt = self._adafactor
        return [self._next_step_size(opt, group) for group in opt.param_groups]

    def step(self, epoch: int | None = None) -> None:
        """Record the step size of the optimizer's next step (call it after ``opt.step()``)."""
        if epoch is not None:
            raise TypeError("RelativeStepSchedule.step() takes no epoch: it reports, never sets")
        self._step_count += 1
        self.last_epoch += 1
        self._last_lr: list[float] = self.get_lr()  # type: ignore[assignment]

    @staticmethod
    def _next_step_size(opt: Any, group: dict[str, Any]) -> float:
        done = 0  # steps the group's first parameter has taken
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                done = int(state["step"])
                break
        lr = float(resolve_lr(group["lr"], done))  # a schedule takes the 0-based update index
        plan = plan_of(group, impl=opt.impl, carry_param_rms=opt.carry_param_rms)
        return float(step_scalars(plan, float(done + 1), lr).rho)


def relative_step_schedule(optimizer: Optimizer) -> RelativeStepSchedule:
    """A scheduler for loggers that reports each group's step size; see
    :class:`RelativeStepSchedule`.

    For transformers' ``Trainer``, in place of ``AdafactorSchedule``::

        opt = Adafactor(model.parameters())
        trainer = Trainer(model, args, optimizers=(opt, relative_step_schedule(opt)), ...)
    """
    return RelativeStepSchedule(optimizer)


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------
def register_timm(name: str = "adafactorx", big_vision_name: str = "adafactorbvx") -> list[str]:
    """Register this optimizer in timm's optimizer registry; returns the names registered.

    ``name`` builds :meth:`Adafactor.from_timm` (timm's ``Adafactor``: its keywords, defaults
    and numbers), ``big_vision_name`` builds :meth:`Adafactor.from_big_vision` (timm's
    ``AdafactorBigVision``), each with the same ``OptimInfo`` flags as timm's entry, so
    ``timm.optim.create_optimizer_v2(model, "adafactorx", lr=..., weight_decay=...)`` and the
    ``--opt`` option of timm's train.py work as with ``"adafactor"``. Pass ``name="adafactor"``
    (and ``big_vision_name="adafactorbv"``) to take over timm's own names. timm splits the name
    it is given at ``_`` (``"lookahead_adafactorx"``), so a name may not contain one. Calling it
    again is harmless. Raises ``ImportError`` when ``timm.optim`` cannot be imported.
    """
    names = [name, big_vision_name]
    for n in names:
        if not isinstance(n, str) or not n or "_" in n or n != n.lower():
            raise ValueError(
                f"register_timm: {n!r} cannot be a timm optimizer name: timm lowercases names "
                "and splits them at '_'; use lowercase letters and digits"
            )
    from timm.optim import OptimInfo, get_optimizer_info
    from timm.optim._optim_factory import default_registry

    infos = [
        OptimInfo(
            name=name,
            opt_class=Adafactor.from_timm,
            description="adafactor.Adafactor with timm's Adafactor keywords and defaults",
            has_betas=True,
        ),
        OptimInfo(
            name=big_vision_name,
            opt_class=Adafactor.from_big_vision,
            description="adafactor.Adafactor with timm's AdafactorBigVision keywords and defaults",
            has_momentum=True,
        ),
    ]
    for info in infos:
        try:
            if get_optimizer_info(info.name) == info:
                continue  # registered by an earlier call: timm would log an overwrite
        except ValueError:  # not registered yet
            pass
        default_registry.register(info)
    return names
