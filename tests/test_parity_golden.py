"""Parity with the reference implementations' recorded fp32 trajectories (``tests/golden``).

Each ``.npz`` holds a reference optimizer's inputs and its parameters after every one of 20 steps
(format and origin: ``tests/golden/README.md``). ``CASES`` maps every file to the ``Adafactor``
keyword arguments that reproduce its reference's constructor arguments. A case passes when, at
every step, every parameter is within ``RTOL`` of that parameter's largest movement from its
initial value (correct implementations differ by ~1e-5 of it from fp32 rounding; a semantic
difference shows as 1e-3 or more).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adafactor import Adafactor

GOLDEN_DIR = Path(__file__).parent / "golden"
RTOL = 1e-4  # of each parameter's largest movement over the 20 steps


@dataclass(frozen=True)
class Golden:
    """One golden file: inputs, the reference trajectory, and its metadata."""

    names: list[str]
    init: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]  # (steps, *shape)
    params: dict[str, np.ndarray]  # (steps, *shape): after steps 1..steps
    meta: dict[str, Any]
    extra: dict[str, np.ndarray]  # lr_per_step, ema__<name>, final__<name> where present

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])


def load_golden(name: str) -> Golden:
    """Load ``tests/golden/<name>.npz``."""
    with np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False) as data:
        names = [str(n) for n in data["param_names"]]
        arrays = {key: data[key] for key in data.files}
    per_param = {f"{kind}__{n}" for kind in ("init", "grads", "params") for n in names}
    return Golden(
        names=names,
        init={n: arrays[f"init__{n}"] for n in names},
        grads={n: arrays[f"grads__{n}"] for n in names},
        params={n: arrays[f"params__{n}"] for n in names},
        meta=json.loads(str(arrays["meta"])),
        extra={
            k: v
            for k, v in arrays.items()
            if k not in per_param and k not in ("meta", "param_names")
        },
    )


def keras_schedule(spec: dict[str, Any]) -> Callable[[int], float]:
    """The Keras ``ExponentialDecay`` recorded in a golden file's ``meta``, as step -> lr."""
    assert spec["__schedule__"] == "exponential_decay"
    lr0, rate, steps = spec["initial_learning_rate"], spec["decay_rate"], spec["decay_steps"]
    return lambda step: lr0 * rate ** (step / steps)


def keras_exp_decay(step: int) -> float:
    """ExponentialDecay(0.05, decay_steps=4, decay_rate=0.7) of ``tf_keras__lrsched``."""
    return 0.05 * 0.7 ** (step / 4)


@dataclass(frozen=True)
class Case:
    """One golden file and how this package reproduces it."""

    file: str  # under tests/golden, without ".npz"
    ref: dict[str, Any]  # the reference's constructor kwargs, exactly as recorded in meta["kwargs"]
    ours: dict[str, Any] | None  # Adafactor(params, **ours); None: not expressible (see ``skip``)
    keras: bool = False  # also replay through Adafactor.from_keras(params, **ref)
    refused: bool = False  # the reference diverges (NaN); ``ours`` must raise ValueError instead
    skip: str = ""
    note: str = ""
    extra_checks: tuple[str, ...] = field(default=())


K = {"preset": "keras"}
T = {"preset": "torch"}
HF = {"preset": "transformers"}
OX = {"preset": "optax"}
BV = {"preset": "big_vision"}

