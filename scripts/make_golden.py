#!/usr/bin/env python
"""Record reference Adafactor trajectories as golden ``.npz`` files for the parity tests.

Runs a public Adafactor (``torch.optim.Adafactor``; ``transformers`` when it is importable) for
20 fp32 steps on the inputs described in ``tests/golden/README.md`` and writes the file in the
same format as the shared golden files. The reference libraries are optional extras of this
script, never test dependencies: the tests only read the ``.npz`` files.

    python scripts/make_golden.py                  # every case in CASES -> tests/golden/generated
    python scripts/make_golden.py --backend torch --config conv --setting lr1e-2 \\
        --kwargs '{"lr": 0.01}' --out /tmp/golden # one case
    python scripts/make_golden.py --check-inputs tests/golden/torch__defaults__mixed__s0.npz
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 20
SPIKE_STEPS = (4, 9, 15)  # a random 3 % of the entries (at least one) x100
BURST_STEP = 12  # the whole tensor x30
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "generated"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (N(0, init_scale^2)), "const" (init_scale), "zeros"
    init_scale: float
    grad_scale: float
    zero_prefix: int = 0  # gradient entries [:zero_prefix] are exactly 0 at every step


CONFIGS: dict[str, list[ParamSpec]] = {
    # One of every rank and the edge cases (the shared golden files' `mixed`).
    "mixed": [
        ParamSpec("scalar", (), "normal", 0.3, 1.0),
        ParamSpec("vec1", (1,), "const", 0.5, 0.1),
        ParamSpec("vec3", (3,), "normal", 1.0, 1.0),
        ParamSpec("bias128", (128,), "zeros", 0.0, 1e-2, zero_prefix=8),
        ParamSpec("mat1x1", (1, 1), "normal", 1.0, 1.0),
        ParamSpec("row1x7", (1, 7), "normal", 0.5, 0.3),
        ParamSpec("mat5x3", (5, 3), "normal", 1e-4, 1.0),  # RMS below eps2 = 1e-3
        ParamSpec("mat24x40", (24, 40), "normal", 0.02, 1e-3),
        ParamSpec("t16x4x8", (16, 4, 8), "normal", 0.05, 0.1),
        ParamSpec("conv8x4x3x3", (8, 4, 3, 3), "normal", 0.1, 0.05),
    ],
    "large": [
        ParamSpec("w64x128", (64, 128), "normal", 0.02, 1e-2),
        ParamSpec("b128", (128,), "zeros", 0.0, 1e-2),
    ],
    # Rank-3/4 tensors, where last-two, largest-two and matrix-only factoring all differ.
    "conv": [
        ParamSpec("conv32x16x3x3", (32, 16, 3, 3), "normal", 0.05, 0.05),
        ParamSpec("conv8x8x3x3", (8, 8, 3, 3), "normal", 0.1, 0.1),
        ParamSpec("t4x3x5x7", (4, 3, 5, 7), "normal", 0.2, 1.0),
        ParamSpec("t12x6x6", (12, 6, 6), "normal", 0.1, 0.1),  # tie for the 2nd largest dim
        ParamSpec("bias32", (32,), "zeros", 0.0, 1e-2, zero_prefix=4),
    ],
    # Gradients so small that torch.optim's eps1 clamps (mean(R) >= 1.2e-7, V_hat >= 1.4e-14)
    # bite, where an additive eps1 = 1e-30 does not.
    "tiny": [
        ParamSpec("w32x48", (32, 48), "normal", 0.02, 1e-5),
        ParamSpec("v48", (48,), "normal", 0.1, 3e-5),
        ParamSpec("t6x5x4", (6, 5, 4), "normal", 0.1, 1e-4),
        ParamSpec("b16", (16,), "zeros", 0.0, 1e-7),
    ],
}


def make_inputs(
    config: str, seed: int = 0, steps: int = STEPS
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial values and per-step gradients (fp32), drawn param by param from one generator.

    Gradient of param k at step t: N(0,1) * s * (1 + 0.5 sin(0.7 t + k)) + 0.2 s cos(0.3 t + k),
    spikes at SPIKE_STEPS, a burst at BURST_STEP. Reproduces the shared golden files' inputs
    bit for bit (``--check-inputs``).
    """
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    for k, spec in enumerate(CONFIGS[config]):
        if spec.init == "normal":
            init = rng.normal(0.0, spec.init_scale, spec.shape)
        elif spec.init == "const":
            init = np.full(spec.shape, spec.init_scale)
        else:
            init = np.zeros(spec.shape)
        numel = max(1, int(np.prod(spec.shape)))
        per_step = []
        for t in range(1, steps + 1):
            noise = np.asarray(rng.normal(0.0, 1.0, spec.shape)).reshape(spec.shape)
            g = noise * spec.grad_scale * (1 + 0.5 * np.sin(0.7 * t + k))
            g = g + 0.2 * spec.grad_scale * np.cos(0.3 * t + k)
            if t in SPIKE_STEPS:
                flat = g.reshape(-1).copy()
                picked = rng.choice(numel, max(1, round(0.03 * numel)), replace=False)
                flat[picked] *= 100
                g = flat.reshape(spec.shape)
            if t == BURST_STEP:
                g = g * 30
            per_step.append(g)
        stacked = np.stack(per_step)
        if spec.zero_prefix:
            stacked[:, : spec.zero_prefix] = 0
        inits[spec.name] = init.astype(np.float32)
        grads[spec.name] = stacked.astype(np.float32)
    return [s.name for s in CONFIGS[config]], inits, grads


