"""Checkpoints: loading (ours and torch.optim.Adafactor's), checks, migration, torch export.

Everything a state dict goes through is checked before anything changes, so an error leaves the
optimizer as it was; older versions' group keys are migrated (:func:`migrate_group`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed
from ._state import STATE_KEYS, expected_state
from ._validation import check_group, check_loaded_state, check_param, check_state_ids

if TYPE_CHECKING:
    from .optimizer import Adafactor

__all__ = [
    "STATE_KEYS",
    "load_state_dict",
    "migrate_group",
    "torch_state_dict",
    "translate_group",
]


def load_state_dict(opt: Adafactor, state_dict: dict[str, Any]) -> None:
    """Load a state dict of this class or of ``torch.optim.Adafactor``.

    Everything is checked before anything changes: the groups' options, the parameter ids,
    every state value (a finite, non-negative ``step``, which may be a plain number as in
    older torch checkpoints; finite state, non-negative second moments) and each state
    tensor's shape under this optimizer's factoring options; on an error the optimizer is
    left as it was. State keeps its own dtype (float32 statistics stay float32 for bf16
    parameters), so resuming is bit-exact. Load-state-dict pre-hooks run first and may
    replace the dict, post-hooks run last, as in torch.
    """
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for saved, mine in zip(saved_groups, opt.param_groups):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size "
                "of optimizer's group"
            )
    groups = [translate_group(g, mine) for g, mine in zip(saved_groups, opt.param_groups)]
    saved_state = state_dict["state"]
    saved_ids = [pid for g in saved_groups for pid in g["params"]]
    check_state_ids(saved_ids, saved_state.keys())
    owner = {
        pid: (p, group, gi)
        for gi, (saved, mine, group) in enumerate(zip(saved_groups, opt.param_groups, groups))
        for pid, p in zip(saved["params"], mine["params"])
    }
    restored = {}
    for pid, saved in saved_state.items():
        p, group, gi = owner[pid]
        check_param(p, f"param_groups[{gi}]", group["factored"])
        values = {key: check_loaded_state(pid, key, value) for key, value in saved.items()}
        restored[p] = _restore_state(opt, pid, p, group, values)
    # every check passed: load the groups through torch (its hooks already ran here), then
    # the state, converted above
    hooks = (
        opt._optimizer_load_state_dict_pre_hooks,
        opt._optimizer_load_state_dict_post_hooks,
    )
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        Optimizer.load_state_dict(opt, {"state": {}, "param_groups": groups})
    finally:
        opt._optimizer_load_state_dict_pre_hooks = hooks[0]
        opt._optimizer_load_state_dict_post_hooks = hooks[1]
    for p, st in restored.items():
        opt.state[p] = st
    opt._group_snapshots = []
    opt._state_layouts = {}
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def _restore_state(
    opt: Adafactor, pid: Any, p: Tensor, group: dict[str, Any], saved: dict[str, Any]
) -> dict[str, Any]:
    """One parameter's saved state, checked against ``group``'s options and converted."""
    expected = expected_state(p, group)
    known = set(STATE_KEYS) & set(saved)
    if known != set(expected) and saved:
        raise ValueError(
            f"load_state_dict: the parameter with id {pid} (shape {tuple(p.shape)}) has "
            f"state {sorted(known)}, but this optimizer expects {sorted(expected)} under "
            f"its options (beta1={group['beta1']!r}, use_ema={group['use_ema']!r}, "
            f"factor_dims={group['factor_dims']!r}). Load a state dict saved from the "
            "same model, param groups and options"
        )
    restored: dict[str, Any] = {}
    for key, value in saved.items():
        if not isinstance(value, Tensor) or key not in expected:
            restored[key] = value
            continue
        shape, dtype = expected[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"load_state_dict: state[{key!r}] of the parameter with id {pid} has "
                f"shape {tuple(value.shape)}, but this optimizer expects {tuple(shape)} "
                f"for a parameter of shape {tuple(p.shape)} under its factoring options "
                f"(factor_dims={group['factor_dims']!r}, min_dim_size_to_factor="
                f"{group['min_dim_size_to_factor']}, factored={group['factored']}). "
                "Load a state dict saved from the same model, param groups and options"
            )
        device = torch.device("cpu") if key == "step" else p.device
        if key != "step" and distributed.has_dtensor([p]):  # keep p's sharding
            restored[key] = distributed.load_state_tensor(p, value, dtype)
        else:
            restored[key] = value.to(device=device, dtype=dtype, copy=True)
    return restored


def torch_state_dict(opt: Adafactor) -> dict[str, Any]:
    """This optimizer's state dict in ``torch.optim.Adafactor``'s format.

    Group keys become torch's (``eps=(eps1, eps2)``, ``d``), state keeps torch's names
    (``step``, ``row_var``, ``col_var``, ``variance``). torch continues the same numbers only
    for options it has (``preset="torch"`` / :meth:`from_torch`); momentum and the EMA have
    no place there, so they raise.
    """
    out = opt.state_dict()
    groups = []
    for group in out["param_groups"]:
        for option in ("beta1", "use_ema"):
            if group[option]:
                raise ValueError(
                    f"torch_state_dict: {option}={group[option]!r} keeps state that "
                    "torch.optim.Adafactor does not have; export without it"
                )
        d = group["clip_threshold"]
        groups.append(
            {
                "params": group["params"],
                "lr": group["lr"],
                "beta2_decay": group["beta2_decay"],
                "eps": (
                    group["eps1"] if group["eps1_mode"] == "clamp" else None,
                    group["eps2"],
                ),
                "d": math.inf if d is None else d,
                "weight_decay": group["weight_decay"],
                "foreach": None,
                "maximize": group["maximize"],
                "differentiable": False,
            }
        )
    state = {
        pid: {
            k: v.float() if k == "step" else v
            for k, v in st.items()
            if k in ("step", "row_var", "col_var", "variance")
        }
        for pid, st in out["state"].items()
    }
    return {"state": state, "param_groups": groups}


def translate_group(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Map a saved group (ours or torch.optim.Adafactor's) onto this optimizer's group keys."""
    group = {k: v for k, v in current.items() if k != "params"}
    saved = migrate_group(dict(saved))
    for key, value in saved.items():
        if key in ("d", "eps", "foreach", "differentiable"):  # torch.optim.Adafactor's names
            continue
        group[key] = value
    if "d" in saved:
        group["clip_threshold"] = saved["d"]
    if "eps" in saved:
        eps1, eps2 = saved["eps"]
        group["eps2"] = eps2
        if group["eps1_mode"] == "clamp":
            group["eps1"] = eps1
    check_group(group)
    return group


def migrate_group(group: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rename keys of checkpoints saved by older versions and add the options they lack, from
    ``defaults`` (in place; returns ``group``).

    Before 0.2 the momentum semantics lived under ``"momentum"``, a key torch schedulers and loggers
    read as a number."""
    for key, value in (defaults or {}).items():
        group.setdefault(key, value)
    if isinstance(group.get("momentum"), str):
        group.setdefault("momentum_kind", group.pop("momentum"))
    # the skip counter is a tensor the step op increments (no host sync); it was an int
    skipped = group.get("skipped_steps", 0)
    if not isinstance(skipped, Tensor):
        group["skipped_steps"] = torch.tensor(int(skipped), dtype=torch.int64)
    return group