# Every golden file, once. Keras' names in ``ref`` are passed unchanged to ``from_keras``.
CASES: list[Case] = [
    # --- tf_keras.optimizers.Adafactor (environment B) ----------------------------------------
    Case("tf_keras__defaults__mixed__s0", {}, K, keras=True),
    Case("tf_keras__defaults__large__s0", {}, K, keras=True),
    Case(
        "tf_keras__relstep_false__mixed__s0",
        {"relative_step": False},
        K,  # tf_keras ignores relative_step: rho_t = min(lr, 1/sqrt(t)) either way
        keras=True,
        note="from_keras must warn that relative_step=False is ignored",
    ),
    Case(
        "tf_keras__clip0.5__mixed__s0",
        {"clip_threshold": 0.5},
        {**K, "clip_threshold": 0.5},
        keras=True,
    ),
    Case(
        "tf_keras__wd0.01__mixed__s0",
        {"weight_decay": 0.01},
        {**K, "weight_decay": 0.01},
        keras=True,
    ),
    Case(
        "tf_keras__lr1e-2_wd0.1__mixed__s0",
        {"learning_rate": 0.01, "weight_decay": 0.1},
        {**K, "lr": 1e-2, "weight_decay": 0.1},
        keras=True,
    ),
    Case("tf_keras__eps2_1e-2__mixed__s0", {"epsilon_2": 0.01}, {**K, "eps2": 1e-2}, keras=True),
    Case(
        "tf_keras__b2decay-0.5__mixed__s0",
        {"beta_2_decay": -0.5},
        {**K, "beta2_decay": -0.5},
        keras=True,
    ),
    Case(
        "tf_keras__lrsched__mixed__s0",
        {
            "learning_rate": {
                "__schedule__": "exponential_decay",
                "initial_learning_rate": 0.05,
                "decay_steps": 4,
                "decay_rate": 0.7,
            }
        },
        {**K, "lr": keras_exp_decay},
        keras=True,
        extra_checks=("lr_per_step",),
    ),
    Case("tf_keras__lr1e-2__mixed__s0", {"learning_rate": 0.01}, {**K, "lr": 1e-2}, keras=True),
    Case(
        "tf_keras__nojit__mixed__s0", {"jit_compile": False}, {**K, "impl": "reference"}, keras=True
    ),
    Case("tf_keras__clipnorm0.5__mixed__s0", {"clipnorm": 0.5}, {**K, "clipnorm": 0.5}, keras=True),
    Case(
        "tf_keras__global_clipnorm1.0__mixed__s0",
        {"global_clipnorm": 1.0},
        {**K, "global_clipnorm": 1.0},
        keras=True,
    ),
    Case(
        "tf_keras__clipvalue0.01__mixed__s0",
        {"clipvalue": 0.01},
        {**K, "clipvalue": 0.01},
        keras=True,
    ),
    Case(
        "tf_keras__ema0.9_of5__mixed__s0",
        {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5},
        {**K, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5},
        keras=True,
        extra_checks=("ema",),
    ),
    Case("numpy_ref__defaults__mixed__s0", {}, K, note="float64 re-implementation of tf_keras"),
    Case("numpy_ref__defaults__large__s0", {}, K, note="float64 re-implementation of tf_keras"),
    # --- keras.optimizers.Adafactor (Keras 3) --------------------------------------------------
    Case("keras3_tf__defaults__mixed__s0", {}, K, keras=True),
    Case(
        "keras3_tf__wd0.01__mixed__s0",
        {"weight_decay": 0.01},
        {**K, "weight_decay": 0.01},
        keras=True,
    ),
    Case("keras3_torch__defaults__mixed__s0", {}, K, keras=True),
    # --- torch.optim.Adafactor -----------------------------------------------------------------
    Case("torch__defaults__mixed__s0", {}, T),
    Case("torch__defaults__large__s0", {}, T),
    Case("torch__wd0.01__mixed__s0", {"weight_decay": 0.01}, {**T, "weight_decay": 0.01}),
    Case("torch__wd0.1__mixed__s0", {"weight_decay": 0.1}, {**T, "weight_decay": 0.1}),
    Case("torch__maximize__mixed__s0", {"maximize": True}, {**T, "maximize": True}),
    Case("torch__foreach__mixed__s0", {"foreach": True}, T, note="foreach only changes rounding"),
    Case("torch__lr1e-3__mixed__s0", {"lr": 0.001}, {**T, "lr": 1e-3}),
    Case("torch__lr1e-3__large__s0", {"lr": 0.001}, {**T, "lr": 1e-3}),
    Case(
        "torch__lr1e-3_wd0.01__mixed__s0",
        {"lr": 0.001, "weight_decay": 0.01},
        {**T, "lr": 1e-3, "weight_decay": 0.01},
    ),
    Case(
        "torch__lr1e-3_eps1e-30__mixed__s0",
        {"lr": 0.001, "eps": [1e-30, 0.001]},
        {**T, "lr": 1e-3, "eps1": 1e-30, "eps2": 1e-3},
        refused=True,
        note="eps1**2 underflows to 0 in fp32: torch gives NaN in bias128 (all-zero entries)",
    ),
    # --- transformers.optimization.Adafactor ---------------------------------------------------
    Case("hf__defaults__mixed__s0", {}, HF),
    Case("hf__defaults__large__s0", {}, HF),
    Case("hf__wd0.01__mixed__s0", {"weight_decay": 0.01}, {**HF, "weight_decay": 0.01}),
    Case(
        "hf__beta1_lr1e-3__mixed__s0",
        {"beta1": 0.9, "lr": 0.001, "relative_step": False},
        {**HF, "beta1": 0.9, "lr": 1e-3, "relative_step": False},
    ),
    Case(
        "hf__warmup_init__mixed__s0",
        {"lr": None, "relative_step": True, "warmup_init": True},
        {**HF, "warmup_init": True},
    ),
    # --- optax.adafactor -----------------------------------------------------------------------
    Case("optax__defaults__mixed__s0", {}, OX, note="learning_rate=None: no lr scaling (lr=1)"),
    Case("optax__defaults__large__s0", {}, OX, note="64x128 is not factored (min dim 128)"),
    Case("optax__momentum__mixed__s0", {"momentum": 0.9}, {**OX, "beta1": 0.9}),
    Case(
        "optax__lr1e-2_mindim1__mixed__s0",
        {"learning_rate": 0.01, "min_dim_size_to_factor": 1},
        {**OX, "lr": 1e-2, "min_dim_size_to_factor": 1},
    ),
    Case(
        "optax__lr1e-3_mom0.9_mindim1__mixed__s0",
        {"learning_rate": 0.001, "momentum": 0.9, "min_dim_size_to_factor": 1},
        {**OX, "lr": 1e-3, "beta1": 0.9, "min_dim_size_to_factor": 1},
    ),
    # --- timm AdafactorBigVision ---------------------------------------------------------------
    Case("timm_bv__lr1e-3__mixed__s0", {"lr": 0.001}, {**BV, "lr": 1e-3}),
    Case(
        "timm_bv__lr1e-3_nomom__mixed__s0",
        {"lr": 0.001, "momentum": None},
        {**BV, "lr": 1e-3, "beta1": None},
    ),
    # --- pytorch_optimizer.AdaFactor: transformers' math with beta2 capped at 0.999 and bf16
    # momentum of the lr-scaled update (the cap cannot bind before t ~ 5600).
    Case(
        "ptopt__defaults__mixed__s0",
        {},
        {**HF, "beta2_cap": 0.999, "beta1": 0.9, "momentum_dtype": torch.bfloat16},
    ),
    Case("ptopt__nomomentum__mixed__s0", {"betas": [None, 0.999]}, {**HF, "beta2_cap": 0.999}),
    # --- timm.optim.Adafactor: factors dims (0, 1) of a rank>2 tensor when both are > 16, else
    # the last two when both are > 16. No option expresses the (0, 1) rule, but no tensor of
    # `mixed` hits it: there only mat24x40 is factored (last two), which min size 17 reproduces.
    Case(
        "timm__defaults__mixed__s0",
        {},
        {**HF, "min_dim_size_to_factor": 17},
        note="exact for this file's shapes only",
    ),
    # --- our own cases, made by scripts/make_golden.py (tests/golden/generated) ----------------
    Case(
        "generated/torch__lr1e-2_wd0.05_maximize__mixed__s0",
        {"lr": 0.01, "weight_decay": 0.05, "maximize": True},
        {**T, "lr": 1e-2, "weight_decay": 0.05, "maximize": True},
    ),
    Case("generated/torch__d2__large__s0", {"d": 2.0}, {**T, "clip_threshold": 2.0}),
    Case(
        "generated/torch__b2decay-0.5_eps2_1e-2__mixed__s0",
        {"beta2_decay": -0.5, "eps": [None, 0.01]},
        {**T, "beta2_decay": -0.5, "eps2": 1e-2},
    ),
    Case("generated/torch__defaults__conv__s0", {}, T),
    # Gradients ~1e-5: torch's eps1 clamps bite (0.2-0.3 of the movement away from transformers).
    Case("generated/torch__defaults__tiny__s0", {}, T),
    Case("generated/hf__defaults__tiny__s0", {}, HF),
    Case(
        "generated/hf__beta1_wd0.01__conv__s0",
        {"beta1": 0.9, "weight_decay": 0.01},
        {**HF, "beta1": 0.9, "weight_decay": 0.01},
    ),
    Case(
        "generated/hf__lr1e-3_noscale_beta1_wd0.1__conv__s0",
        {
            "lr": 0.001,
            "relative_step": False,
            "scale_parameter": False,
            "beta1": 0.9,
            "weight_decay": 0.1,
        },
        {**HF, "lr": 1e-3, "relative_step": False, "scale_parameter": False}
        | {"beta1": 0.9, "weight_decay": 0.1},
    ),
]


