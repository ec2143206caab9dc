"""The one table of optimizer configurations that drives the option, impl-parity and state tests.

Each ``AdafactorInput`` is a set of constructor keywords with a description; ``ErrorInput`` pairs
bad keywords with the exception and a regex its message must match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adafactor import PRESETS


@dataclass(frozen=True)
class AdafactorInput:
    desc: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # params need bf16 storage for this sample (stochastic rounding, bf16 momentum paths)
    bf16: bool = False


def _schedule(step: int) -> float:
    """A module-level (picklable) schedule: halve every 3 steps from 0.05."""
    return 0.05 * 0.5 ** (step // 3)


OPTIM_INPUTS: list[AdafactorInput] = [
    AdafactorInput("defaults"),
    *(AdafactorInput(f"preset={name}", {"preset": name}) for name in PRESETS),
    AdafactorInput(
        "absolute lr, no scaling", {"lr": 1e-3, "relative_step": False, "scale_parameter": False}
    ),
    AdafactorInput("unfactored", {"factored": False}),
    AdafactorInput(
        "largest2, min size 4", {"factor_dims": "largest2", "min_dim_size_to_factor": 4}
    ),
    AdafactorInput("matrix-only factoring", {"factor_dims": "matrix"}),
    AdafactorInput("no update clipping", {"clip_threshold": None}),
    AdafactorInput("clip 0.5", {"clip_threshold": 0.5}),
    AdafactorInput("beta2 cap", {"beta2_cap": 0.9, "beta2_decay": -0.5}),
    AdafactorInput("fixed beta2 (Adam decay)", {"beta2": 0.999}),
    AdafactorInput("momentum update", {"beta1": 0.9}),
    AdafactorInput(
        "momentum normalized_update", {"beta1": 0.9, "momentum_kind": "normalized_update"}
    ),
    AdafactorInput("momentum grad", {"beta1": 0.9, "momentum_kind": "grad"}),
    AdafactorInput("bf16 momentum", {"beta1": 0.9, "momentum_dtype": torch.bfloat16}),
    *(
        AdafactorInput(f"weight decay {mode}", {"weight_decay": 0.1, "weight_decay_mode": mode})
        for mode in ("lr", "lr_before", "alpha", "unscaled")
    ),
    AdafactorInput("eps1 clamp", {"eps1_mode": "clamp", "eps1": None}),
    AdafactorInput("warmup_init", {"warmup_init": True}),
    AdafactorInput("tensor lr", {"lr": torch.tensor(0.02), "relative_step": False}),
    AdafactorInput("lr schedule", {"lr": _schedule}),
    AdafactorInput("maximize", {"maximize": True}),
    AdafactorInput("clipnorm", {"clipnorm": 0.05}),
    AdafactorInput("clipvalue", {"clipvalue": 0.01}),
    AdafactorInput("global_clipnorm", {"global_clipnorm": 0.1}),
    AdafactorInput("ema", {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3}),
    AdafactorInput("stochastic rounding", {"stochastic_rounding": True}, bf16=True),
    AdafactorInput("kahan summation", {"kahan_summation": True}, bf16=True),
    AdafactorInput("bf16 params", {"beta1": 0.9}, bf16=True),
]


@dataclass(frozen=True)
class ErrorInput:
    kwargs: dict[str, Any]
    error: type[Exception]
    match: str


ERROR_INPUTS: list[ErrorInput] = [
    ErrorInput({"lr": -1.0}, ValueError, r"lr must be in \[0.0, inf\), got -1.0"),
    ErrorInput({"lr": float("nan")}, ValueError, r"lr must be finite"),
    ErrorInput({"lr": "0.01"}, TypeError, r"lr must be a real number, got '0.01'"),
    ErrorInput({"lr": torch.ones(2)}, ValueError, r"one-element floating tensor, got shape \(2,\)"),
    ErrorInput({"beta2_decay": 0.5}, ValueError, r"beta2_decay must be in \(-inf, 0.0\], got 0.5"),
    ErrorInput({"beta2_cap": 1.5}, ValueError, r"beta2_cap must be in \(0.0, 1.0\], got 1.5"),
    ErrorInput({"beta2": 1.0}, ValueError, r"beta2 must be in \(0.0, 1.0\), got 1.0"),
    ErrorInput({"eps1": 0.0}, ValueError, r"eps1 must be in \(0.0, inf\), got 0.0"),
    ErrorInput({"eps1": None}, ValueError, r"eps1=None .* only meaningful with eps1_mode='clamp'"),
    ErrorInput({"eps1_mode": "clamp", "eps1": 1e-30}, ValueError, r"underflows to 0 in float32"),
    ErrorInput({"eps1_mode": "sum"}, ValueError, r"eps1_mode must be one of \('add', 'clamp'\)"),
    ErrorInput({"eps2": -1e-3}, ValueError, r"eps2 must be in \[0.0, inf\), got -0.001"),
    ErrorInput({"clip_threshold": 0.0}, ValueError, r"clip_threshold must be in \(0.0, inf\)"),
    ErrorInput({"relative_step": 1}, TypeError, r"relative_step must be True or False, got 1"),
    ErrorInput(
        {"relative_step": False, "warmup_init": True},
        ValueError,
        r"warmup_init=True .* needs relative_step=True",
    ),
    ErrorInput({"beta1": 1.0}, ValueError, r"beta1 must be in \[0.0, 1.0\), got 1.0"),
    ErrorInput(
        {"beta1": 0.9, "momentum_kind": "adam"}, ValueError, r"momentum_kind must be one of"
    ),
    ErrorInput({"momentum_dtype": torch.int8}, TypeError, r"momentum_dtype must be a floating"),
    ErrorInput({"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0.0, inf\)"),
    ErrorInput({"weight_decay_mode": "adamw"}, ValueError, r"weight_decay_mode must be one of"),
    ErrorInput({"factor_dims": "first2"}, ValueError, r"factor_dims must be one of"),
    ErrorInput({"min_dim_size_to_factor": -1}, ValueError, r"min_dim_size_to_factor must be"),
    ErrorInput({"clipnorm": 0.0}, ValueError, r"clipnorm must be in \(0.0, inf\), got 0.0"),
    ErrorInput(
        {"clipnorm": 1.0, "clipvalue": 0.1},
        ValueError,
        r"clipnorm=1.0 and clipvalue=0.1 are both set",
    ),
    ErrorInput(
        {"global_clipnorm": 1.0, "clipnorm": 1.0},
        ValueError,
        r"global_clipnorm=1.0 is set together with clipnorm",
    ),
    ErrorInput({"global_clipnorm": -1.0}, ValueError, r"global_clipnorm must be a number > 0"),
    ErrorInput({"ema_momentum": 1.5}, ValueError, r"ema_momentum must be in \[0.0, 1.0\]"),
    ErrorInput({"ema_overwrite_frequency": 5}, ValueError, r"needs use_ema=True"),
    ErrorInput(
        {"use_ema": True, "ema_overwrite_frequency": 0},
        ValueError,
        r"ema_overwrite_frequency must be an int >= 1",
    ),
    ErrorInput({"preset": "adam"}, ValueError, r"preset='adam' is not a known preset"),
    ErrorInput({"impl": "cuda"}, ValueError, r"impl must be one of"),
]
