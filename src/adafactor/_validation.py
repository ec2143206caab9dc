"""Checks on hyperparameters and parameters: every error names the argument, the value and a fix."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .factoring import FACTOR_POLICIES

__all__ = [
    "EPS1_MODES",
    "IMPLS",
    "MOMENTUM_MODES",
    "WEIGHT_DECAY_MODES",
    "check_group",
    "check_param",
]

MOMENTUM_MODES = ("update", "normalized_update", "grad")
WEIGHT_DECAY_MODES = ("lr", "lr_before", "alpha", "unscaled")
EPS1_MODES = ("add", "clamp")
IMPLS = ("auto", "reference", "fused", "triton")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool, hint: str
) -> None:
    v = _number(name, value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}; {hint}")


def _optional_positive(name: str, value: Any, hint: str) -> None:
    if value is not None:
        _in_range(name, value, 0.0, math.inf, low_open=True, high_open=True, hint=hint)


def check_lr(lr: Any) -> None:
    """A float >= 0, a one-element tensor >= 0, or a schedule (a callable of the 0-based step)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(
                f"lr as a tensor must be a one-element floating tensor, got shape "
                f"{tuple(lr.shape)} and dtype {lr.dtype}; use torch.tensor(0.01)"
            )
        if lr.device.type != "meta" and not bool(torch.isfinite(lr).all() and (lr >= 0).all()):
            raise ValueError(f"lr must be finite and >= 0, got {lr!r}")
        return
    if callable(lr):
        return
    _in_range(
        "lr",
        lr,
        0.0,
        math.inf,
        low_open=False,
        high_open=True,
        hint="pass a learning rate such as 1e-2, or a schedule callable(step) -> float",
    )


