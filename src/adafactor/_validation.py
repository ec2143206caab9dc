"""Checks on hyperparameters, options and loaded state: every error names the option, the value
and a fix (ValueError for a bad value, TypeError for a wrong type).

Every float option must be finite and at most float32's largest value (3.4e38): the step
computes in float32, where a larger value is inf and turns the parameters into NaN. Numbers may be
any ``numbers.Real`` but bool (numpy scalars included); :func:`check_group` stores them back as
Python floats and ints. Checks run at construction, in ``add_param_group`` and on load; values
written into ``param_groups`` later are caught by :func:`check_group_cached` at the next step,
and a schedule's output by :func:`check_lr_value` (through :func:`resolve_lr`) at every step.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import torch
from torch import Tensor

from .factoring import FACTOR_POLICIES

__all__ = [
    "EPS1_MODES",
    "F32_MAX",
    "GROUP_KEYS",
    "IMPLS",
    "MOMENTUM_MODES",
    "STATE_DTYPES",
    "WEIGHT_DECAY_MODES",
    "GroupSnapshot",
    "check_added_group",
    "check_group",
    "check_group_cached",
    "check_instance_options",
    "check_loaded_state",
    "check_lr",
    "check_lr_value",
    "check_param",
    "check_state_ids",
    "resolve_lr",
]

MOMENTUM_MODES = ("update", "normalized_update", "grad")
WEIGHT_DECAY_MODES = ("lr", "lr_before", "alpha", "unscaled")
EPS1_MODES = ("add", "clamp")
IMPLS = ("auto", "reference", "fused", "triton")
# float16 statistics overflow or flush to 0 at ordinary gradient scales; float8 has no arithmetic
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

F32_MAX = float(torch.finfo(torch.float32).max)  # 3.4028234663852886e38
_F32_TINY = float(torch.finfo(torch.float32).tiny)
_SQRT_F32_MAX = math.sqrt(F32_MAX)  # 1.8e19
_INT64_MAX = 2**63 - 1

# Every key check_group reads, in the order it reads them (a test keeps it equal to
# optimizer._GROUP_DEFAULTS); check_group_cached snapshots these values.
GROUP_KEYS = (
    "lr",
    "beta2_decay",
    "beta2_cap",
    "beta2",
    "eps1_mode",
    "eps1",
    "eps2",
    "clip_threshold",
    "relative_step",
    "scale_parameter",
    "warmup_init",
    "factored",
    "maximize",
    "stochastic_rounding",
    "use_ema",
    "skip_nonfinite",
    "kahan_summation",
    "beta1",
    "momentum_kind",
    "momentum_dtype",
    "state_dtype",
    "weight_decay",
    "weight_decay_mode",
    "factor_dims",
    "min_dim_size_to_factor",
    "clipnorm",
    "clipvalue",
    "ema_momentum",
    "ema_overwrite_frequency",
)
_FLAGS = GROUP_KEYS[8:17]
_group_values = operator.itemgetter(*GROUP_KEYS)

# What check_group_cached returns: the group's values when they last passed check_group (kept
# alive, so identity comparisons are sound) and the version counter of a tensor lr.
GroupSnapshot = tuple[tuple[Any, ...], "int | None"]

_LR_HINT = "pass a learning rate such as 1e-2, or a schedule callable(step) -> float"


def _show(value: Any) -> str:
    """``repr`` that stays short: huge ints (10**5000 cannot even be printed) and long reprs."""
    if type(value) is int and not -(10**30) < value < 10**30:
        return f"{'-' if value < 0 else ''}2**{abs(value).bit_length() - 1}-ish int"
    text = " ".join(repr(value).split())  # one line (tensors and arrays print on several)
    return text if len(text) <= 80 else text[:77] + "..."


def _real(name: str, value: Any, hint: str) -> float:
    """``value`` as a finite float within float32's range, or a TypeError/ValueError."""
    if type(value) is float:
        v = value
    else:
        if type(value) is bool or not isinstance(value, numbers.Real):
            extra = "; a tensor is accepted only for lr (use .item())" * isinstance(value, Tensor)
            raise TypeError(
                f"{name} must be a real number, got {_show(value)} of type "
                f"{type(value).__name__}; pass a Python float or int (numpy scalars work too)"
                f"{extra}"
            )
        try:
            v = float(value)
        except OverflowError:  # an int beyond float64's range
            _too_large(name, value, hint)
    if not -math.inf < v < math.inf:  # NaN fails too (comparisons, so dynamo can trace them)
        raise ValueError(f"{name} must be finite, got {_show(value)}; {hint}")
    if v > F32_MAX or v < -F32_MAX:
        _too_large(name, value, hint)
    return v