def _keras_kwargs(ref: dict[str, Any]) -> dict[str, Any]:
    """``ref`` with a recorded schedule turned back into a callable."""
    out = dict(ref)
    if isinstance(out.get("learning_rate"), dict):
        out["learning_rate"] = keras_schedule(out["learning_rate"])
    return out


def _params(g: Golden) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(g.init[n])) for n in g.names]


def _movement(g: Golden) -> dict[str, float]:
    """Each parameter's largest distance from its initial value over the trajectory."""
    return {n: float(np.abs(g.params[n] - g.init[n]).max()) for n in g.names}


def relative_error(ours: np.ndarray, ref: np.ndarray, movement: float) -> float:
    """max |ours - ref| / movement (NaN if either side is non-finite)."""
    return float(np.abs(ours.astype(np.float64) - ref).max() / movement)


def replay(
    g: Golden, opt: Adafactor, params: list[torch.nn.Parameter]
) -> tuple[dict[str, float], list[float]]:
    """Feed the file's gradients for every step; return each param's worst relative error over
    all steps, and the learning rate the optimizer reports for each step."""
    movement = _movement(g)
    assert all(m > 0 for m in movement.values()), movement
    worst = dict.fromkeys(g.names, 0.0)
    lrs: list[float] = []
    for t in range(g.steps):
        for p, n in zip(params, g.names):
            p.grad = torch.tensor(g.grads[n][t])
        opt.step()
        stats = opt.last_step_stats[0]
        assert stats is not None
        lrs.append(float(stats.lr))
        for p, n in zip(params, g.names):
            err = relative_error(p.detach().numpy(), g.params[n][t], movement[n])
            worst[n] = max(worst[n], err) if err == err else float("nan")
    return worst, lrs


