#!/usr/bin/env python
"""Record timm's Adafactor and AdafactorBigVision trajectories for ``tests/test_constructors.py``.

The options the shared golden files do not exercise (timm's explicit lr, warm-up, factoring
threshold; big_vision's update clipping, the three weight-decay forms, float32 momentum, eps),
on the inputs of ``scripts/make_golden.py`` (``make_inputs``), in the same ``.npz`` format, into
``tests/golden/constructors``. timm is an optional extra of this script, never a test
dependency; its optimizer modules are imported without ``timm/__init__`` (which imports
torchvision), so an unpacked wheel on ``PYTHONPATH`` is enough:

    pip download --no-deps timm==1.0.31 -d /tmp/w && unzip -q /tmp/w/timm-*.whl -d /tmp/timm
    PYTHONPATH=/tmp/timm python scripts/make_golden_constructors.py

A case with ``"schedule"`` sets the group's lr before every step, as an LR scheduler does; the
values are stored as ``lr_per_step``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import platform
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import STEPS, _versions, make_inputs

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "constructors"


def cosine_lr(step: int) -> float:
    """lr of the 0-based ``step`` in the ``schedule`` cases: 1e-2 falling to 1e-3 over 20 steps."""
    return 0.01 * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))


SCHEDULES = {"cosine": cosine_lr}


def _timm_optim(module: str) -> Any:
    """``timm.optim.<module>`` without running ``timm/__init__`` (it imports torchvision)."""
    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not importable (put an unpacked timm wheel on PYTHONPATH)")
        root = next(iter(spec.submodule_search_locations))
        for name, path in (("timm", root), ("timm.optim", f"{root}/optim")):
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    return importlib.import_module(f"timm.optim.{module}")


def _make(backend: str, kwargs: dict[str, Any]) -> Any:
    if backend == "timm":
        cls = _timm_optim("adafactor").Adafactor
    else:
        cls = _timm_optim("adafactor_bv").AdafactorBigVision
    return lambda params: cls(params, **kwargs)


# (backend, setting, config, kwargs, schedule or None)
CASES: list[tuple[str, str, str, dict[str, Any], str | None]] = [
    (
        "timm",
        "lr1e-3_betas0.9_wd0.1",
        "mixed",
        {"lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.1},
        None,
    ),
    (
        "timm",
        "warmup_noscale_wd0.01",
        "mixed",
        {"warmup_init": True, "scale_parameter": False, "weight_decay": 0.01},
        None,
    ),
    (
        "timm",
        "mindim23_eps1e-20_clip2_decay-0.6",
        "mixed",
        {"min_dim_size_to_factor": 23, "eps": 1e-20, "clip_threshold": 2.0, "decay_rate": -0.6},
        None,
    ),
    ("timm", "mindim24", "mixed", {"min_dim_size_to_factor": 24}, None),
    (
        "timm_bv",
        "lr1e-2_clip1_unscaledwd0.01_f32",
        "mixed",
        {
            "lr": 0.01,
            "clipping_threshold": 1.0,
            "weight_decay": 0.01,
            "unscaled_wd": True,
            "momentum_dtype": "float32",
        },
        None,
    ),
    (
        "timm_bv",
        "cosine_corrected_unscaledwd0.05_mindim4_cap0.9_f32",
        "mixed",
        {
            "lr": 0.01,
            "weight_decay": 0.05,
            "unscaled_wd": True,
            "corrected_weight_decay": True,
            "momentum_dtype": "float32",
            "min_dim_size_to_factor": 4,
            "beta2_cap": 0.9,
            "decay_rate": 0.5,
        },
        "cosine",
    ),
    (
        "timm_bv",
        "lr3e-3_wd0.1_eps1e-20_mom0.8_f32",
        "mixed",
        {
            "lr": 0.003,
            "weight_decay": 0.1,
            "eps": 1e-20,
            "momentum": 0.8,
            "momentum_dtype": "float32",
        },
        None,
    ),
]

DESCRIPTIONS = {
    "timm": "timm.optim.adafactor.Adafactor (imported without timm/__init__)",
    "timm_bv": "timm.optim.adafactor_bv.AdafactorBigVision (imported without timm/__init__)",
}


def make_case(
    backend: str,
    setting: str,
    config: str,
    kwargs: dict[str, Any],
    schedule: str | None,
    out_dir: Path = OUT,
    seed: int = 0,
) -> Path:
    import torch

    names, inits, grads = make_inputs(config, seed)
    params = [torch.nn.Parameter(torch.tensor(inits[n])) for n in names]
    opt = _make(backend, kwargs)(params)
    lrs = [SCHEDULES[schedule](t) for t in range(STEPS)] if schedule else None
    traj = {n: np.empty((STEPS, *inits[n].shape), np.float32) for n in names}
    for t in range(STEPS):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p, n in zip(params, names):
            p.grad = torch.tensor(grads[n][t])
        opt.step()
        for p, n in zip(params, names):
            traj[n][t] = p.detach().numpy()
    meta = {
        "backend": backend,
        "description": DESCRIPTIONS[backend],
        "setting": setting,
        "kwargs": kwargs,
        "schedule": schedule,
        "notes": "group['lr'] set to lr_per_step[t] before step t" if schedule else "",
        "config": config,
        "shapes": {n: list(inits[n].shape) for n in names},
        "seed": seed,
        "steps": STEPS,
        "dtype": "float32",
        "skipped_params": [],
        "all_finite": all(bool(np.isfinite(traj[n]).all()) for n in names),
        "versions": _versions(("timm", "torch")),
        "python": platform.python_version(),
        "generator": "scripts/make_golden_constructors.py (inputs: make_golden.make_inputs)",
    }
    arrays: dict[str, Any] = {"param_names": np.array(names), "meta": np.array(json.dumps(meta))}
    for n in names:
        arrays[f"init__{n}"] = inits[n]
        arrays[f"grads__{n}"] = grads[n]
        arrays[f"params__{n}"] = traj[n]
    if lrs is not None:
        arrays["lr_per_step"] = np.array(lrs, np.float64)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{backend}__{setting}__{config}__s{seed}.npz"
    np.savez(path, **arrays)
    return path


def main() -> int:
    for case in CASES:
        try:
            print(make_case(*case))
        except ImportError as exc:
            print(f"skipped {case[0]}__{case[1]}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
