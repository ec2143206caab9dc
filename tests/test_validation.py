"""Every hyperparameter checked, wherever it comes from: the constructor, a later write into
``param_groups``, an lr schedule's output, the optimizer-level options and a loaded state dict."""

from __future__ import annotations

import math
import timeit
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from adafactor import Adafactor
from adafactor import _validation as v
from adafactor.optimizer import _GROUP_DEFAULTS

NAN, INF = float("nan"), float("inf")


def _group(**overrides: Any) -> dict[str, Any]:
    return {**_GROUP_DEFAULTS, "params": [], **overrides}


# name -> (a valid value, is 0 valid, is a negative value valid)
FLOAT_OPTIONS: dict[str, tuple[float, bool, bool]] = {
    "lr": (1e-3, True, False),
    "beta2_decay": (-0.5, True, True),
    "beta2_cap": (0.999, False, False),
    "beta2": (0.999, False, False),
    "eps1": (1e-30, False, False),
    "eps2": (1e-3, True, False),
    "clip_threshold": (1.0, False, False),
    "beta1": (0.9, True, False),
    "weight_decay": (0.01, True, False),
    "clipnorm": (1.0, False, False),
    "clipvalue": (1.0, False, False),
    "ema_momentum": (0.9, True, False),
}
# name -> (a valid value, is 0 valid)
INT_OPTIONS: dict[str, tuple[int, bool]] = {
    "min_dim_size_to_factor": (128, True),
    "ema_overwrite_frequency": (10, False),
}
OPTIONAL = {"beta2_cap", "beta2", "clip_threshold", "beta1", "clipnorm", "clipvalue"}  # None: off
NEEDS = {"ema_overwrite_frequency": {"use_ema": True}}  # options valid only with another one


def _bad_cases() -> list[tuple[str, Any, type[Exception]]]:
    cases: list[tuple[str, Any, type[Exception]]] = []
    for name, (_, zero_ok, negative_ok) in FLOAT_OPTIONS.items():
        bad: list[tuple[Any, type[Exception]]] = [
            (NAN, ValueError),
            (INF, ValueError),
            (-INF, ValueError),
            (1e39, ValueError),  # beyond float32: inf inside the step
            (-1e39, ValueError),
            (10**300, ValueError),  # an int within float64 but beyond float32
            (10**400, ValueError),  # beyond float64: no OverflowError
            ("0.01", TypeError),
            ([1], TypeError),
            (True, TypeError),
            ({}, TypeError),
        ]
        if name not in OPTIONAL:  # eps1=None means machine epsilon, only with eps1_mode='clamp'
            bad.append((None, ValueError if name == "eps1" else TypeError))
        if name != "lr":
            bad.append((torch.tensor(0.5), TypeError))  # only lr may be a tensor
        if not negative_ok:
            bad.append((-0.5, ValueError))
        else:
            bad.append((0.5, ValueError))  # beta2_decay must be <= 0
        if not zero_ok:
            bad.append((0.0, ValueError))
        cases += [(name, value, error) for value, error in bad]
    for name, (_, zero_ok) in INT_OPTIONS.items():
        bad = [
            (NAN, TypeError),
            (INF, TypeError),
            (1e39, TypeError),
            (2.0, TypeError),  # an int option: a float is the wrong type
            (10**300, ValueError),  # beyond int64
            (-1, ValueError),
            ("4", TypeError),
            ([1], TypeError),
            (True, TypeError),
            (np.float32(4), TypeError),
        ]
        if not zero_ok:
            bad.append((0, ValueError))
        cases += [(name, value, error) for value, error in bad]
    return cases


BAD_CASES = _bad_cases()


def _case_id(case: tuple[str, Any, type[Exception]]) -> str:
    name, value, _ = case
    big = isinstance(value, int) and abs(value) >= 10**30
    text = f"int_10**{len(str(abs(value))) - 1}" if big else repr(value)
    return f"{name}={text[:20]}"


def test_group_keys_are_the_optimizer_defaults():
    assert set(v.GROUP_KEYS) == set(_GROUP_DEFAULTS)
    assert set(FLOAT_OPTIONS) | set(INT_OPTIONS) <= set(v.GROUP_KEYS)
    group = _group()
    v.check_group(group)
    assert group == _group()  # the defaults pass unchanged