def build(case: Case, ctor: str, params: list[torch.nn.Parameter]) -> Adafactor:
    """Construct the optimizer for ``case`` through ``Adafactor(...)`` or ``from_keras``."""
    if ctor == "preset":
        assert case.ours is not None
        return Adafactor(params, **case.ours)
    kwargs = _keras_kwargs(case.ref)
    if kwargs.get("relative_step") is False:
        with pytest.warns(UserWarning, match="relative_step"):
            return Adafactor.from_keras(params, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Adafactor.from_keras(params, **kwargs)


def check_case(case: Case, ctor: str) -> dict[str, float]:
    """Replay ``case`` and assert parity; returns each param's worst relative error."""
    g = load_golden(case.file)
    params = _params(g)
    opt = build(case, ctor, params)
    worst, lrs = replay(g, opt, params)
    bad = {n: e for n, e in worst.items() if not e <= RTOL}
    assert not bad, f"{case.file} ({ctor}): relative error above {RTOL}: {bad}"
    if "lr_per_step" in case.extra_checks:
        np.testing.assert_allclose(lrs, g.extra["lr_per_step"], rtol=1e-6)
    if "ema" in case.extra_checks:
        movement = _movement(g)
        for p, n in zip(params, g.names):
            ema = opt.state[p]["ema"].numpy()
            assert relative_error(ema, g.extra[f"ema__{n}"], movement[n]) <= RTOL, n
        opt.finalize_variable_values()
        for p, n in zip(params, g.names):
            final = p.detach().numpy()
            assert relative_error(final, g.extra[f"final__{n}"], movement[n]) <= RTOL, n
    return worst


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    if case.skip:
        return [pytest.mark.skip(reason=case.skip)]
    return []


def _params_table() -> list[Any]:
    out = []
    for case in CASES:
        if case.refused:
            continue
        out.append(pytest.param(case, "preset", id=case.file, marks=_marks(case)))
        if case.keras:
            out.append(
                pytest.param(case, "from_keras", id=f"{case.file}-from_keras", marks=_marks(case))
            )
    return out


@pytest.mark.parametrize(("case", "ctor"), _params_table())
def test_golden_trajectory(case: Case, ctor: str) -> None:
    check_case(case, ctor)


@pytest.mark.parametrize("case", CASES, ids=[c.file for c in CASES])
def test_table_matches_recorded_kwargs(case: Case) -> None:
    """The table's ``ref`` is what the file was made with (so the mapping is reviewed per file)."""
    g = load_golden(case.file)
    assert g.meta["kwargs"] == case.ref
    assert g.meta["steps"] == 20 and g.meta["dtype"] == "float32"
    assert case.file.split("/")[-1].startswith(g.meta["backend"] + "__")


def test_every_golden_file_has_a_case() -> None:
    files = {str(p.relative_to(GOLDEN_DIR))[: -len(".npz")] for p in GOLDEN_DIR.rglob("*.npz")}
    from tests.test_constructors import TIMM_CASES  # replayed there (constructor and preset)

    table = [c.file for c in CASES] + [file for file, _, _ in TIMM_CASES]
    assert len(table) == len(set(table))
    assert files == set(table)


@pytest.mark.parametrize("case", [c for c in CASES if c.refused], ids=lambda c: c.file)
def test_reference_nan_config_is_refused(case: Case) -> None:
    """torch.optim.Adafactor with eps1=1e-30 floors V_hat at eps1**2 = 0 in fp32, so all-zero
    gradient entries give 0 * rsqrt(0) = NaN; the torch preset refuses that setting."""
    g = load_golden(case.file)
    nan_params = {n for n in g.names if np.isnan(g.params[n]).any()}
    assert nan_params == {"bias128"}
    assert not g.meta["all_finite"]
    assert case.ours is not None
    with pytest.raises(ValueError, match=r"eps1=1e-30 with eps1_mode='clamp'"):
        Adafactor(_params(g), **case.ours)