def _too_large(name: str, value: Any, hint: str) -> NoReturn:
    raise ValueError(
        f"{name}={_show(value)} is beyond float32's largest value (3.4e38): the step computes in "
        f"float32, where it is inf and turns the parameters into NaN; {hint}"
    )


def _float_option(
    group: dict[str, Any],
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool,
    high_open: bool,
    hint: str,
    optional: bool = False,
) -> float | None:
    """Check ``group[name]`` (None allowed if ``optional``); store a numpy scalar as a float."""
    value = group[name]
    if value is None and optional:
        return None
    v = _real(name, value, hint)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {_show(value)}; {hint}")
    if type(value) is not float and type(value) is not int:
        group[name] = v
    return v


def _int_option(
    group: dict[str, Any], name: str, low: int, hint: str, *, optional: bool = False
) -> None:
    value = group[name]
    if value is None and optional:
        return
    kind = f"an int >= {low}{' or None' if optional else ''}"
    if type(value) is not int:
        if type(value) is bool or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"{name} must be {kind}, got {_show(value)} of type {type(value).__name__}; {hint}"
            )
        value = group[name] = int(value)
    if value < low:
        raise ValueError(f"{name} must be {kind}, got {_show(value)}; {hint}")
    if value > _INT64_MAX:
        raise ValueError(
            f"{name}={_show(value)} is beyond int64 (2**63 - 1), larger than any tensor size or "
            f"step count; {hint}"
        )


