"""One definition of every mode and option the kernels see, and of every per-step scalar.

A param group's options become an immutable :class:`GroupPlan` once per step (:func:`plan_of`).
Its modes are ``IntEnum`` values; the C kernel is compiled with the same values as ``-D``
definitions (:func:`c_defines`) and the Triton kernels read them as constexprs, so a mode has one
number everywhere. The scalars that depend on the step ``t`` (the decay, the step size, the weight
of the moving averages) are computed by :func:`step_scalars` only, for every implementation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Eps1Mode",
    "GroupPlan",
    "Impl",
    "Momentum",
    "StepScalars",
    "WeightDecay",
    "c_defines",
    "plan_of",
    "step_scalars",
]


class _Named(IntEnum):
    """An IntEnum whose members are also known by the lower-case name a param group stores."""

    @classmethod
    def of(cls, name: str | None) -> Any:
        return cls[(name or "none").upper()]

    @property
    def key(self) -> str:
        return self.name.lower()


class Momentum(_Named):
    """What the first moment averages (``momentum_kind``); NONE when ``beta1`` is unset."""

    NONE = 0
    GRAD = 1  # the gradient, normalised by sqrt(V_hat) afterwards (Adam-style)
    NORMALIZED_UPDATE = 2  # the clipped update before the step size (big_vision)
    UPDATE = 3  # the applied update alpha_t * U_hat (T2T, transformers, optax)


class WeightDecay(_Named):
    """How ``weight_decay`` shrinks x (``weight_decay_mode``)."""

    LR = 0  # x (1 - lr wd)                       torch, big_vision
    LR_BEFORE = 1  # x - x (lr wd), before RMS(x)  tf_keras, Keras 3
    ALPHA = 2  # x - x (alpha wd)                  transformers, timm
    UNSCALED = 3  # x - x wd                       optax, T5X


class Eps1Mode(_Named):
    """Where eps1 enters (``eps1_mode``)."""

    ADD = 0  # G^2 + eps1 (the paper)
    CLAMP = 1  # floors of mean(R) and V_hat (torch.optim.Adafactor)


class Impl(_Named):
    """Which implementation runs the op (``Adafactor(impl=...)``)."""

    AUTO = 0  # the fastest path checked on the device: the C kernel (CPU), foreach (CUDA)
    REFERENCE = 1  # the readable math everywhere
    FUSED = 2  # the C kernel on CPU (an error where it cannot build)
    TRITON = 3  # the Triton kernels (experimental, opt-in; CPU tensors under TRITON_INTERPRET=1)


@dataclass(frozen=True)
class GroupPlan:
    """The options of one param group that the step op takes, typed and immutable.

    Field order is the op's schema order (:mod:`adafactor.ops`). Factoring decisions are per
    tensor and travel as the op's ``factor_dims`` list instead.
    """

    beta2_decay: float
    beta2_cap: float | None
    beta2: float | None
    eps1: float | None  # None: machine epsilon of the parameter dtype (eps1_mode CLAMP only)
    eps1_mode: int  # Eps1Mode
    eps2: float
    clip_threshold: float | None
    relative_step: bool
    scale_parameter: bool
    warmup_init: bool
    beta1: float | None
    momentum: int  # Momentum; NONE when beta1 is unset or 0
    weight_decay: float
    weight_decay_mode: int  # WeightDecay
    clipnorm: float | None
    clipvalue: float | None
    maximize: bool
    stochastic_rounding: bool
    use_ema: bool
    ema_momentum: float
    ema_overwrite_frequency: int | None
    impl: int  # Impl
    carry_param_rms: bool
    kahan_summation: bool = False  # bf16 parameters: compensated write-back (kahan_comp)

    @classmethod
    def schema_args(cls) -> str:
        """The plan's part of the op schema: ``float beta2_decay, float? beta2_cap, ...``."""
        kinds = {"float": "float", "int": "int", "bool": "bool"}
        out = []
        for f in dataclasses.fields(cls):
            base, _, optional = str(f.type).partition(" | ")
            out.append(f"{kinds[base]}{'?' if optional else ''} {f.name}")
        return ", ".join(out)

    def as_args(self) -> tuple[Any, ...]:
        return dataclasses.astuple(self)