@pytest.mark.parametrize("case", BAD_CASES, ids=[_case_id(c) for c in BAD_CASES])
def test_bad_value_of_every_numeric_option_raises_naming_it(case):
    name, value, error = case
    group = _group(**NEEDS.get(name, {}), **{name: value})
    with pytest.raises(error, match=name) as info:
        v.check_group(group)
    assert type(info.value) is error  # ValueError for values, TypeError for types


@pytest.mark.parametrize("name", list(FLOAT_OPTIONS) + list(INT_OPTIONS))
def test_numpy_scalars_and_other_reals_are_accepted_and_stored_as_python_numbers(name):
    if name in FLOAT_OPTIONS:
        valid = FLOAT_OPTIONS[name][0]
        values = [np.float32(valid), np.float64(valid), Fraction(valid), valid]
        plain: type = float
    else:
        valid = INT_OPTIONS[name][0]
        values = [np.int64(valid), np.int32(valid), np.uint8(valid), valid]
        plain = int
    for value in values:
        group = _group(**NEEDS.get(name, {}), **{name: value})
        v.check_group(group)
        assert type(group[name]) is plain, (name, value)
        assert group[name] == pytest.approx(float(value), rel=1e-7)


def test_ints_for_float_options_stay_ints():
    group = _group(clip_threshold=2, lr=1, weight_decay=0)
    v.check_group(group)
    assert (group["clip_threshold"], group["lr"], group["weight_decay"]) == (2, 1, 0)


def test_huge_values_say_float32_and_never_overflow():
    for value in (1e39, 10**300, 10**5000):  # 10**5000 cannot even be printed by repr
        with pytest.raises(ValueError, match=r"eps2=.* beyond float32's largest value \(3.4e38\)"):
            v.check_group(_group(eps2=value))
    with pytest.raises(ValueError, match=r"clip_threshold=2\*\*996-ish int is beyond float32"):
        v.check_group(_group(clip_threshold=10**300))
    for name in ("eps1", "weight_decay"):
        with pytest.raises(ValueError, match=rf"{name}=1e\+39 is beyond float32"):
            v.check_group(_group(**{name: 1e39}))
    v.check_group(_group(clip_threshold=3e38, eps2=3e38))  # representable: accepted