def check_lr(lr: Any) -> float | Tensor | Callable[[int], Any]:
    """A float >= 0, a one-element tensor >= 0, or a schedule (a callable of the 0-based step).

    Returns ``lr`` with a numpy scalar turned into a float. A tensor's value is checked only on
    the CPU (reading a device tensor would synchronise) and not while torch.compile traces.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(
                f"lr as a tensor must be a one-element floating tensor, got shape "
                f"{tuple(lr.shape)} and dtype {lr.dtype}; use torch.tensor(0.01)"
            )
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            v = lr.item()
            if not 0.0 <= v <= F32_MAX:
                raise ValueError(
                    f"lr must be finite, >= 0 and at most float32's largest value 3.4e38, got "
                    f"{_show(lr)}; {_LR_HINT}"
                )
        return lr
    if callable(lr):
        return lr
    if torch.compiler.is_compiling():
        # traced, a float lr is a symbolic value: comparing it here would specialise the graph on
        # it (a recompile per new lr); the op checks the value it receives instead
        return lr
    v = _real("lr", lr, _LR_HINT)
    if v < 0.0:
        raise ValueError(f"lr must be in [0.0, inf), got {_show(lr)}; {_LR_HINT}")
    return lr if type(lr) is float or type(lr) is int else v


def check_lr_value(value: Any, iteration: int) -> float | Tensor:
    """Check what an lr schedule returned for 0-based ``iteration``; return it as a float or a
    0-d tensor. Cheap (a float costs one comparison); a device tensor is not read (no sync)."""
    if type(value) is float and 0.0 <= value <= F32_MAX:
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise ValueError(
                f"the lr schedule returned a tensor of shape {tuple(value.shape)} and dtype "
                f"{value.dtype} at iteration {iteration}; it must return a float >= 0 or a "
                "one-element floating tensor such as torch.tensor(0.01)"
            )
        result = value.reshape(())
        if result.device.type != "cpu" or torch.compiler.is_compiling():
            return result  # reading a device tensor would synchronise
        v = result.item()
    elif type(value) is bool or not isinstance(value, numbers.Real):
        raise TypeError(
            f"the lr schedule returned {_show(value)} of type {type(value).__name__} at iteration "
            f"{iteration}; it must return a float >= 0 (or a one-element tensor), e.g. "
            "lambda step: 0.01 * 0.5 ** (step // 1000)"
        )
    else:
        try:
            v = result = float(value)
        except OverflowError:  # an int beyond float64's range
            v = result = math.inf
    if 0.0 <= v <= F32_MAX:  # NaN fails too
        return result
    raise ValueError(
        f"the lr schedule returned {_show(value)} at iteration {iteration}; a learning rate must "
        "be finite, >= 0 (a negative one climbs the loss) and at most float32's largest value "
        "3.4e38. Fix the schedule (clamp it to >= 0, check it for NaN)"
    )


def check_group(group: dict[str, Any]) -> None:
    """Validate one param group's hyperparameters, raising ValueError/TypeError with a fix.

    Numpy scalars and other ``numbers.Real`` values are stored back into ``group`` as Python
    floats (ints for the integer options). About 4 us on a default group.
    """
    try:
        _check_group(group)
    except KeyError:
        missing = [key for key in GROUP_KEYS if key not in group]
        if not missing:
            raise
        raise ValueError(
            f"the param group lacks the option(s) {missing}; every group needs all of "
            f"{list(GROUP_KEYS)}. Put the key(s) back (or rebuild the optimizer)"
        ) from None


def _check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    checked_lr = check_lr(lr)
    if checked_lr is not lr:
        group["lr"] = lr = checked_lr
    _float_option(
        group,
        "beta2_decay",
        -math.inf,
        0.0,
        low_open=True,
        high_open=False,
        hint="the decay is beta2_t = 1 - t**beta2_decay; the paper uses -0.8",
    )
    _float_option(
        group,
        "beta2_cap",
        0.0,
        1.0,
        low_open=True,
        high_open=False,
        hint="big_vision caps beta2_t at 0.999; None disables the cap",
        optional=True,
    )
    _float_option(
        group,
        "beta2",
        0.0,
        1.0,
        low_open=True,
        high_open=True,
        hint="a fixed second-moment decay such as 0.999; None uses beta2_decay",
        optional=True,
    )
    mode = group["eps1_mode"]
    if mode not in EPS1_MODES:
        raise ValueError(f"eps1_mode must be one of {EPS1_MODES}, got {_show(mode)}")
    if group["eps1"] is None:
        if mode != "clamp":
            raise ValueError(
                "eps1=None (machine epsilon) is only meaningful with eps1_mode='clamp' "
                "(torch.optim.Adafactor); pass eps1=1e-30 for the paper's additive epsilon"
            )
    else:
        eps1 = _float_option(
            group,
            "eps1",
            0.0,
            math.inf,
            low_open=True,
            high_open=True,
            hint="eps1 keeps all-zero gradient rows from dividing by zero; the paper uses 1e-30",
        )
        assert eps1 is not None
        if mode == "clamp" and eps1 * eps1 < _F32_TINY:
            raise ValueError(
                f"eps1={eps1!r} with eps1_mode='clamp' floors V_hat at eps1**2, which underflows "
                "to 0 in float32 and turns zero gradients into NaN (torch.optim.Adafactor does "
                "this); use eps1 >= 1.1e-19 or None, or eps1_mode='add'"
            )
        if mode == "clamp" and eps1 > _SQRT_F32_MAX:
            raise ValueError(
                f"eps1={eps1!r} with eps1_mode='clamp' floors V_hat at eps1**2, which overflows "
                "float32 (eps1 > 1.8e19) and fails the step; use eps1=None (machine epsilon, as "
                "torch.optim.Adafactor) or a small floor such as 1e-3"
            )
    _float_option(
        group,
        "eps2",
        0.0,
        math.inf,
        low_open=False,
        high_open=True,
        hint="eps2 floors RMS(x) in the relative step size; the paper uses 1e-3",
    )
    _float_option(
        group,
        "clip_threshold",
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        hint="update clipping divides U by max(1, RMS(U)/d); None disables it",
        optional=True,
    )
    for flag in _FLAGS:
        if type(group[flag]) is not bool:
            raise TypeError(f"{flag} must be True or False, got {_show(group[flag])}")
    if group["kahan_summation"] and group["stochastic_rounding"]:
        raise ValueError(
            "kahan_summation=True and stochastic_rounding=True are mutually exclusive: both "
            "replace the round-to-nearest write-back of bf16 parameters (Kahan keeps the rounding "
            "error in a bf16 compensation buffer, stochastic rounding randomises it); pick one"
        )
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError(
            "warmup_init=True caps the relative step size rho_t and needs relative_step=True; "
            "with relative_step=False use an lr schedule for warm-up"
        )
    _float_option(
        group,
        "beta1",
        0.0,
        1.0,
        low_open=False,
        high_open=True,
        hint="beta1 is the momentum decay (0.9 typical); None disables momentum",
        optional=True,
    )
    if group["momentum_kind"] not in MOMENTUM_MODES:
        raise ValueError(
            f"momentum_kind must be one of {MOMENTUM_MODES}, got {_show(group['momentum_kind'])}: "
            "'update' is the moving average of the applied update (T2T, transformers, optax), "
            "'normalized_update' of the clipped update before the step size (big_vision), "
            "'grad' of the gradient (Adam-style)"
        )
    for name in ("momentum_dtype", "state_dtype"):
        dtype = group[name]
        if dtype is not None and dtype not in STATE_DTYPES:
            _reject_dtype(name, dtype)
    wd = _float_option(
        group,
        "weight_decay",
        0.0,
        math.inf,
        low_open=False,
        high_open=True,
        hint="weight decay shrinks x towards 0 each step; 0 disables it",
    )
    wd_mode = group["weight_decay_mode"]
    if wd_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got "
            f"{_show(wd_mode)}; see docs/presets.md for which reference uses which"
        )
    if wd:
        _check_decay_factor(wd, wd_mode, lr)
    if group["factor_dims"] not in FACTOR_POLICIES:
        raise ValueError(
            f"factor_dims must be one of {FACTOR_POLICIES}, got {_show(group['factor_dims'])}"
        )
    _int_option(
        group,
        "min_dim_size_to_factor",
        0,
        "both factored dims must be at least this large (mesh-tf uses 128); "
        "factored=False never factors",
    )
    clipnorm = _float_option(
        group,
        "clipnorm",
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        hint="it is the max L2 norm of each gradient; None disables it",
        optional=True,
    )
    clipvalue = _float_option(
        group,
        "clipvalue",
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        hint="it bounds each gradient element; None disables it",
        optional=True,
    )
    if clipnorm is not None and clipvalue is not None:
        raise ValueError(
            f"clipnorm={group['clipnorm']!r} and clipvalue={group['clipvalue']!r} are both set; "
            "tf_keras would silently ignore clipvalue. Set only one of them"
        )
    _float_option(
        group,
        "ema_momentum",
        0.0,
        1.0,
        low_open=False,
        high_open=False,
        hint="the EMA of the weights is ema = m * ema + (1 - m) * x",
    )
    _int_option(
        group,
        "ema_overwrite_frequency",
        1,
        "x is overwritten by its EMA every this many steps; None never overwrites",
        optional=True,
    )
    freq = group["ema_overwrite_frequency"]
    if freq is not None and not group["use_ema"]:
        raise ValueError(
            f"ema_overwrite_frequency={freq!r} needs use_ema=True (tf_keras ignores it "
            "silently otherwise)"
        )


def _reject_dtype(name: str, dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {_show(dtype)}")
    fix = (
        "use torch.bfloat16 to halve the momentum's memory (big_vision does), or torch.float32"
        if name == "momentum_dtype"
        else "use torch.float32 (the default), torch.float64, or torch.bfloat16 (float32's "
        "exponent range with 8 bits of precision; enough for these averages)"
    )
    if dtype == torch.float16 and name == "state_dtype":
        why = (
            "the second-moment statistics average g^2, which overflows float16 (max 65504) for "
            "|g| > 256 and flushes to 0 for |g| < 2.4e-4 (so does eps1=1e-30); U = G/sqrt(V) "
            "is then inf or NaN at ordinary gradient scales"
        )
    elif dtype == torch.float16:
        why = (
            "the momentum of updates of size alpha_t * U_hat (often below 1e-5) loses its "
            "precision and flushes to 0 under float16's smallest value 6e-8, and a gradient "
            "momentum overflows above 65504"
        )
    elif "float8" in str(dtype) or "float4" in str(dtype):
        why = "it is a storage-only dtype: torch has no arithmetic (lerp, mul) for it, so the "
        why += "first step fails"
    else:
        why = "the state math is written and tested for float32, float64 and bfloat16 only"
    raise ValueError(f"{name}={dtype} is not supported: {why}. {fix[0].upper()}{fix[1:]}")


def _check_decay_factor(wd: float, mode: str, lr: Any) -> None:
    """The decay multiplies x by 1 - lr*wd ('lr', 'lr_before') or 1 - wd ('unscaled') each step;
    above 1 that factor is negative and flips the sign of every weight every step."""
    if mode == "unscaled" and wd > 1.0:
        raise ValueError(
            f"weight_decay={wd!r} with weight_decay_mode='unscaled' multiplies x by "
            f"1 - weight_decay = {1.0 - wd:.3g} each step, which flips the sign of every weight "
            "(and grows it beyond 2); use weight_decay <= 1 (optax and T5X use about 1e-4)"
        )
    if torch.compiler.is_compiling():  # lr is symbolic there (see check_lr)
        return
    if mode in ("lr", "lr_before") and (type(lr) is float or type(lr) is int) and lr * wd > 1.0:
        raise ValueError(
            f"weight_decay={wd!r} with lr={lr!r} and weight_decay_mode={mode!r} multiplies x by "
            f"1 - lr * weight_decay = {1.0 - lr * wd:.3g} each step, which flips the sign of "
            f"every weight; use weight_decay <= 1/lr = {1.0 / lr:.3g} (0.01 to 0.1 is typical)"
        )


def check_group_cached(
    group: dict[str, Any], snapshot: GroupSnapshot | None
) -> GroupSnapshot | None:
    """:func:`check_group` only when ``group``'s values changed since ``snapshot``.

    Call once per group per step and keep the result for the next call (``None`` the first time).
    While torch.compile traces, it runs the full check (at trace time only: dynamo guards on the
    values read, so a changed value retraces and is checked) and returns ``snapshot`` unchanged.
    A value counts as changed unless it is the same object (a float or string written back with
    an equal value triggers one full check, never a missed one); a tensor lr also when written in
    place (its version counter; writes through ``.data`` bypass it). A snapshot does not depend
    on which dict it came from, so a stale one is harmless. About 1 us when nothing changed.
    """
    if torch.compiler.is_compiling():
        # runs while dynamo traces, which guards on the values read: a change retraces and checks
        check_group(group)
        return snapshot
    try:
        values = _group_values(group)
    except KeyError:
        values = None
    if values is not None and snapshot is not None:
        lr = values[0]
        version = lr._version if isinstance(lr, Tensor) else None
        old_values, old_version = snapshot
        same = len(old_values) == len(values) and all(map(operator.is_, values, old_values))
        if same and version == old_version:
            return snapshot
    check_group(group)  # raises on a missing key too
    values = _group_values(group)  # after check_group stored numpy scalars as floats
    lr = values[0]
    return values, (lr._version if isinstance(lr, Tensor) else None)


def check_instance_options(
    *,
    impl: Any,
    carry_param_rms: Any,
    generator: Any,
    global_clipnorm: Any,
    clipnorm: Any = None,
    clipvalue: Any = None,
) -> float | None:
    """Check the optimizer-level options; return ``global_clipnorm`` as a float (or None).

    ``clipnorm``/``clipvalue`` are a group's values (the defaults at construction, each added
    group after): they must not be combined with ``global_clipnorm``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {_show(impl)}")
    if type(carry_param_rms) is not bool:
        raise TypeError(
            f"carry_param_rms must be True or False, got {_show(carry_param_rms)} of type "
            f"{type(carry_param_rms).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {_show(generator)} of type "
            f"{type(generator).__name__}; it draws the stochastic-rounding noise: pass "
            "torch.Generator(device=...).manual_seed(123) for reproducible runs"
        )
    if global_clipnorm is None:
        return None
    hint = "it is the max joint L2 norm of all gradients (Keras); None disables it"
    if type(global_clipnorm) is bool or not isinstance(global_clipnorm, numbers.Real):
        raise TypeError(
            f"global_clipnorm must be a number > 0 or None, got {_show(global_clipnorm)} of type "
            f"{type(global_clipnorm).__name__}; {hint}"
        )
    if not global_clipnorm > 0:  # also NaN
        raise ValueError(f"global_clipnorm must be a number > 0, got {_show(global_clipnorm)}")
    value = _real("global_clipnorm", global_clipnorm, hint)
    if clipnorm is not None or clipvalue is not None:
        raise ValueError(
            f"global_clipnorm={global_clipnorm!r} is set together with clipnorm or "
            f"clipvalue (clipnorm={clipnorm!r}, clipvalue={clipvalue!r}); tf_keras would "
            "silently use only one of them. Set only one"
        )
    return value


