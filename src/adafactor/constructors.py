"""Constructors with each reference implementation's own signature, and errors for Adam habits.

Every ``from_*`` function takes the optimizer class first; :class:`~adafactor.Adafactor` exposes
them as classmethods (``Adafactor.from_torch(params, ...)``). Each accepts exactly the keyword
names, defaults and argument order of its reference, validates them as the reference does (the
same exception types for the reference's own error cases), and maps them onto the matching
preset (``docs/presets.md``). Param-group dicts may carry the reference's group keys; they are
translated per group, so no key of the reference is silently ignored.

Options a reference has and this optimizer cannot compute raise ``NotImplementedError`` naming
the option (optax's and big_vision's ``decay_offset``, timm's ``caution``), instead of being
dropped.

:func:`reject_foreign_kwargs` turns keywords of other optimizers (Adam's ``betas``, ``eps``,
``amsgrad``; torch's ``foreach``; Keras' and optax's ``learning_rate``) into a ``TypeError`` that
names the equivalent; :func:`warn_explicit_lr_with_relative_step` warns when ``lr`` silently
means "the cap of the relative step".
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from . import distributed

if TYPE_CHECKING:
    from .optimizer import Adafactor, LRSchedule

__all__ = [
    "LR_CAP_PRESETS",
    "from_big_vision",
    "from_keras",
    "from_optax",
    "from_timm",
    "from_torch",
    "from_transformers",
    "reject_foreign_kwargs",
    "translate_torch_group",
    "warn_explicit_lr_with_relative_step",
]

_A = TypeVar("_A", bound="Adafactor")
Params = Iterable[Tensor] | Iterable[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _real(name: str, value: Any, where: str) -> float:
    """``value`` as a float; TypeError (as the references' comparisons raise) if it is not real."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}{name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def _pair(name: str, value: Any, where: str) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(
            f"{where}{name} must be a pair (eps1, eps2), got {value!r}; eps1 regularises g^2, "
            "eps2 floors RMS(x) in the step size"
        )
    return value[0], value[1]


def _materialize(params: Any) -> Any:
    """A list of ``params`` (a tensor is passed on unchanged: the base class rejects it)."""
    if isinstance(params, Tensor):
        return params
    return list(params)


def _is_groups(params: Any) -> bool:
    return isinstance(params, list) and bool(params) and all(isinstance(g, dict) for g in params)


def _group_tensors(group: dict[str, Any]) -> list[Tensor]:
    """The tensors of one group, turning a one-shot iterator into a list first (in place)."""
    ps = group.get("params")
    if isinstance(ps, Tensor):
        return [ps]
    if ps is None or isinstance(ps, set):  # the base class raises for these
        return []
    if not isinstance(ps, (list, tuple)):
        group["params"] = ps = list(ps)
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in ps]


def _tensors(params: Any) -> list[Tensor]:
    """Every tensor of a materialized params list (plain, named or groups)."""
    if isinstance(params, Tensor):
        return []
    if _is_groups(params):
        return [t for g in params for t in _group_tensors(g) if isinstance(t, Tensor)]
    out = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
    return [t for t in out if isinstance(t, Tensor)]


def _map_groups(params: Any, translate: Callable[[dict[str, Any], str], dict[str, Any]]) -> Any:
    """Apply ``translate(group, where)`` to every param-group dict of a materialized params."""
    if not _is_groups(params):
        return params
    return [translate(dict(g), f"param_groups[{i}]: ") for i, g in enumerate(params)]


def _move(group: dict[str, Any], theirs: str, ours: str, value: Any, where: str) -> None:
    """Set our key ``ours`` from the reference's ``theirs``, refusing a group that sets both."""
    if ours in group:
        raise ValueError(
            f"{where}the group sets both {theirs} (the reference's name, giving {ours}="
            f"{value!r}) and {ours}={group[ours]!r}; set only one of them"
        )
    group[ours] = value


def _no_decay_offset(decay_offset: Any, where: str, ref: str) -> None:
    if isinstance(decay_offset, bool) or not isinstance(decay_offset, numbers.Integral):
        raise TypeError(f"{where}decay_offset must be an int, got {decay_offset!r}")
    if decay_offset != 0:
        raise NotImplementedError(
            f"{where}decay_offset={decay_offset!r} ({ref}: beta2_t restarts its schedule "
            "decay_offset steps in) is not supported; the beta2 schedule here always counts from "
            "the first step. Use decay_offset=0, or beta2_cap= to bound beta2_t"
        )


def _no_caution(caution: Any, where: str) -> None:
    if caution:
        raise NotImplementedError(
            f"{where}caution={caution!r} (timm's 'Cautious Optimizers' mask on the momentum) is "
            "not supported; use caution=False"
        )