def test_tensor_lr():
    v.check_group(_group(lr=torch.tensor(0.01)))
    v.check_group(_group(lr=torch.tensor([0.01], dtype=torch.float64)))
    for bad in (NAN, INF, -1.0, 1e39):
        with pytest.raises(ValueError, match=r"lr must be finite, >= 0 and at most"):
            v.check_group(_group(lr=torch.tensor(bad, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"one-element floating tensor, got shape \(2,\)"):
        v.check_group(_group(lr=torch.ones(2)))
    with pytest.raises(ValueError, match=r"one-element floating tensor"):
        v.check_group(_group(lr=torch.tensor(1)))
    v.check_group(_group(lr=torch.tensor(NAN, device="meta")))  # not readable: not checked
    lr = torch.tensor(0.01)
    group = _group(lr=lr)
    v.check_group(group)
    assert group["lr"] is lr  # a tensor lr stays the same tensor


def test_flags_and_choices():
    for flag in v._FLAGS:  # every boolean option
        assert isinstance(_GROUP_DEFAULTS[flag], bool), flag
        for bad in (1, "no", None, np.bool_(True)):
            with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
                v.check_group(_group(**{flag: bad}))
    for name in ("eps1_mode", "momentum_kind", "weight_decay_mode", "factor_dims"):
        for bad in ("nope", None, [1]):
            with pytest.raises(ValueError, match=rf"{name} must be one of"):
                v.check_group(_group(**{name: bad}))


def test_state_and_momentum_dtypes():
    for name in ("state_dtype", "momentum_dtype"):
        for ok in (None, torch.float32, torch.float64, torch.bfloat16):
            v.check_group(_group(**{name: ok}))
        with pytest.raises(ValueError, match=rf"{name}=torch.float16 is not supported: .*float32"):
            v.check_group(_group(**{name: torch.float16}))
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            with pytest.raises(ValueError, match=rf"{name}={fp8} .*storage-only dtype"):
                v.check_group(_group(**{name: fp8}))
        for bad in (torch.int8, torch.complex64, "bfloat16"):
            with pytest.raises(TypeError, match=rf"{name} must be a floating torch.dtype"):
                v.check_group(_group(**{name: bad}))
    with pytest.raises(ValueError, match=r"average g\^2, which overflows float16 .*bfloat16"):
        v.check_group(_group(state_dtype=torch.float16))
    with pytest.raises(ValueError, match=r"Use torch.bfloat16 to halve the momentum's memory"):
        v.check_group(_group(momentum_dtype=torch.float16))


def test_float16_state_really_breaks_at_ordinary_gradient_scales():
    """Why float16 state is rejected: g^2 of a 1e-4 gradient flushes to 0 in float16."""
    g = torch.full((4, 4), 1e-4)
    assert (g.square().to(torch.float16) == 0).all()
    assert (g.square().to(torch.bfloat16) > 0).all()
    assert torch.tensor(1e-30, dtype=torch.float16) == 0  # eps1 does not save it


def test_eps1_clamp_mode_bounds():
    v.check_group(_group(eps1_mode="clamp", eps1=None))
    v.check_group(_group(eps1_mode="clamp", eps1=1e-3))
    with pytest.raises(ValueError, match=r"eps1\*\*2, which overflows float32"):
        v.check_group(_group(eps1_mode="clamp", eps1=1e20))
    v.check_group(_group(eps1=1e20))  # add mode: eps1 itself is only added to g^2


def test_weight_decay_keeps_the_decay_factor_in_0_1():
    v.check_group(_group(weight_decay=1.0, weight_decay_mode="unscaled"))
    with pytest.raises(ValueError, match=r"1 - weight_decay = -1 .*flips the sign"):
        v.check_group(_group(weight_decay=2.0, weight_decay_mode="unscaled"))
    v.check_group(_group(lr=1e-2, weight_decay=100.0))  # lr * wd = 1: the factor is 0
    for mode in ("lr", "lr_before"):
        with pytest.raises(ValueError, match=r"lr \* weight_decay = -1 .*<= 1/lr = 100"):
            v.check_group(_group(lr=1e-2, weight_decay=200.0, weight_decay_mode=mode))
    # alpha mode and schedules: lr_t is not known here; not checked
    v.check_group(_group(lr=1e-2, weight_decay=200.0, weight_decay_mode="alpha"))
    v.check_group(_group(lr=lambda step: 1e-2, weight_decay=200.0))


def test_other_cross_checks_keep_their_messages():
    with pytest.raises(ValueError, match=r"clipnorm=1.0 and clipvalue=0.1 are both set"):
        v.check_group(_group(clipnorm=1.0, clipvalue=0.1))
    with pytest.raises(ValueError, match=r"needs use_ema=True"):
        v.check_group(_group(ema_overwrite_frequency=5))
    with pytest.raises(ValueError, match=r"warmup_init=True .* needs relative_step=True"):
        v.check_group(_group(relative_step=False, warmup_init=True))
    with pytest.raises(ValueError, match=r"underflows to 0 in float32"):
        v.check_group(_group(eps1_mode="clamp", eps1=1e-30))


def test_missing_key_is_named():
    group = _group()
    del group["clip_threshold"]
    with pytest.raises(ValueError, match=r"lacks the option\(s\) \['clip_threshold'\]"):
        v.check_group(group)
    with pytest.raises(ValueError, match=r"lacks the option"):
        v.check_group_cached(group, None)


# ---------------------------------------------------------------------------------------------
# values written into param_groups after construction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("lr", NAN, ValueError),
        ("lr", -1.0, ValueError),
        ("lr", "0.01", TypeError),
        ("clip_threshold", 0, ValueError),
        ("eps2", NAN, ValueError),
        ("weight_decay", 1e39, ValueError),
        ("relative_step", 1, TypeError),  # equal to True, but not a bool: still caught
        ("state_dtype", torch.float16, ValueError),
    ],
)
def test_cached_check_catches_later_writes(key, value, error):
    group = _group()
    snapshot = v.check_group_cached(group, None)
    assert v.check_group_cached(group, snapshot) is snapshot
    group[key] = value
    with pytest.raises(error, match=key):
        v.check_group_cached(group, snapshot)
    with pytest.raises(error, match=key):  # and again at the next step: the snapshot is old
        v.check_group_cached(group, snapshot)