_SECOND_MOMENTS = ("row_var", "col_var", "variance")
_FINITE_STATE = ("exp_avg", "ema")
_LOAD_FIX = "Load a state dict saved from the same model and param groups"


def check_loaded_state(
    param_id: Any, key: str, value: Any, *, where: str = "load_state_dict"
) -> Any:
    """Check one entry ``state[param_id][key]`` of a state dict being loaded; return the value.

    ``step`` must be a finite number >= 0, as a one-element tensor or a plain number (returned
    as a 0-d float64 CPU tensor, the layout the step expects); ``row_var``, ``col_var`` and
    ``variance`` must be finite and >= 0, ``exp_avg`` and ``ema`` finite. Other keys pass
    through. Reads the values (one sync per tensor on a device; local shards of a DTensor).
    """
    what = f"{where}: state[{key!r}] of the parameter with id {param_id!r}"
    if key == "step":
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(
                    f"{what} is a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; "
                    f"the step count must be one number. {_LOAD_FIX}"
                )
            v = float(_local(value).item())
        elif type(value) is not bool and isinstance(value, numbers.Real):
            try:
                v = float(value)
            except OverflowError:
                v = math.inf
            value = torch.tensor(v, dtype=torch.float64)
        else:
            raise TypeError(
                f"{what} is {_show(value)} of type {type(value).__name__}; the step count must "
                f"be a number or a one-element tensor. {_LOAD_FIX}"
            )
        if not 0.0 <= v < math.inf:
            raise ValueError(
                f"{what} is {v!r}; the step count must be finite and >= 0. {_LOAD_FIX}"
            )
        return value
    if key not in _SECOND_MOMENTS and key not in _FINITE_STATE:
        return value
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"{what} is {_show(value)} of type {type(value).__name__}"
            f"{f' and dtype {value.dtype}' if isinstance(value, Tensor) else ''}; it must be a "
            f"floating tensor. {_LOAD_FIX}"
        )
    local = _local(value).detach()
    if local.numel() == 0:
        return value
    if local.dtype not in STATE_DTYPES:
        local = local.float()  # float16, float8: aminmax may lack a kernel
    low, high = (t.item() for t in torch.aminmax(local))
    if key in _SECOND_MOMENTS and not 0.0 <= low <= high < math.inf:  # NaN fails too
        raise ValueError(
            f"{what} holds values in [{low!r}, {high!r}] (or NaN); a second-moment statistic "
            f"averages g^2 and must be finite and >= 0, else U = G/sqrt(V) is NaN. {_LOAD_FIX}, "
            "or drop this parameter's state to restart its statistics"
        )
    if key in _FINITE_STATE and not -math.inf < low <= high < math.inf:
        raise ValueError(
            f"{what} holds values in [{low!r}, {high!r}] (or NaN); it must be finite, else the "
            f"parameter turns into NaN at the next step. {_LOAD_FIX}, or drop this "
            "parameter's state"
        )
    return value


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: check this rank's shard, no collective
    return to_local() if callable(to_local) else t