_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype(name: str, value: Any, where: str, allowed: Sequence[str]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = str(getattr(value, "name", value))  # numpy / jax dtypes have a .name
    if key in allowed:
        return _DTYPE_NAMES[key]
    raise ValueError(
        f"{where}{name}={value!r} is not supported; use a torch.dtype or one of {list(allowed)}"
    )


# ---------------------------------------------------------------------------------------------
# torch.optim.Adafactor
# ---------------------------------------------------------------------------------------------
def _torch_check(group: Mapping[str, Any], where: str) -> None:
    """torch.optim.Adafactor's checks (ValueError for a bad value, TypeError for a non-number),
    with torch's wording first so its own error regexes match."""
    if "lr" in group:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(
                    f"{where}Tensor lr must be 1-element, got lr of shape {tuple(lr.shape)}"
                )
            value = float(lr)
        elif callable(lr):
            raise TypeError(
                f"{where}lr={lr!r}: torch.optim.Adafactor takes a float or a one-element tensor; "
                "for a schedule called with the 0-based step use Adafactor(params, "
                "preset='torch', lr=schedule), or a torch LR scheduler"
            )
        else:
            value = _real("lr", lr, where)
        if not 0.0 <= value:
            raise ValueError(f"{where}Learning rate should be >= 0 but is: {lr!r}")
    if "beta2_decay" in group:
        decay = _real("beta2_decay", group["beta2_decay"], where)
        if not 0.0 >= decay:
            raise ValueError(
                f"{where}beta2_decay should be <= 0 but is: {group['beta2_decay']!r} "
                "(beta2_t = 1 - t**beta2_decay; the paper uses -0.8)"
            )
    if "eps" in group:
        eps1, eps2 = _pair("eps", group["eps"], where)
        if eps1 is not None and not 0.0 <= _real("eps[0]", eps1, where):
            raise ValueError(
                f"{where}epsilon1 should be >= 0 but is: {eps1!r} (eps={tuple(group['eps'])!r}; "
                "None means the parameter dtype's machine epsilon)"
            )
        if not 0.0 <= _real("eps[1]", eps2, where):
            raise ValueError(
                f"{where}epsilon2 should be >= 0 but is: {eps2!r} (eps={tuple(group['eps'])!r})"
            )
    if "d" in group:
        d = _real("d", group["d"], where)
        if not 1.0 <= d:
            raise ValueError(
                f"{where}Clipping threshold d should be >= 1 but is: {group['d']!r} (d is the "
                "update clipping threshold; torch.optim.Adafactor allows no d below 1, "
                "Adafactor(preset='torch', clip_threshold=...) does)"
            )
    if "weight_decay" in group:
        wd = _real("weight_decay", group["weight_decay"], where)
        if not 0.0 <= wd:
            raise ValueError(
                f"{where}weight_decay should be >= 0 but is: {group['weight_decay']!r}"
            )


def _clip_from_d(d: Any) -> float | None:
    """torch's d as our clip_threshold: d = inf never clips, which is clip_threshold=None."""
    return None if d == math.inf else d


def translate_torch_group(group: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A torch.optim.Adafactor param group (or its options) with our keys.

    ``eps=(eps1, eps2)`` becomes ``eps1``/``eps2``, ``d`` becomes ``clip_threshold``, ``foreach``
    is dropped (this optimizer picks its own implementation); every other key is kept. The
    torch-named values are checked as torch checks them; a group that also sets our name for the
    same option raises ValueError.
    """
    out = dict(group)
    _torch_check(out, where)
    if "eps" in out:
        eps1, eps2 = out.pop("eps")
        _move(out, "eps", "eps1", eps1, where)
        _move(out, "eps", "eps2", eps2, where)
    if "d" in out:
        _move(out, "d", "clip_threshold", _clip_from_d(out.pop("d")), where)
    out.pop("foreach", None)
    return out


def _refuse_complex(params: Any) -> None:
    for i, p in enumerate(_tensors(params)):
        if p.is_complex():
            raise RuntimeError(
                f"Adafactor does not support complex parameters (parameter {i}, dtype {p.dtype}, "
                "as torch.optim.Adafactor raises at its first step); optimize "
                "torch.view_as_real(param) instead"
            )


def from_torch(
    cls: type[_A],
    params: Params,
    lr: float | Tensor = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
) -> _A:
    """``torch.optim.Adafactor`` with torch's signature, defaults and checks (the "torch" preset).

    ``eps=(eps1, eps2)`` maps to ``eps1``/``eps2`` under ``eps1_mode="clamp"`` (``eps1=None``:
    the parameter dtype's machine epsilon), ``d`` to ``clip_threshold`` (``d=inf`` disables
    clipping), and ``lr`` is, as in torch, the cap of the relative step
    :math:`\\rho_t = \\min(\\text{lr}, 1/\\sqrt t)`, scaled by RMS(x). ``foreach`` is accepted and
    has no effect: this optimizer picks its own implementation (``impl="auto"``); torch's
    ``foreach=True`` only changes rounding. Param-group dicts may carry torch's group keys
    (``eps``, ``d``, ``foreach``); they are translated per group.

    Raises what torch raises for its own error cases (``ValueError`` for an out-of-range value,
    ``TypeError`` for a non-number); a complex parameter raises ``RuntimeError`` here rather than
    at the first step. Unlike torch, an ``eps1`` whose square underflows in float32 (e.g.
    ``eps=(1e-30, 1e-3)``, where torch turns zero gradients into NaN) raises ``ValueError``.
    """
    _torch_check(
        {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d, "weight_decay": weight_decay},
        "",
    )
    del foreach  # this optimizer chooses its implementation itself
    eps1, eps2 = eps
    params = _materialize(params)
    params = _map_groups(params, translate_torch_group)
    _refuse_complex(params)
    return cls(
        params,
        lr=lr,
        preset="torch",
        beta2_decay=beta2_decay,
        eps1=eps1,
        eps2=eps2,
        clip_threshold=_clip_from_d(d),
        weight_decay=weight_decay,
        maximize=maximize,
    )


# ---------------------------------------------------------------------------------------------
# transformers.optimization.Adafactor
# ---------------------------------------------------------------------------------------------
_HF_CONSTANT_CAP = 1e-2  # transformers' rho_t = min(1e-2, 1/sqrt(t)) in relative mode


def _hf_lr(lr: Any, relative_step: Any, warmup_init: Any, where: str) -> None:
    if lr is not None and relative_step:
        raise ValueError(
            f"{where}Cannot combine manual `lr` and `relative_step=True` options: lr={lr!r} "
            "would be ignored by transformers (rho_t = min(1e-2, 1/sqrt(t))). Pass "
            "relative_step=False (and scale_parameter=False for a plain learning rate), or lr=None"
        )
    if warmup_init and not relative_step:
        raise ValueError(
            f"{where}`warmup_init=True` requires `relative_step=True` (warmup_init caps the "
            "relative step by 1e-6 * t)"
        )
    if lr is None and not relative_step:
        raise ValueError(
            f"{where}lr=None with relative_step=False leaves no step size (transformers fails at "
            "the first step); pass lr=..."
        )


def from_transformers(
    cls: type[_A],
    params: Params,
    lr: float | None = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: bool = True,
    warmup_init: bool = False,
) -> _A:
    """``transformers.optimization.Adafactor`` with its signature, defaults and checks (the
    "transformers" preset; fairseq's Adafactor computes the same).

    ``lr=None`` (with ``relative_step=True``) means transformers' relative step
    :math:`\\rho_t = \\min(10^{-2}, 1/\\sqrt t)` (:math:`\\min(10^{-6}t, 1/\\sqrt t)` with
    ``warmup_init``); an explicit ``lr`` needs ``relative_step=False`` and is then the step size
    (times RMS(x) while ``scale_parameter``). As in transformers, ``lr`` together with
    ``relative_step=True``, or ``warmup_init`` without it, raises ``ValueError``; so does
    ``lr=None`` with ``relative_step=False`` (transformers fails at the first step there).
    ``eps=(eps1, eps2)`` maps to ``eps1``/``eps2``, ``decay_rate`` to ``beta2_decay``; weight
    decay is :math:`x(1-\\alpha_t\\lambda)`. Param-group dicts may carry ``eps``, ``decay_rate``
    and ``lr``; they are translated per group.
    """
    _hf_lr(lr, relative_step, warmup_init, "")
    eps1, eps2 = _pair("eps", eps, "")

    def translate(group: dict[str, Any], where: str) -> dict[str, Any]:
        if "eps" in group:
            g1, g2 = _pair("eps", group.pop("eps"), where)
            _move(group, "eps", "eps1", g1, where)
            _move(group, "eps", "eps2", g2, where)
        if "decay_rate" in group:
            _move(group, "decay_rate", "beta2_decay", group.pop("decay_rate"), where)
        rel = group.get("relative_step", relative_step)
        group_lr = group.pop("lr", None) if "lr" in group else (None if rel else lr)
        _hf_lr(group_lr, rel, group.get("warmup_init", warmup_init), where)
        group["lr"] = _HF_CONSTANT_CAP if rel else group_lr
        return group

    params = _map_groups(_materialize(params), translate)
    kwargs: dict[str, Any] = {} if lr is None else {"lr": lr}
    return cls(
        params,
        preset="transformers",
        **kwargs,
        eps1=eps1,
        eps2=eps2,
        clip_threshold=clip_threshold,
        beta2_decay=decay_rate,
        beta1=beta1,
        weight_decay=weight_decay,
        scale_parameter=scale_parameter,
        relative_step=relative_step,
        warmup_init=warmup_init,
    )


# ---------------------------------------------------------------------------------------------
# timm.optim.Adafactor
# ---------------------------------------------------------------------------------------------
def _timm_leading_dims(shape: tuple[int, ...], size: int) -> bool:
    """timm factors dims (0, 1) of a rank > 2 tensor whose first two dims both exceed ``size``."""
    return len(shape) > 2 and shape[0] > size and shape[1] > size


def _timm_min_dim(size: Any, where: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"{where}min_dim_size_to_factor must be an int >= 0, got {size!r}")
    return int(size) + 1  # timm factors when both dims are > size; ours when both are >= it


def from_timm(
    cls: type[_A],
    params: Params,
    lr: float | None = None,
    eps: float = 1e-30,
    eps_scale: float = 1e-3,
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    betas: tuple[float, float] | None = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    warmup_init: bool = False,
    min_dim_size_to_factor: int = 16,
    caution: bool = False,
) -> _A:
    """``timm.optim.Adafactor`` (timm 1.0.31) with its signature, defaults and checks.

    ``lr=None`` is timm's relative step, :math:`\\rho_t = \\min(10^{-2}, 1/\\sqrt t)` times
    :math:`\\max(\\text{eps\\_scale}, \\mathrm{RMS}(x))` while ``scale_parameter``; an explicit
    ``lr`` is the step size itself, with **no** RMS(x) scaling whatever ``scale_parameter`` says
    (unlike transformers). ``warmup_init`` with an explicit ``lr`` raises ``ValueError`` as in
    timm. ``betas[0]`` is the momentum decay (``betas[1]`` is unused, as in timm); ``eps`` is
    eps1, ``eps_scale`` eps2, ``decay_rate`` beta2_decay; weight decay is
    :math:`x(1-\\alpha_t\\lambda)`. timm factors the last two dims when both exceed
    ``min_dim_size_to_factor``; a tensor of rank > 2 whose *first* two dims both exceed it (a
    conv weight with more than 16 in and out channels) is factored over those dims by timm,
    which no option here reproduces: such tensors get a warning and the last-two-dims rule.
    Not reproduced either: timm writes the step size into ``group["lr"]`` in relative mode.
    ``caution=True`` raises ``NotImplementedError``.
    """
    relative_step = lr is None
    if warmup_init and not relative_step:
        raise ValueError(
            f"warmup_init requires relative_step=True: with lr={lr!r} timm uses lr as the step "
            "size; pass lr=None for the relative step and its warm-up"
        )
    _no_caution(caution, "")
    beta1 = None if betas is None else betas[0]
    min_size = _timm_min_dim(min_dim_size_to_factor, "")

    def translate(group: dict[str, Any], where: str) -> dict[str, Any]:
        for theirs, ours in (("eps", "eps1"), ("eps_scale", "eps2"), ("decay_rate", "beta2_decay")):
            if theirs in group:
                _move(group, theirs, ours, group.pop(theirs), where)
        if "betas" in group:
            gb = group.pop("betas")
            _move(group, "betas", "beta1", None if gb is None else gb[0], where)
        if "min_dim_size_to_factor" in group:
            group["min_dim_size_to_factor"] = _timm_min_dim(group["min_dim_size_to_factor"], where)
        _no_caution(group.pop("caution", False), where)
        if relative_step:
            if group.get("lr") is not None:
                raise ValueError(
                    f"{where}lr={group['lr']!r}: with the optimizer's lr=None timm overwrites a "
                    "group's lr with its relative step size; give the whole optimizer an lr, or "
                    "drop the group's"
                )
            group.pop("lr", None)
        else:
            if "lr" in group and group["lr"] is None:
                raise ValueError(
                    f"{where}lr=None in a group of an optimizer with lr={lr!r}: timm decides the "
                    "relative step once, from the constructor's lr"
                )
            if group.get("warmup_init"):
                raise ValueError(f"{where}warmup_init requires relative_step=True (lr=None)")
            group["scale_parameter"] = False  # timm never scales an explicit lr by RMS(x)
        return group

    params = _map_groups(_materialize(params), translate)
    _warn_timm_leading_dims(params, min_size)
    step: dict[str, Any] = (
        {"scale_parameter": scale_parameter}
        if relative_step
        else {"lr": lr, "scale_parameter": False}
    )
    return cls(
        params,
        preset="transformers",
        **step,
        relative_step=relative_step,
        warmup_init=warmup_init,
        eps1=eps,
        eps2=eps_scale,
        clip_threshold=clip_threshold,
        beta2_decay=decay_rate,
        beta1=beta1,
        weight_decay=weight_decay,
        min_dim_size_to_factor=min_size,
    )


def _warn_timm_leading_dims(params: Any, default_min: int) -> None:
    if isinstance(params, Tensor):
        return
    groups = params if _is_groups(params) else [{"params": params}]
    odd = []
    for group in groups:
        if "factor_dims" in group:  # the caller chose the factoring of this group
            continue
        size = group.get("min_dim_size_to_factor", default_min) - 1
        odd += [
            tuple(t.shape)
            for t in _group_tensors(group)
            if isinstance(t, Tensor) and _timm_leading_dims(tuple(t.shape), size)
        ]
    if odd:
        warnings.warn(
            f"from_timm: {len(odd)} tensor(s) of rank > 2 (shapes {odd[:4]}"
            f"{' ...' if len(odd) > 4 else ''}) have first two dims above min_dim_size_to_factor; "
            "timm factors their second moment over dims (0, 1), this optimizer over the last two "
            "dims (or not at all when those are small), so their trajectories differ from "
            "timm's. To factor them over their two largest dims instead, put them in a param "
            "group with factor_dims='largest2'",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# timm.optim.AdafactorBigVision
# ---------------------------------------------------------------------------------------------
def _bv_scalar(name: str, value: Any, where: str) -> float:
    """timm's _validate_scalar: a number or one-element tensor >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{where}{name} must be a scalar or scalar tensor, got shape {tuple(value.shape)}"
            )
        number = float(value.detach().cpu())
    else:
        number = _real(name, value, where)
    if not number >= 0.0:
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be >= 0)")
    return number


def _bv_weight_decay(
    weight_decay: Any, unscaled_wd: bool, corrected: bool, max_lr: float, where: str
) -> dict[str, Any]:
    """timm's four decay forms as (weight_decay, weight_decay_mode)."""
    wd = _bv_scalar("weight_decay", weight_decay, where)
    if corrected and max_lr <= 0:
        raise ValueError(
            f"{where}Corrected weight decay requires a positive max lr, got {max_lr}. "
            "Construct the optimizer with the peak lr."
        )
    if not wd:
        return {"weight_decay": 0.0}
    if not corrected:
        return {"weight_decay": wd, "weight_decay_mode": "unscaled" if unscaled_wd else "lr"}
    if unscaled_wd:  # x (1 - (lr_t / max_lr) wd) = x (1 - lr_t (wd / max_lr))
        return {"weight_decay": wd / max_lr, "weight_decay_mode": "lr"}
    raise NotImplementedError(
        f"{where}corrected_weight_decay=True with unscaled_wd=False decays by lr_t**2 / max_lr * "
        "weight_decay, which no weight_decay_mode computes; use unscaled_wd=True (the decay "
        "big_vision applies: (lr_t / max_lr) * weight_decay)"
    )


def from_big_vision(
    cls: type[_A],
    params: Params,
    lr: float = 1.0,
    min_dim_size_to_factor: int = 16,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    beta2_cap: float = 0.999,
    momentum: float | None = 0.9,
    momentum_dtype: str | torch.dtype = torch.bfloat16,
    eps: float | None = None,
    weight_decay: float = 0.0,
    clipping_threshold: float | None = None,
    unscaled_wd: bool = False,
    caution: bool = False,
    corrected_weight_decay: bool = False,
) -> _A:
    """``timm.optim.AdafactorBigVision`` (timm 1.0.31) with its signature, defaults and checks
    (the "big_vision" preset).

    ``decay_rate`` is the positive exponent (:math:`\\hat\\beta_{2t} = \\min(\\text{beta2\\_cap},
    1 - t^{-\\text{decay\\_rate}})`, ``beta2_decay=-decay_rate``), ``momentum`` the decay of the
    momentum of the clipped update before the step size (``beta1``, kept in ``momentum_dtype``:
    a torch dtype or "float32", "bfloat16", "float16"), ``eps`` eps1 (None: 1e-30; timm's 1e-7
    for float16 gradients is not needed because the math here runs in float32),
    ``clipping_threshold`` the update clipping threshold (None: none). Weight decay:
    :math:`x(1-\\text{lr}_t\\lambda)`, or :math:`x(1-\\lambda)` with ``unscaled_wd``; with
    ``corrected_weight_decay`` and ``unscaled_wd``, :math:`x(1-(\\text{lr}_t/\\text{lr})\\lambda)`
    (``lr``: this constructor's lr, the peak of an external schedule).

    ``decay_offset != 0``, ``caution=True`` and ``corrected_weight_decay`` without
    ``unscaled_wd`` (a decay by :math:`\\text{lr}_t^2`) raise ``NotImplementedError``. Param-group
    dicts may carry timm's group keys; they are translated per group.
    """
    max_lr = _bv_scalar("learning rate", lr, "")
    _no_decay_offset(decay_offset, "", "big_vision")
    _no_caution(caution, "")
    allowed = ("float32", "bfloat16", "float16")
    defaults = {
        "weight_decay": weight_decay,
        "unscaled_wd": unscaled_wd,
        "corrected_weight_decay": corrected_weight_decay,
    }

    def translate(group: dict[str, Any], where: str) -> dict[str, Any]:
        if "decay_rate" in group:
            _move(
                group,
                "decay_rate",
                "beta2_decay",
                -_real("decay_rate", group.pop("decay_rate"), where),
                where,
            )
        if "decay_offset" in group:
            _no_decay_offset(group.pop("decay_offset"), where, "big_vision")
        _no_caution(group.pop("caution", False), where)
        if "momentum" in group:
            _move(group, "momentum", "beta1", group.pop("momentum"), where)
        if "momentum_dtype" in group:
            group["momentum_dtype"] = _dtype(
                "momentum_dtype", group["momentum_dtype"], where, allowed
            )
        if "eps" in group:
            ge = group.pop("eps")
            _move(group, "eps", "eps1", 1e-30 if ge is None else ge, where)
        if "clipping_threshold" in group:
            _move(
                group,
                "clipping_threshold",
                "clip_threshold",
                group.pop("clipping_threshold"),
                where,
            )
        if any(k in group for k in ("unscaled_wd", "corrected_weight_decay", "weight_decay")):
            wd = {k: group.pop(k, v) for k, v in defaults.items()}
            group.update(
                _bv_weight_decay(
                    wd["weight_decay"],
                    bool(wd["unscaled_wd"]),
                    bool(wd["corrected_weight_decay"]),
                    max_lr,
                    where,
                )
            )
        return group

    params = _map_groups(_materialize(params), translate)
    return cls(
        params,
        lr=lr,
        preset="big_vision",
        min_dim_size_to_factor=min_dim_size_to_factor,
        beta2_decay=-_real("decay_rate", decay_rate, ""),
        beta2_cap=beta2_cap,
        beta1=momentum,
        momentum_dtype=_dtype("momentum_dtype", momentum_dtype, "", allowed),
        eps1=1e-30 if eps is None else eps,
        clip_threshold=clipping_threshold,
        **_bv_weight_decay(weight_decay, unscaled_wd, corrected_weight_decay, max_lr, ""),
    )


# ---------------------------------------------------------------------------------------------
# optax.adafactor
# ---------------------------------------------------------------------------------------------
_OPTAX_GROUP_KEYS = {
    "learning_rate": "lr",
    "multiply_by_parameter_scale": "scale_parameter",
    "clipping_threshold": "clip_threshold",
    "momentum": "beta1",
    "dtype_momentum": "momentum_dtype",
    "weight_decay_rate": "weight_decay",
    "eps": "eps1",
}


def _optax_wd(rate: Any, where: str) -> float:
    if rate is None:
        return 0.0
    if callable(rate):
        raise NotImplementedError(
            f"{where}weight_decay_rate={rate!r} is a schedule, which is not supported; pass a "
            "constant rate (optax decays by it without the learning rate: x - rate * x)"
        )
    return _real("weight_decay_rate", rate, where)


def _optax_mask(params: Any, mask: Any) -> Any:
    """Split the params into groups that decay and groups with ``weight_decay=0``."""
    groups = params if _is_groups(params) else [{"params": params}]
    flat = [t for g in groups for t in _group_tensors(g)]
    if callable(mask):
        flags = [bool(mask(t)) for t in flat]
    else:
        flags = [bool(f) for f in mask]
        if len(flags) != len(flat):
            raise ValueError(
                f"weight_decay_mask has {len(flags)} entries for {len(flat)} parameters; give one "
                "bool per parameter, in order, or a callable(param) -> bool"
            )
    out, k = [], 0
    for group in groups:
        items = group["params"]
        items = [items] if isinstance(items, Tensor) else list(items)
        keep, skip = [], []
        for item in items:
            (keep if flags[k] else skip).append(item)
            k += 1
        rest = {key: v for key, v in group.items() if key != "params"}
        if keep:
            out.append({**rest, "params": keep})
        if skip:
            out.append({**rest, "params": skip, "weight_decay": 0.0})
    return out


def from_optax(
    cls: type[_A],
    params: Params,
    learning_rate: float | Tensor | LRSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: torch.dtype | str = torch.float32,
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Callable[[Tensor], bool] | Sequence[bool] | None = None,
) -> _A:
    """``optax.adafactor`` (optax 0.2.8) with its signature and defaults (the "optax" preset).

    ``learning_rate=None`` means no learning-rate scaling (lr = 1), a schedule is called with
    the 0-based step as optax calls it with its count; ``decay_rate`` is the positive exponent
    (:math:`\\hat\\beta_{2t} = 1 - t^{-\\text{decay\\_rate}}`, ``beta2_decay=-decay_rate``);
    ``multiply_by_parameter_scale`` is ``scale_parameter``, ``clipping_threshold``
    ``clip_threshold``, ``momentum`` ``beta1`` (the momentum of the scaled update, kept in
    ``dtype_momentum``), ``eps`` eps1. ``weight_decay_rate`` decays without the learning rate,
    :math:`x - \\lambda x`, as optax does. ``weight_decay_mask`` is a callable(param) -> bool or
    one bool per parameter in order (optax's pytree of bools, flattened); masked-out parameters
    go to a separate param group with ``weight_decay=0``, after the decayed ones of their group.

    ``decay_offset != 0`` and a ``weight_decay_rate`` schedule raise ``NotImplementedError``.
    Param-group dicts may carry optax's names, which are translated per group.
    """
    _no_decay_offset(decay_offset, "", "optax")
    wd = _optax_wd(weight_decay_rate, "")
    dtypes = ("float32", "bfloat16", "float16", "float64")

    def translate(group: dict[str, Any], where: str) -> dict[str, Any]:
        for theirs, ours in _OPTAX_GROUP_KEYS.items():
            if theirs in group:
                value = group.pop(theirs)
                if theirs == "weight_decay_rate":
                    value = _optax_wd(value, where)
                elif theirs == "dtype_momentum":
                    value = _dtype(theirs, value, where, dtypes)
                elif theirs == "learning_rate" and value is None:
                    value = 1.0
                _move(group, theirs, ours, value, where)
        if "decay_rate" in group:
            rate = -_real("decay_rate", group.pop("decay_rate"), where)
            _move(group, "decay_rate", "beta2_decay", rate, where)
        if "decay_offset" in group:
            _no_decay_offset(group.pop("decay_offset"), where, "optax")
        return group

    params = _map_groups(_materialize(params), translate)
    if weight_decay_mask is not None and wd and not isinstance(params, Tensor):
        params = _optax_mask(params, weight_decay_mask)
    kwargs: dict[str, Any] = {} if learning_rate is None else {"lr": learning_rate}
    return cls(
        params,
        preset="optax",
        **kwargs,
        min_dim_size_to_factor=min_dim_size_to_factor,
        beta2_decay=-_real("decay_rate", decay_rate, ""),
        scale_parameter=multiply_by_parameter_scale,
        clip_threshold=clipping_threshold,
        beta1=momentum,
        momentum_dtype=_dtype("dtype_momentum", dtype_momentum, "", dtypes),
        weight_decay=wd,
        eps1=eps,
        factored=factored,
    )


# ---------------------------------------------------------------------------------------------
# tf_keras / Keras 3 (moved from Adafactor.from_keras, unchanged)
# ---------------------------------------------------------------------------------------------
def from_keras(
    cls: type[_A],
    params: Params,
    learning_rate: float | Tensor | LRSchedule = 0.001,
    beta_2_decay: float = -0.8,
    epsilon_1: float = 1e-30,
    epsilon_2: float = 0.001,
    clip_threshold: float = 1.0,
    relative_step: bool = True,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    jit_compile: bool = True,
    name: str = "Adafactor",
    mesh: Any = None,
) -> _A:
    """``tf_keras.optimizers.Adafactor`` with Keras' names and defaults (the "keras" preset).

    As in Keras, the step size is always :math:`\\min(\\text{lr}_t, 1/\\sqrt t)` scaled by
    RMS(x): Keras ignores ``relative_step``, and so does this constructor (with a warning
    when it is False; use ``Adafactor(preset="keras", relative_step=False)`` for a constant
    step). Unlike tf_keras the state stays sublinear: no full-size ``v`` is stored.
    ``jit_compile`` selects the fast path (``impl="auto"``) or the reference math;
    ``mesh`` is the torch DeviceMesh the parameters are sharded on.
    """
    if not relative_step:
        warnings.warn(
            "tf_keras ignores relative_step=False (rho_t = min(lr, 1/sqrt(t)) either way) and "
            "from_keras reproduces that; use Adafactor(preset='keras', relative_step=False) "
            "for a constant step size",
            UserWarning,
            stacklevel=2,
        )
    opt = cls(
        params,
        lr=learning_rate,
        preset="keras",
        beta2_decay=beta_2_decay,
        eps1=epsilon_1,
        eps2=epsilon_2,
        clip_threshold=clip_threshold,
        weight_decay=0.0 if weight_decay is None else weight_decay,
        clipnorm=clipnorm,
        clipvalue=clipvalue,
        global_clipnorm=global_clipnorm,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        ema_overwrite_frequency=ema_overwrite_frequency,
        impl="auto" if jit_compile else "reference",
    )
    opt.name = name
    opt.mesh = mesh
    if mesh is not None:
        distributed.check_mesh([p for g in opt.param_groups for p in g["params"]], mesh)
    return opt


# ---------------------------------------------------------------------------------------------
# keywords of other optimizers
# ---------------------------------------------------------------------------------------------
def _betas_hint(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        b1, b2 = value
        first = "beta1=None (no momentum)" if not b1 else f"beta1={b1!r}"
        second = f"beta2={b2!r}"
    else:
        first, second = "beta1=...", "beta2=..."
    return (
        f"use {first} for momentum (Adafactor keeps none by default, unlike Adam). beta2 has no "
        "fixed value here: the second-moment decay follows beta2_t = 1 - t**beta2_decay "
        f"(beta2_decay=-0.8); pass {second} for a fixed decay with Adam's bias correction folded "
        "in, or beta2_cap= to cap the schedule"
    )


def _eps_hint(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return (
            f"use eps1={value[0]!r}, eps2={value[1]!r} (eps1 regularises g^2, eps2 floors RMS(x) "
            "in the step size); for torch.optim.Adafactor's eps pair, where eps1 clamps instead "
            "of adding, use Adafactor.from_torch(params, eps=...), for transformers' "
            "Adafactor.from_transformers(params, eps=...)"
        )
    return (
        "Adafactor has two epsilons: eps1, added to g^2 (default 1e-30), and eps2, the floor "
        "of RMS(x) in the step size (default 1e-3). Adam's eps (added to sqrt(v)) has no "
        f"counterpart: eps1={value!r} would regularise g^2, which is much stronger. For "
        "torch.optim.Adafactor's eps=(eps1, eps2) use Adafactor.from_torch(params, eps=...)"
    )


def _momentum_hint(value: Any) -> str:
    if isinstance(value, str):
        return f"the momentum semantics option is momentum_kind={value!r} (renamed from momentum)"
    if value is None:
        return "beta1=None (the default) already keeps no momentum"
    return (
        f"use beta1={value!r} (the momentum decay; momentum_kind= says what it averages); "
        "Adafactor.from_optax and Adafactor.from_big_vision take momentum= with their meaning"
    )


def _decay_rate_hint(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0:
        return (
            f"use beta2_decay={-value!r}: optax and big_vision write the exponent positive "
            "(beta2_t = 1 - t**-decay_rate); or Adafactor.from_optax / Adafactor.from_big_vision"
            "(params, decay_rate=...)"
        )
    return (
        f"use beta2_decay={value!r} (transformers' decay_rate, beta2_t = 1 - t**decay_rate), or "
        "Adafactor.from_transformers(params, decay_rate=...)"
    )


def _impl_hint(key: str) -> str:
    return (
        "Adafactor picks its own implementation: impl='auto' (the default: the fused CPU kernel "
        "where it builds, else the reference math), 'reference', 'fused' or 'triton'; drop "
        f"{key}="
    )


_HINTS: dict[str, Callable[[Any], str]] = {
    "betas": _betas_hint,
    "eps": _eps_hint,
    "learning_rate": lambda v: (
        f"use lr={v!r}; Adafactor.from_keras(params, learning_rate=...) and "
        "Adafactor.from_optax(params, learning_rate=...) take Keras' and optax's names"
    ),
    "momentum": _momentum_hint,
    "decay_rate": _decay_rate_hint,
    "d": lambda v: (
        f"use clip_threshold={v!r} (torch.optim.Adafactor's d, the update clipping threshold), "
        "or Adafactor.from_torch(params, d=...)"
    ),
    "foreach": lambda v: _impl_hint("foreach"),
    "fused": lambda v: _impl_hint("fused"),
    "amsgrad": lambda v: (
        "Adafactor has no AMSGrad variant (it keeps no running maximum of the second moment); "
        "drop amsgrad="
    ),
    "capturable": lambda v: (
        "Adafactor has no capturable (CUDA graph) mode: its step reads the step count on the "
        "host; drop capturable="
    ),
    "differentiable": lambda v: (
        "Adafactor's step runs under torch.no_grad and cannot be differentiated through; drop "
        "differentiable="
    ),
    # other references' names for options this optimizer has
    "epsilon_1": lambda v: f"use eps1={v!r} (Keras' name; or Adafactor.from_keras)",
    "epsilon1": lambda v: f"use eps1={v!r}",
    "epsilon_2": lambda v: f"use eps2={v!r} (Keras' name; or Adafactor.from_keras)",
    "epsilon2": lambda v: f"use eps2={v!r}",
    "eps_scale": lambda v: f"use eps2={v!r} (timm's name; or Adafactor.from_timm)",
    "beta_2_decay": lambda v: f"use beta2_decay={v!r} (Keras' name; or Adafactor.from_keras)",
    "clipping_threshold": lambda v: f"use clip_threshold={v!r} (optax's and big_vision's name)",
    "multiply_by_parameter_scale": lambda v: f"use scale_parameter={v!r} (optax's name)",
    "dtype_momentum": lambda v: f"use momentum_dtype={v!r} (optax's name)",
    "weight_decay_rate": lambda v: (
        f"use weight_decay={v!r}, weight_decay_mode='unscaled' (optax decays by x - rate * x), "
        "or Adafactor.from_optax(params, weight_decay_rate=...)"
    ),
    "unscaled_wd": lambda v: "use weight_decay_mode='unscaled' (x - weight_decay * x)",
    "decay_offset": lambda v: (
        "decay_offset (optax, big_vision) is not supported: the beta2 schedule always counts "
        "from the first step"
    ),
    "caution": lambda v: "caution (timm's cautious momentum mask) is not supported",
}


def _keyword_names() -> list[str]:
    from .optimizer import Adafactor  # deferred: optimizer.py imports this module

    sig = inspect.signature(Adafactor.__init__)
    return [
        n
        for n, p in sig.parameters.items()
        if n not in ("self", "params")
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]


def reject_foreign_kwargs(
    kwargs: Mapping[str, Any], *, owner: str = "Adafactor", names: Iterable[str] | None = None
) -> None:
    """Raise ``TypeError`` for keyword arguments ``owner`` does not take, naming the equivalent.

    Adam's and other Adafactors' keywords (``betas``, ``eps``, ``learning_rate``, ``momentum``,
    ``decay_rate``, ``d``, ``foreach``, ``fused``, ``amsgrad``, ``capturable``,
    ``differentiable``, ...) get the option of this optimizer that does what the caller meant;
    any other name gets Python's message plus the closest of ``names`` (default: the keyword
    names of ``Adafactor.__init__``). Returns ``None`` only for an empty ``kwargs``.
    """
    if not kwargs:
        return
    known = list(_keyword_names() if names is None else names)
    lines = []
    for key, value in kwargs.items():
        hint = _HINTS.get(key)
        if hint is not None:
            lines.append(f"{key!r}: {hint(value)}")
            continue
        close = difflib.get_close_matches(key, known + list(_HINTS), n=1, cutoff=0.6)
        if not close:
            lines.append(repr(key))
        elif close[0] in _HINTS:  # a misspelt foreign name: say what it maps to
            lines.append(f"{key!r}; did you mean {close[0]!r}? {_HINTS[close[0]](value)}")
        else:
            lines.append(f"{key!r}; did you mean {close[0]!r}?")
    if len(lines) == 1:
        raise TypeError(f"{owner}() got an unexpected keyword argument {lines[0]}")
    raise TypeError(
        f"{owner}() got unexpected keyword arguments {', '.join(map(repr, kwargs))}:\n  "
        + "\n  ".join(lines)
    )


# ---------------------------------------------------------------------------------------------
# lr as the cap of the relative step
# ---------------------------------------------------------------------------------------------
# Presets whose reference reads an explicit lr as the cap of the relative step,
# rho_t = min(lr, 1/sqrt(t)): passing lr there means what that reference means.
LR_CAP_PRESETS = frozenset({"paper", "keras", "torch"})


def warn_explicit_lr_with_relative_step(
    lr: Any,
    *,
    preset: str | None,
    relative_step: bool,
    relative_step_given: bool,
    scale_parameter: bool,
    stacklevel: int = 3,
) -> bool:
    """Warn once (``UserWarning``) that an explicit ``lr`` caps the relative step size.

    Call it when the caller passed ``lr`` explicitly. It warns when the effective
    ``relative_step`` is True, the caller did not pass ``relative_step`` (passing
    ``relative_step=True`` acknowledges the meaning) and ``preset`` is not one of
    :data:`LR_CAP_PRESETS`, whose references give lr that meaning. Returns whether it warned.
    ``stacklevel=3`` points at the caller of ``Adafactor(...)`` when called from ``__init__``.
    """
    if not relative_step or relative_step_given or preset in LR_CAP_PRESETS:
        return False
    shown = "a schedule" if callable(lr) and not isinstance(lr, Tensor) else repr(lr)
    if isinstance(lr, Tensor):
        shown = f"{float(lr):g}"
    scaled = (
        ", scaled by RMS(x) (scale_parameter=True): the first update moves each tensor by "
        "about lr * RMS(x), not by lr"
        if scale_parameter
        else ""
    )
    warnings.warn(
        f"Adafactor(lr={shown}) with relative_step=True uses lr as the cap of the relative step "
        f"size, rho_t = min(lr, 1/sqrt(t)){scaled}. For a plain learning rate pass "
        "relative_step=False, scale_parameter=False; to keep this meaning, pass "
        "relative_step=True explicitly, or preset='torch' (torch.optim.Adafactor's lr) or "
        "preset='keras'",
        UserWarning,
        stacklevel=stacklevel,
    )
    return True