def test_cached_check_rechecks_only_on_change():
    group = _group()
    snapshot = v.check_group_cached(group, None)
    assert v.check_group_cached(group, snapshot) is snapshot
    group["lr"] = float("0.01")  # an equal value, a new object: checked again, passes
    again = v.check_group_cached(group, snapshot)
    assert again is not snapshot and v.check_group_cached(group, again) is again
    group["lr"] = np.float32(0.5)  # a torch scheduler may write numpy values
    v.check_group_cached(group, again)
    assert type(group["lr"]) is float
    group["skipped_steps"] = 3  # keys the check does not read do not matter
    snap = v.check_group_cached(group, None)
    assert v.check_group_cached(group, snap) is snap
    # a snapshot does not depend on the dict it came from
    other = dict(group)
    assert v.check_group_cached(other, snap) is snap


def test_cached_check_sees_in_place_writes_to_a_tensor_lr():
    lr = torch.tensor(0.01)
    group = _group(lr=lr)
    snapshot = v.check_group_cached(group, None)
    assert v.check_group_cached(group, snapshot) is snapshot
    lr.fill_(0.02)
    snapshot = v.check_group_cached(group, snapshot)
    lr.fill_(NAN)
    with pytest.raises(ValueError, match=r"lr must be finite"):
        v.check_group_cached(group, snapshot)
    group["lr"] = torch.ones(2)  # a different tensor: compared by identity, never by value
    with pytest.raises(ValueError, match=r"one-element floating tensor"):
        v.check_group_cached(group, snapshot)


def test_optimizer_groups_pass_and_written_values_are_caught():
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    opt = Adafactor(params, lr=np.float32(1e-3), weight_decay=np.float64(0.01))
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and type(group["weight_decay"]) is float
    snapshot = v.check_group_cached(group, None)
    group["clip_threshold"] = 0
    with pytest.raises(ValueError, match=r"clip_threshold must be in \(0.0, inf\), got 0"):
        v.check_group_cached(group, snapshot)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"state_dtype": torch.float16}, ValueError, r"state_dtype=torch.float16 is not supported"),
        ({"momentum_dtype": torch.float8_e4m3fn, "beta1": 0.9}, ValueError, r"storage-only"),
        ({"eps1": 1e39}, ValueError, r"eps1=1e\+39 is beyond float32"),
        ({"eps2": 1e39}, ValueError, r"eps2=1e\+39 is beyond float32"),
        ({"weight_decay": 1e39}, ValueError, r"weight_decay=1e\+39 is beyond float32"),
        ({"clip_threshold": 10**300}, ValueError, r"clip_threshold=2\*\*996-ish int is beyond"),
        ({"lr": 1e-2, "weight_decay": 150.0}, ValueError, r"flips the sign of every weight"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        Adafactor([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)


# ---------------------------------------------------------------------------------------------
# lr schedule output
# ---------------------------------------------------------------------------------------------
def test_schedule_output_accepted():
    assert v.check_lr_value(0.01, 0) == 0.01
    assert v.check_lr_value(0.0, 0) == 0.0
    for value in (1, np.float32(0.5), np.float64(0.5), Fraction(1, 2)):
        out = v.check_lr_value(value, 3)
        assert type(out) is float and out == float(value)
    t = v.check_lr_value(torch.tensor([0.02]), 3)
    assert isinstance(t, torch.Tensor) and t.shape == () and t.item() == pytest.approx(0.02)
    meta = v.check_lr_value(torch.tensor(NAN, device="meta"), 3)  # not read: never synced
    assert meta.shape == ()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (NAN, ValueError, r"returned nan at iteration 7"),
        (INF, ValueError, r"returned inf at iteration 7"),
        (-0.01, ValueError, r"returned -0.01 at iteration 7; .*a negative one climbs the loss"),
        (1e39, ValueError, r"returned 1e\+39 at iteration 7"),
        (10**400, ValueError, r"returned 2\*\*1328-ish int at iteration 7"),
        (torch.tensor(NAN), ValueError, r"returned tensor\(nan\) at iteration 7"),
        (torch.tensor(-1.0), ValueError, r"at iteration 7"),
        (torch.ones(2), ValueError, r"returned a tensor of shape \(2,\) .* at iteration 7"),
        (torch.tensor(1), ValueError, r"returned a tensor of shape \(\) and dtype torch.int64"),
        ("0.01", TypeError, r"returned '0.01' of type str at iteration 7"),
        (None, TypeError, r"returned None of type NoneType at iteration 7"),
        (True, TypeError, r"returned True of type bool"),
    ],
)
def test_schedule_output_rejected(value, error, match):
    with pytest.raises(error, match=match) as info:
        v.check_lr_value(value, 7)
    assert "lr schedule" in str(info.value)
    with pytest.raises(error, match=match):
        v.resolve_lr(lambda step: value, 7)