# ---------------------------------------------------------------------------------------------
# backends: run a reference on the inputs, return the parameters after every step
# ---------------------------------------------------------------------------------------------
Trajectory = dict[str, np.ndarray]


def _run_torch_optimizer(
    make: Callable[[list[Any]], Any],
    names: list[str],
    inits: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
) -> Trajectory:
    import torch

    params = [torch.nn.Parameter(torch.tensor(inits[n])) for n in names]
    opt = make(params)
    steps = grads[names[0]].shape[0]
    out = {n: np.empty((steps, *inits[n].shape), np.float32) for n in names}
    for t in range(steps):
        for p, n in zip(params, names):
            p.grad = torch.tensor(grads[n][t])
        opt.step()
        for p, n in zip(params, names):
            out[n][t] = p.detach().numpy()
    return out


def run_torch(kwargs: dict[str, Any], *inputs: Any) -> Trajectory:
    import torch

    kw = dict(kwargs)
    if "eps" in kw:
        kw["eps"] = tuple(kw["eps"])
    return _run_torch_optimizer(lambda ps: torch.optim.Adafactor(ps, **kw), *inputs)


def run_hf(kwargs: dict[str, Any], *inputs: Any) -> Trajectory:
    from transformers.optimization import Adafactor

    kw = dict(kwargs)
    if "eps" in kw:
        kw["eps"] = tuple(kw["eps"])
    return _run_torch_optimizer(lambda ps: Adafactor(ps, **kw), *inputs)


BACKENDS: dict[str, tuple[Callable[..., Trajectory], str, tuple[str, ...]]] = {
    # name -> (runner, description, packages whose versions go into meta)
    "torch": (run_torch, "torch.optim.Adafactor", ("torch",)),
    "hf": (run_hf, "transformers.optimization.Adafactor", ("transformers", "torch")),
}

# The cases this script adds to tests/golden/generated: (backend, setting, config, kwargs).
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "torch",
        "lr1e-2_wd0.05_maximize",
        "mixed",
        {"lr": 0.01, "weight_decay": 0.05, "maximize": True},
    ),
    ("torch", "d2", "large", {"d": 2.0}),
    ("torch", "b2decay-0.5_eps2_1e-2", "mixed", {"beta2_decay": -0.5, "eps": [None, 0.01]}),
    ("torch", "defaults", "conv", {}),
    ("torch", "defaults", "tiny", {}),
    ("hf", "defaults", "tiny", {}),
    ("hf", "beta1_wd0.01", "conv", {"beta1": 0.9, "weight_decay": 0.01}),
    (
        "hf",
        "lr1e-3_noscale_beta1_wd0.1",
        "conv",
        {
            "lr": 0.001,
            "relative_step": False,
            "scale_parameter": False,
            "beta1": 0.9,
            "weight_decay": 0.1,
        },
    ),
]


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import version

    return {**{p: version(p) for p in packages}, "numpy": np.__version__}


def make_case(
    backend: str, setting: str, config: str, kwargs: dict[str, Any], out_dir: Path, seed: int = 0
) -> Path:
    """Run one case and write ``<backend>__<setting>__<config>__s<seed>.npz`` into ``out_dir``."""
    runner, description, packages = BACKENDS[backend]
    names, inits, grads = make_inputs(config, seed)
    traj = runner(kwargs, names, inits, grads)
    finite = all(bool(np.isfinite(traj[n]).all()) for n in names)
    meta = {
        "backend": backend,
        "description": description,
        "setting": setting,
        "kwargs": kwargs,
        "notes": "",
        "config": config,
        "shapes": {n: list(inits[n].shape) for n in names},
        "seed": seed,
        "steps": STEPS,
        "dtype": "float32",
        "skipped_params": [],
        "all_finite": finite,
        "versions": _versions(packages),
        "python": platform.python_version(),
        "generator": "scripts/make_golden.py make_inputs(config, seed, steps)",
    }
    arrays: dict[str, Any] = {"param_names": np.array(names), "meta": np.array(json.dumps(meta))}
    for n in names:
        arrays[f"init__{n}"] = inits[n]
        arrays[f"grads__{n}"] = grads[n]
        arrays[f"params__{n}"] = traj[n]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{backend}__{setting}__{config}__s{seed}.npz"
    np.savez(path, **arrays)
    return path


def check_inputs(path: Path) -> bool:
    """True if make_inputs reproduces a golden file's initial values and gradients exactly."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        names, inits, grads = make_inputs(meta["config"], meta["seed"], meta["steps"])
        same = names == [str(n) for n in data["param_names"]]
        for n in names:
            same &= np.array_equal(inits[n], data[f"init__{n}"])
            same &= np.array_equal(grads[n], data[f"grads__{n}"])
    return bool(same)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--backend", choices=sorted(BACKENDS))
    parser.add_argument("--setting", help="name of the setting (file name part)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mixed")
    parser.add_argument("--kwargs", default="{}", help="constructor kwargs as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-inputs", type=Path, nargs="+", metavar="NPZ")
    args = parser.parse_args(argv)

    if args.check_inputs:
        results = {str(p): check_inputs(p) for p in args.check_inputs}
        for p, ok in results.items():
            print(f"{'identical' if ok else 'DIFFERENT'}  {p}")
        return 0 if all(results.values()) else 1
    if args.backend:
        cases = [(args.backend, args.setting or "custom", args.config, json.loads(args.kwargs))]
    else:
        cases = CASES
    for backend, setting, config, kwargs in cases:
        try:
            path = make_case(backend, setting, config, kwargs, args.out, args.seed)
        except ImportError as exc:  # an optional reference library is missing here
            print(f"skipped {backend}__{setting}__{config}: {exc}", file=sys.stderr)
            continue
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