def check_group(group: dict[str, Any]) -> None:
    """Validate one param group's hyperparameters, raising ValueError/TypeError with a fix."""
    check_lr(group["lr"])
    _in_range(
        "beta2_decay",
        group["beta2_decay"],
        -math.inf,
        0.0,
        low_open=True,
        high_open=False,
        hint="the decay is beta2_t = 1 - t**beta2_decay; the paper uses -0.8",
    )
    if group["beta2_cap"] is not None:
        _in_range(
            "beta2_cap",
            group["beta2_cap"],
            0.0,
            1.0,
            low_open=True,
            high_open=False,
            hint="big_vision caps beta2_t at 0.999; None disables the cap",
        )
    if group["beta2"] is not None:
        _in_range(
            "beta2",
            group["beta2"],
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            hint="a fixed second-moment decay such as 0.999; None uses beta2_decay",
        )
    mode = group["eps1_mode"]
    if mode not in EPS1_MODES:
        raise ValueError(f"eps1_mode must be one of {EPS1_MODES}, got {mode!r}")
    eps1 = group["eps1"]
    if eps1 is None:
        if mode != "clamp":
            raise ValueError(
                "eps1=None (machine epsilon) is only meaningful with eps1_mode='clamp' "
                "(torch.optim.Adafactor); pass eps1=1e-30 for the paper's additive epsilon"
            )
    else:
        _in_range(
            "eps1",
            eps1,
            0.0,
            math.inf,
            low_open=True,
            high_open=True,
            hint="eps1 keeps all-zero gradient rows from dividing by zero; the paper uses 1e-30",
        )
        if mode == "clamp" and eps1 * eps1 < torch.finfo(torch.float32).tiny:
            raise ValueError(
                f"eps1={eps1!r} with eps1_mode='clamp' floors V_hat at eps1**2, which underflows "
                "to 0 in float32 and turns zero gradients into NaN (torch.optim.Adafactor does "
                "this); use eps1 >= 1.1e-19 or None, or eps1_mode='add'"
            )
    _in_range(
        "eps2",
        group["eps2"],
        0.0,
        math.inf,
        low_open=False,
        high_open=True,
        hint="eps2 floors RMS(x) in the relative step size; the paper uses 1e-3",
    )
    _optional_positive(
        "clip_threshold",
        group["clip_threshold"],
        "update clipping divides U by max(1, RMS(U)/d); None disables it",
    )
    for flag in (
        "relative_step",
        "scale_parameter",
        "warmup_init",
        "factored",
        "maximize",
        "stochastic_rounding",
        "use_ema",
        "skip_nonfinite",
    ):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {group[flag]!r}")
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError(
            "warmup_init=True caps the relative step size rho_t and needs relative_step=True; "
            "with relative_step=False use an lr schedule for warm-up"
        )
    if group["beta1"] is not None:
        _in_range(
            "beta1",
            group["beta1"],
            0.0,
            1.0,
            low_open=False,
            high_open=True,
            hint="beta1 is the momentum decay (0.9 typical); None disables momentum",
        )
    if group["momentum_kind"] not in MOMENTUM_MODES:
        raise ValueError(
            f"momentum_kind must be one of {MOMENTUM_MODES}, got {group['momentum_kind']!r}: 'update' is the "
            "moving average of the applied update (T2T, transformers, optax), "
            "'normalized_update' of the clipped update before the step size (big_vision), "
            "'grad' of the gradient (Adam-style)"
        )
    for name in ("momentum_dtype", "state_dtype"):
        dtype = group[name]
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    _in_range(
        "weight_decay",
        group["weight_decay"],
        0.0,
        math.inf,
        low_open=False,
        high_open=True,
        hint="weight decay shrinks x towards 0 each step; 0 disables it",
    )
    if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got "
            f"{group['weight_decay_mode']!r}; see docs/presets.md for which reference uses which"
        )
    if group["factor_dims"] not in FACTOR_POLICIES:
        raise ValueError(
            f"factor_dims must be one of {FACTOR_POLICIES}, got {group['factor_dims']!r}"
        )
    size = group["min_dim_size_to_factor"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"min_dim_size_to_factor must be an int >= 0, got {size!r}")
    _optional_positive("clipnorm", group["clipnorm"], "it is the max L2 norm of each gradient")
    _optional_positive("clipvalue", group["clipvalue"], "it bounds each gradient element")
    if group["clipnorm"] is not None and group["clipvalue"] is not None:
        raise ValueError(
            f"clipnorm={group['clipnorm']!r} and clipvalue={group['clipvalue']!r} are both set; "
            "tf_keras would silently ignore clipvalue. Set only one of them"
        )
    _in_range(
        "ema_momentum",
        group["ema_momentum"],
        0.0,
        1.0,
        low_open=False,
        high_open=False,
        hint="the EMA of the weights is ema = m * ema + (1 - m) * x",
    )
    freq = group["ema_overwrite_frequency"]
    if freq is not None:
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"ema_overwrite_frequency must be an int >= 1 or None, got {freq!r}")
        if not group["use_ema"]:
            raise ValueError(
                f"ema_overwrite_frequency={freq!r} needs use_ema=True (tf_keras ignores it "
                "silently otherwise)"
            )


def check_param(param: Tensor, where: str, factored: bool) -> None:
    """Reject parameters Adafactor cannot handle correctly, before any state is built."""
    if not isinstance(param, Tensor):
        raise TypeError(f"{where}: optimizer params must be tensors, got {type(param).__name__}")
    if param.is_complex():
        raise TypeError(
            f"{where}: complex parameter of dtype {param.dtype} is not supported; optimize "
            "torch.view_as_real(param) (its real and imaginary parts as a real tensor) instead"
        )
    if not param.is_floating_point():
        raise TypeError(f"{where}: parameter of dtype {param.dtype} is not floating point")
    flat = type(param).__name__ == "FlatParameter" or getattr(param, "_fsdp_flattened", False)
    if flat and factored:
        raise ValueError(
            f"{where}: this is an FSDP1 flattened parameter (shape {tuple(param.shape)}). Its "
            "factored second moment would silently degrade to a 1-D one. Shard the model with "
            "FSDP2 (torch.distributed.fsdp.fully_shard), which keeps parameter shapes and gives "
            "the unsharded result, or pass factored=False to use a full second moment on purpose "
            "(RMS(x) and update clipping then see only this rank's flat shard)"
        )


def resolve_lr(lr: float | Tensor | Callable[[int], float], iteration: int) -> float | Tensor:
    """The learning rate of the update at 0-based ``iteration`` (Keras' schedule convention)."""
    if isinstance(lr, Tensor):
        return lr.reshape(())
    if callable(lr):
        value = lr(iteration)
        if isinstance(value, Tensor):
            return value.reshape(())
        return float(value)
    return lr