def test_resolve_lr_checks_schedules_only():
    assert v.resolve_lr(0.01, 5) == 0.01
    assert v.resolve_lr(lambda step: 0.01 * step, 5) == pytest.approx(0.05)
    assert v.resolve_lr(torch.tensor([0.5]), 5).shape == ()
    with pytest.raises(ValueError, match=r"lr schedule returned -0.5 at iteration 5"):
        v.resolve_lr(lambda step: 0.5 - 0.2 * step, 5)


# ---------------------------------------------------------------------------------------------
# optimizer-level options
# ---------------------------------------------------------------------------------------------
def _instance(**overrides: Any) -> float | None:
    options = {"impl": "auto", "carry_param_rms": True, "generator": None, "global_clipnorm": None}
    return v.check_instance_options(**{**options, **overrides})


def test_instance_options_accepted():
    assert _instance() is None
    assert _instance(global_clipnorm=1) == 1.0
    out = _instance(global_clipnorm=np.float32(0.5), generator=torch.Generator().manual_seed(0))
    assert type(out) is float and out == 0.5
    for impl in v.IMPLS:
        _instance(impl=impl, carry_param_rms=False)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"impl": "cuda"}, ValueError, r"impl must be one of"),
        ({"impl": None}, ValueError, r"impl must be one of"),
        ({"carry_param_rms": "no"}, TypeError, r"carry_param_rms must be True or False, got 'no'"),
        ({"carry_param_rms": 1}, TypeError, r"carry_param_rms must be True or False"),
        ({"generator": 123}, TypeError, r"generator must be a torch.Generator or None, got 123"),
        ({"global_clipnorm": -1.0}, ValueError, r"global_clipnorm must be a number > 0"),
        ({"global_clipnorm": 0}, ValueError, r"global_clipnorm must be a number > 0"),
        ({"global_clipnorm": NAN}, ValueError, r"global_clipnorm must be a number > 0"),
        ({"global_clipnorm": INF}, ValueError, r"global_clipnorm must be finite"),
        ({"global_clipnorm": 1e39}, ValueError, r"global_clipnorm=1e\+39 is beyond float32"),
        ({"global_clipnorm": 10**300}, ValueError, r"global_clipnorm=.* is beyond float32"),
        ({"global_clipnorm": 10**400}, ValueError, r"global_clipnorm=.* is beyond float32"),
        ({"global_clipnorm": "1.0"}, TypeError, r"global_clipnorm must be a number > 0 or None"),
        ({"global_clipnorm": True}, TypeError, r"global_clipnorm must be a number > 0 or None"),
        (
            {"global_clipnorm": 1.0, "clipnorm": 1.0},
            ValueError,
            r"global_clipnorm=1.0 is set together with clipnorm",
        ),
        (
            {"global_clipnorm": 1.0, "clipvalue": 0.5},
            ValueError,
            r"global_clipnorm=1.0 is set together with clipnorm or clipvalue",
        ),
    ],
)
def test_instance_options_rejected(overrides, error, match):
    with pytest.raises(error, match=match) as info:
        _instance(**overrides)
    assert type(info.value) is error