def check_state_ids(saved_ids: Iterable[Any], state_keys: Iterable[Any]) -> None:
    """Every key of a loaded ``state`` must be a parameter id listed in its ``param_groups``."""
    known = set(saved_ids)
    unknown = [key for key in state_keys if key not in known]
    if unknown:
        listed = _sorted(known)
        raise ValueError(
            f"load_state_dict: state has entries for parameter id(s) {_sorted(unknown)[:10]} "
            f"that no param group lists (the groups list {len(known)} ids: {listed[:10]}"
            f"{' ...' * (len(known) > 10)}). {_LOAD_FIX}"
        )


def _sorted(keys: Iterable[Any]) -> list[Any]:
    try:
        return sorted(keys)
    except TypeError:  # mixed key types
        return sorted(keys, key=repr)


def check_added_group(group: dict[str, Any], index: int, instance: dict[str, Any]) -> None:
    """A param group added after construction (``index``): its options, those it combines with
    the optimizer's ``instance`` options (once the constructor set them), and its parameters."""
    check_group(group)
    if instance.get("global_clipnorm") is not None:
        check_instance_options(
            impl=instance["impl"],
            carry_param_rms=instance["carry_param_rms"],
            generator=instance["generator"],
            global_clipnorm=instance["global_clipnorm"],
            clipnorm=group["clipnorm"],
            clipvalue=group["clipvalue"],
        )
    for i, p in enumerate(group["params"]):
        check_param(p, f"param_groups[{index}]['params'][{i}]", group["factored"])


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


def resolve_lr(lr: float | Tensor | Callable[[int], Any], iteration: int) -> float | Tensor:
    """The learning rate of the update at 0-based ``iteration`` (Keras' schedule convention).

    A schedule's output is checked by :func:`check_lr_value` every call."""
    if isinstance(lr, Tensor):
        return lr.reshape(())
    if callable(lr):
        return check_lr_value(lr(iteration), iteration)
    return lr