def plan_of(group: dict[str, Any], *, impl: str, carry_param_rms: bool) -> GroupPlan:
    """The plan of a (validated) param group."""
    beta1 = group["beta1"]
    momentum = Momentum.of(group["momentum_kind"]) if beta1 else Momentum.NONE
    return GroupPlan(
        beta2_decay=float(group["beta2_decay"]),
        beta2_cap=_opt_float(group["beta2_cap"]),
        beta2=_opt_float(group["beta2"]),
        eps1=_opt_float(group["eps1"]),
        eps1_mode=int(Eps1Mode.of(group["eps1_mode"])),
        eps2=float(group["eps2"]),
        clip_threshold=_opt_float(group["clip_threshold"]),
        relative_step=bool(group["relative_step"]),
        scale_parameter=bool(group["scale_parameter"]),
        warmup_init=bool(group["warmup_init"]),
        beta1=float(beta1) if momentum else None,
        momentum=int(momentum),
        weight_decay=float(group["weight_decay"]),
        weight_decay_mode=int(WeightDecay.of(group["weight_decay_mode"])),
        clipnorm=_opt_float(group["clipnorm"]),
        clipvalue=_opt_float(group["clipvalue"]),
        maximize=bool(group["maximize"]),
        stochastic_rounding=bool(group["stochastic_rounding"]),
        use_ema=bool(group["use_ema"]),
        ema_momentum=float(group["ema_momentum"]),
        ema_overwrite_frequency=group["ema_overwrite_frequency"],
        impl=int(Impl.of(impl)),
        carry_param_rms=carry_param_rms,
        kahan_summation=bool(group.get("kahan_summation", False)),
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


class StepScalars(NamedTuple):
    """The scalars of step ``t`` of one tensor, in float64 (Python floats or 0-d tensors)."""

    t: float | Tensor
    lr: float | Tensor  # lr_t
    beta2: float | Tensor  # beta2_t
    rho: float | Tensor  # rho_t, the step size before the parameter scale


def step_scalars(plan: GroupPlan, t: float | Tensor, lr: float | Tensor) -> StepScalars:
    r"""The scalars of step ``t`` (1-based) at learning rate ``lr``: the one place they are made.

    :math:`\hat\beta_{2t} = \min(\text{beta2\_cap}, 1 - t^{c})`, or with a fixed ``beta2`` Adam's
    decay with the bias correction folded in, :math:`\beta_2(1-\beta_2^{t-1})/(1-\beta_2^t)`;
    :math:`\rho_t = \min(\text{lr}_t, 1/\sqrt t\ [, 10^{-6} t])` with ``relative_step``, else
    :math:`\text{lr}_t`. Either way :math:`\hat\beta_{21} = 0` and the decay never rounds to 1
    early (tf_keras computes it in the parameter dtype, which freezes bf16 training at t ~ 3000).
    Floats give floats (the CPU paths); tensors give tensors, with no host read (devices).
    """
    if isinstance(t, Tensor):
        return _tensor_scalars(plan, t.to(torch.float64), lr)
    if plan.beta2 is not None:
        b = plan.beta2
        beta2 = b * (1.0 - b ** (t - 1)) / (1.0 - b**t)
    else:
        beta2 = 1.0 - float(t) ** plan.beta2_decay
    if plan.beta2_cap is not None:
        beta2 = min(plan.beta2_cap, beta2)
    rho: float | Tensor = lr
    if plan.relative_step:
        cap = 1.0 / math.sqrt(t)
        if plan.warmup_init:
            cap = min(cap, 1e-6 * t)
        rho = lr.clamp(max=cap) if isinstance(lr, Tensor) else min(lr, cap)
    return StepScalars(t, lr, beta2, rho)


def _tensor_scalars(plan: GroupPlan, t: Tensor, lr: float | Tensor) -> StepScalars:
    if plan.beta2 is not None:
        b = plan.beta2
        beta2 = b * (1.0 - b ** (t - 1)) / (1.0 - b**t)
    else:
        beta2 = 1.0 - t.pow(plan.beta2_decay)
    if plan.beta2_cap is not None:
        beta2 = beta2.clamp(max=plan.beta2_cap)
    rho: float | Tensor = lr
    if plan.relative_step:
        cap = t.rsqrt()
        if plan.warmup_init:
            cap = torch.minimum(cap, 1e-6 * t)
        rho = torch.minimum(torch.as_tensor(lr, dtype=torch.float64, device=t.device), cap)
    return StepScalars(t, lr, beta2, rho)


def c_defines() -> dict[str, int]:
    """The modes as C preprocessor definitions (``AF_MOMENTUM_UPDATE=3``, ...) for the kernel."""
    out: dict[str, int] = {}
    for enum, prefix in ((Momentum, "MOM"), (WeightDecay, "WD"), (Eps1Mode, "EPS1")):  # not Impl
        for member in enum:
            out[f"AF_{prefix}_{member.name}"] = int(member)
    return out