# ---------------------------------------------------------------------------------------------
# loaded state dicts
# ---------------------------------------------------------------------------------------------
def test_loaded_step_accepts_numbers_and_tensors():
    out = v.check_loaded_state(3, "step", 5)  # torch accepts a plain number too
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.item() == 5.0
    assert v.check_loaded_state(3, "step", np.int64(2)).item() == 2.0
    t = torch.tensor(4.0)
    assert v.check_loaded_state(3, "step", t) is t
    assert v.check_loaded_state(3, "step", torch.tensor([0.0])).shape == (1,)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, r"is -1.0; the step count must be finite and >= 0"),
        (NAN, ValueError, r"must be finite and >= 0"),
        (torch.tensor(INF), ValueError, r"must be finite and >= 0"),
        (torch.tensor(-2.0), ValueError, r"must be finite and >= 0"),
        (10**400, ValueError, r"must be finite and >= 0"),
        (torch.zeros(2), ValueError, r"shape \(2,\) .*must be one number"),
        (torch.tensor(True), ValueError, r"must be one number"),
        ("3", TypeError, r"is '3' of type str; the step count must be a number"),
        (None, TypeError, r"the step count must be a number"),
    ],
)
def test_loaded_step_rejected(value, error, match):
    with pytest.raises(error, match=match) as info:
        v.check_loaded_state(7, "step", value)
    assert "state['step'] of the parameter with id 7" in str(info.value)
    assert "Load a state dict saved from the same model and param groups" in str(info.value)


@pytest.mark.parametrize("key", ["row_var", "col_var", "variance", "exp_avg", "ema"])
def test_loaded_state_tensors(key):
    ok = torch.rand(3, 2)
    assert v.check_loaded_state(1, key, ok) is ok
    assert v.check_loaded_state(1, key, torch.zeros(0, 2)).shape == (0, 2)
    assert v.check_loaded_state(1, key, ok.to(torch.bfloat16)).dtype == torch.bfloat16
    for bad in (NAN, INF, -INF):
        t = ok.clone()
        t[1, 1] = bad
        with pytest.raises(ValueError, match=rf"state\['{key}'\] of the parameter with id 1 "):
            v.check_loaded_state(1, key, t)
    negative = -ok
    if key in ("row_var", "col_var", "variance"):
        with pytest.raises(ValueError, match=r"must be finite and >= 0, else U = G/sqrt\(V\)"):
            v.check_loaded_state(1, key, negative)
    else:  # momentum and EMA may be negative
        assert v.check_loaded_state(1, key, negative) is negative
    for bad in (ok.numpy(), [1.0], torch.ones(2, dtype=torch.int32)):
        with pytest.raises(TypeError, match=rf"state\['{key}'\] .*must be a floating tensor"):
            v.check_loaded_state(1, key, bad)


def test_loaded_state_unknown_keys_pass_through():
    extra = {"anything": 1}
    assert v.check_loaded_state(1, "carried_sumsq", extra) is extra


def test_state_ids():
    v.check_state_ids([0, 1, 2], [0, 2])
    v.check_state_ids([0, 1, 2], [])
    with pytest.raises(ValueError, match=r"parameter id\(s\) \[99\] that no param group lists"):
        v.check_state_ids([0, 1, 2], [0, 99])
    with pytest.raises(ValueError, match=r"Load a state dict saved from the same model"):
        v.check_state_ids(range(30), ["a", 99])


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
def test_check_costs_print():
    """Prints the cost of each per-step check (no assertion: timings vary with the machine)."""
    group = _group()
    snapshot = v.check_group_cached(group, None)
    tensor_group = _group(lr=torch.tensor(0.01))
    tensor_snapshot = v.check_group_cached(tensor_group, None)
    lr_t = torch.tensor(0.01)
    checks = {
        "check_group (default group)": lambda: v.check_group(group),
        "check_group (tensor lr)": lambda: v.check_group(tensor_group),
        "check_group_cached (unchanged)": lambda: v.check_group_cached(group, snapshot),
        "check_group_cached (tensor lr)": lambda: v.check_group_cached(
            tensor_group, tensor_snapshot
        ),
        "check_lr_value (float)": lambda: v.check_lr_value(0.01, 5),
        "check_lr_value (CPU tensor)": lambda: v.check_lr_value(lr_t, 5),
    }
    for name, fn in checks.items():
        number = 2000
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        print(f"{name:34s} {best * 1e6:7.2f} us")
        assert math.isfinite(best)
