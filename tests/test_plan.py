"""The typed plan: one definition of every mode, and the per-step scalars for every path."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import adafactor._fused_cpu as fused
from adafactor import Adafactor
from adafactor._plan import (
    Eps1Mode,
    GroupPlan,
    Momentum,
    WeightDecay,
    c_defines,
    plan_of,
    step_scalars,
)
from adafactor._validation import EPS1_MODES, MOMENTUM_MODES, WEIGHT_DECAY_MODES


def _plan(**group: object) -> GroupPlan:
    opt = Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], **group)  # type: ignore[arg-type]
    return plan_of(opt.param_groups[0], impl="auto", carry_param_rms=True)


def test_every_mode_a_group_accepts_has_one_enum_member() -> None:
    assert [m.key for m in Momentum if m != Momentum.NONE] == sorted(
        MOMENTUM_MODES, key=lambda k: Momentum.of(k)
    )
    assert {m.key for m in WeightDecay} == set(WEIGHT_DECAY_MODES)
    assert {m.key for m in Eps1Mode} == set(EPS1_MODES)


def test_c_defines_are_the_enum_values_and_the_kernel_uses_them() -> None:
    defines = c_defines()
    assert defines["AF_MOM_UPDATE"] == Momentum.UPDATE
    assert defines["AF_WD_LR_BEFORE"] == WeightDecay.LR_BEFORE
    source = fused._SOURCE.read_text()
    used = set(re.findall(r"\bAF_[A-Z0-9_]+\b", source))
    assert used - {"AF_AVX512"} <= set(defines), "the kernel names an option the enums lack"
    # the kernel defines no option value of its own (only its internal layout codes)
    assert not re.search(r"MOM_UPD\s*=\s*\d", source)


def test_plan_fields_are_the_op_schema() -> None:
    import adafactor.ops  # noqa: F401

    schema = torch.ops.adafactor.step_.default._schema
    names = [a.name for a in schema.arguments]
    fields = [f.name for f in dataclasses.fields(GroupPlan)]
    assert names[-len(fields) :] == fields


def test_momentum_is_none_without_beta1() -> None:
    assert _plan(momentum_kind="grad").momentum == Momentum.NONE
    assert _plan(beta1=0.9, momentum_kind="grad").momentum == Momentum.GRAD
    assert _plan(beta1=0.0).momentum == Momentum.NONE


def test_beta2_schedule() -> None:
    plan = _plan()
    assert step_scalars(plan, 1, 1e-2).beta2 == 0.0
    assert step_scalars(plan, 10, 1e-2).beta2 == pytest.approx(1 - 10**-0.8)
    assert step_scalars(_plan(beta2_cap=0.999), 10**6, 1e-2).beta2 == 0.999
    # Adam's decay with bias correction folded in: 0 at t=1, then beta2 (1-beta2^(t-1))/(1-beta2^t)
    adam = _plan(beta2=0.999)
    assert step_scalars(adam, 1, 1e-2).beta2 == 0.0
    assert step_scalars(adam, 2, 1e-2).beta2 == pytest.approx(0.999 * 0.001 / (1 - 0.999**2))
    # far past bf16's and fp16's limits the decay stays below 1
    assert step_scalars(plan, 10**7, 1e-2).beta2 < 1.0


def test_relative_step_size() -> None:
    assert step_scalars(_plan(), 1, 1e-2).rho == 1e-2
    assert step_scalars(_plan(), 10**6, 1e-2).rho == pytest.approx(1e-3)
    assert step_scalars(_plan(warmup_init=True), 100, 1e-2).rho == pytest.approx(1e-4)
    plain = _plan(relative_step=False, scale_parameter=False)
    assert step_scalars(plain, 10**6, 0.5).rho == 0.5


@pytest.mark.parametrize(
    "group",
    [{}, {"beta2": 0.999}, {"beta2_cap": 0.9, "beta2_decay": -0.5}, {"warmup_init": True}],
)
def test_tensor_scalars_equal_float_scalars(group: dict[str, object]) -> None:
    """The device form (tensors, no host read) computes the same scalars as the host form."""
    plan = _plan(**group)
    for t in (1, 2, 7, 1000, 10**6):
        f = step_scalars(plan, float(t), 1e-2)
        d = step_scalars(plan, torch.tensor(float(t), dtype=torch.float64), 1e-2)
        assert math.isclose(float(d.beta2), f.beta2, rel_tol=1e-15, abs_tol=1e-300)
        assert math.isclose(float(d.rho), float(f.rho), rel_tol=1e-15)
