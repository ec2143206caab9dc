"""The reference-signature constructors (``adafactor.constructors``) and the Adam-habit errors.

Each ``from_*`` is replayed with the reference's own keyword names on the golden files of its
reference (``tests/golden``; the shared ones through ``test_parity_golden.CASES``, timm's extra
options through ``tests/golden/constructors``), and ``from_torch`` also against a live
``torch.optim.Adafactor`` on torch's own sample inputs (``common_optimizers.optim_db``), whose
error inputs must raise torch's exception types.

The functions are exposed as ``Adafactor.from_torch`` etc. by ``optimizer.py``; until that wiring
exists the tests call the module functions with ``Adafactor`` as the class, and the tests of the
wiring itself (``Adafactor(..., betas=...)`` errors, the explicit-lr warning) are expected to
fail (``xfail(not WIRED, strict=True)``: they start to run, and must pass, once it exists).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from adafactor import Adafactor, constructors
from tests.test_parity_golden import CASES, RTOL, Case, Golden, load_golden, relative_error

# The lead exposes the module functions as classmethods (and Adafactor.__init__ takes **kwargs).
WIRED = hasattr(Adafactor, "from_torch")
needs_wiring = pytest.mark.xfail(
    not WIRED,
    strict=True,
    reason="needs optimizer.py wired to adafactor.constructors (classmethods, **kwargs, warning)",
)


def ctor(name: str) -> Callable[..., Adafactor]:
    """``Adafactor.<name>`` once wired, else the module function bound to ``Adafactor``."""
    if WIRED:
        return getattr(Adafactor, name)
    return functools.partial(getattr(constructors, name), Adafactor)


def _params(g: Golden) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(g.init[n])) for n in g.names]


def replay(
    g: Golden,
    opt: Adafactor,
    params: list[torch.nn.Parameter],
    group_lrs: np.ndarray | None = None,
) -> dict[str, float]:
    """Each parameter's worst error over all steps, relative to its largest movement.

    ``group_lrs``: set every group's lr before each step, as an LR scheduler does."""
    movement = {n: float(np.abs(g.params[n] - g.init[n]).max()) for n in g.names}
    assert all(m > 0 for m in movement.values()), movement
    worst = dict.fromkeys(g.names, 0.0)
    for t in range(g.steps):
        if group_lrs is not None:
            for group in opt.param_groups:
                group["lr"] = float(group_lrs[t])
        for p, n in zip(params, g.names):
            p.grad = torch.tensor(g.grads[n][t])
        opt.step()
        for p, n in zip(params, g.names):
            err = relative_error(p.detach().numpy(), g.params[n][t], movement[n])
            worst[n] = max(worst[n], err) if err == err else float("nan")
    return worst


def _assert_parity(worst: dict[str, float], what: str) -> None:
    bad = {n: e for n, e in worst.items() if not e <= RTOL}
    assert not bad, f"{what}: relative error above {RTOL}: {bad}"


def _options(opt: Adafactor) -> list[dict[str, Any]]:
    """Every group's options, without the params; momentum_dtype None means float32 (the state
    dtype of float32 parameters)."""
    out = []
    for group in opt.param_groups:
        opts = {k: v for k, v in group.items() if k not in ("params", "skipped_steps")}
        if opts.get("momentum_dtype") is None:
            opts["momentum_dtype"] = torch.float32
        out.append(opts)
    return out


def _quiet(build: Callable[[], Adafactor]) -> Adafactor:
    """Build while turning every warning into an error: the constructors must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build()


# ---------------------------------------------------------------------------------------------
# the shared golden files, with the reference's own keyword names
# ---------------------------------------------------------------------------------------------
BACKEND_CTOR = {
    "torch": "from_torch",
    "hf": "from_transformers",
    "timm": "from_timm",
    "timm_bv": "from_big_vision",
    "optax": "from_optax",
}


def _backend(case: Case) -> str:
    return case.file.split("/")[-1].split("__")[0]


REF_CASES = [c for c in CASES if _backend(c) in BACKEND_CTOR]


def test_every_reference_has_shared_golden_cases() -> None:
    assert {_backend(c) for c in REF_CASES} == set(BACKEND_CTOR)


@pytest.mark.parametrize("case", REF_CASES, ids=[c.file for c in REF_CASES])
def test_shared_golden_through_constructor(case: Case) -> None:
    g = load_golden(case.file)
    params = _params(g)
    build = functools.partial(ctor(BACKEND_CTOR[_backend(case)]), params, **case.ref)
    if case.refused:  # torch.optim gives NaN there (eps1**2 underflows); we refuse the setting
        with pytest.raises(ValueError, match=r"eps1=1e-30 with eps1_mode='clamp'"):
            build()
        return
    opt = _quiet(build)
    _assert_parity(replay(g, opt, params), case.file)


@pytest.mark.parametrize("case", [c for c in REF_CASES if not c.refused], ids=lambda c: c.file)
def test_constructor_maps_onto_the_reviewed_preset_kwargs(case: Case) -> None:
    """The constructor builds exactly the options the golden table reviewed for this file."""
    assert case.ours is not None
    params = _params(load_golden(case.file))
    theirs = _quiet(lambda: ctor(BACKEND_CTOR[_backend(case)])(params, **case.ref))
    ours = Adafactor([torch.nn.Parameter(p.detach().clone()) for p in params], **case.ours)
    assert _options(theirs) == _options(ours)
    assert theirs.preset == ours.preset


def test_from_keras_is_the_moved_method() -> None:
    """from_keras keeps Keras' signature and behaviour (one file here; every Keras file runs
    through Adafactor.from_keras in test_parity_golden)."""
    names = list(inspect.signature(constructors.from_keras).parameters)
    assert names == [
        "cls", "params", "learning_rate", "beta_2_decay", "epsilon_1", "epsilon_2",
        "clip_threshold", "relative_step", "weight_decay", "clipnorm", "clipvalue",
        "global_clipnorm", "use_ema", "ema_momentum", "ema_overwrite_frequency",
        "jit_compile", "name", "mesh",
    ]  # fmt: skip
    g = load_golden("tf_keras__lr1e-2_wd0.1__mixed__s0")
    params = _params(g)
    opt = _quiet(lambda: ctor("from_keras")(params, learning_rate=0.01, weight_decay=0.1))
    assert opt.name == "Adafactor" and opt.mesh is None
    _assert_parity(replay(g, opt, params), "tf_keras__lr1e-2_wd0.1")
    with pytest.warns(UserWarning, match="tf_keras ignores relative_step=False"):
        ctor("from_keras")(_params(g), relative_step=False)


# ---------------------------------------------------------------------------------------------
# timm's options the shared files do not cover (scripts/make_golden_constructors.py)
# ---------------------------------------------------------------------------------------------
def cosine_lr(step: int) -> float:
    """The schedule of the ``cosine`` file (scripts/make_golden_constructors.py), 0-based."""
    return 0.01 * (0.55 + 0.45 * math.cos(math.pi * step / 20))


HF = {"preset": "transformers"}
BV = {"preset": "big_vision"}
F32 = {"momentum_dtype": torch.float32}

# (file under tests/golden, the reference's kwargs (as recorded), the equivalent Adafactor kwargs)
TIMM_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "constructors/timm__lr1e-3_betas0.9_wd0.1__mixed__s0",
        {"lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.1},
        {**HF, "lr": 1e-3, "relative_step": False, "scale_parameter": False}
        | {"beta1": 0.9, "weight_decay": 0.1, "min_dim_size_to_factor": 17},
    ),
    (
        "constructors/timm__warmup_noscale_wd0.01__mixed__s0",
        {"warmup_init": True, "scale_parameter": False, "weight_decay": 0.01},
        {**HF, "warmup_init": True, "scale_parameter": False, "weight_decay": 0.01}
        | {"min_dim_size_to_factor": 17},
    ),
    (
        "constructors/timm__mindim23_eps1e-20_clip2_decay-0.6__mixed__s0",
        {"min_dim_size_to_factor": 23, "eps": 1e-20, "clip_threshold": 2.0, "decay_rate": -0.6},
        {**HF, "min_dim_size_to_factor": 24, "eps1": 1e-20, "clip_threshold": 2.0}
        | {"beta2_decay": -0.6},
    ),
    (
        "constructors/timm__mindim24__mixed__s0",
        {"min_dim_size_to_factor": 24},
        {**HF, "min_dim_size_to_factor": 25},
    ),
    (
        "constructors/timm_bv__lr1e-2_clip1_unscaledwd0.01_f32__mixed__s0",
        {
            "lr": 0.01,
            "clipping_threshold": 1.0,
            "weight_decay": 0.01,
            "unscaled_wd": True,
            "momentum_dtype": "float32",
        },
        {**BV, **F32, "lr": 1e-2, "clip_threshold": 1.0, "weight_decay": 0.01}
        | {"weight_decay_mode": "unscaled"},
    ),
    (
        "constructors/timm_bv__cosine_corrected_unscaledwd0.05_mindim4_cap0.9_f32__mixed__s0",
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
        # (lr_t / max_lr) * wd = lr_t * (wd / max_lr): weight_decay 0.05 / 0.01 under mode "lr"
        {**BV, **F32, "lr": cosine_lr, "weight_decay": 5.0, "weight_decay_mode": "lr"}
        | {"min_dim_size_to_factor": 4, "beta2_cap": 0.9, "beta2_decay": -0.5},
    ),
    (
        "constructors/timm_bv__lr3e-3_wd0.1_eps1e-20_mom0.8_f32__mixed__s0",
        {
            "lr": 0.003,
            "weight_decay": 0.1,
            "eps": 1e-20,
            "momentum": 0.8,
            "momentum_dtype": "float32",
        },
        {**BV, **F32, "lr": 3e-3, "weight_decay": 0.1, "eps1": 1e-20, "beta1": 0.8},
    ),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=[c[0].split("/")[1] for c in TIMM_CASES])
@pytest.mark.parametrize("path", ["constructor", "preset"])
def test_timm_golden(case: tuple[str, dict[str, Any], dict[str, Any]], path: str) -> None:
    file, ref, ours = case
    g = load_golden(file)
    assert g.meta["kwargs"] == ref and g.meta["all_finite"]
    assert g.meta["versions"]["timm"] == "1.0.31"
    lrs = g.extra.get("lr_per_step")
    if lrs is not None:
        np.testing.assert_allclose(lrs, [cosine_lr(t) for t in range(g.steps)], rtol=1e-15)
    params = _params(g)
    if path == "constructor":
        opt = _quiet(lambda: ctor(BACKEND_CTOR[g.meta["backend"]])(params, **ref))
        worst = replay(g, opt, params, group_lrs=lrs)  # the schedule writes group["lr"]
    else:
        worst = replay(g, Adafactor(params, **ours), params)  # the schedule is lr itself
    _assert_parity(worst, f"{file} ({path})")


# ---------------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------------
def _signature(fn: Callable[..., Any], drop: int) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(fn).parameters.values())[drop:]
    return [(p.name, p.default, p.kind) for p in params]


def test_from_torch_has_torch_signature() -> None:
    assert _signature(constructors.from_torch, 1) == _signature(torch.optim.Adafactor.__init__, 1)


P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
E = inspect.Parameter.empty


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (  # transformers 5.23.0, src/transformers/optimization.py
            "from_transformers",
            [
                ("params", E),
                ("lr", None),
                ("eps", (1e-30, 1e-3)),
                ("clip_threshold", 1.0),
                ("decay_rate", -0.8),
                ("beta1", None),
                ("weight_decay", 0.0),
                ("scale_parameter", True),
                ("relative_step", True),
                ("warmup_init", False),
            ],
        ),
        (  # timm 1.0.31, timm/optim/adafactor.py
            "from_timm",
            [
                ("params", E),
                ("lr", None),
                ("eps", 1e-30),
                ("eps_scale", 1e-3),
                ("clip_threshold", 1.0),
                ("decay_rate", -0.8),
                ("betas", None),
                ("weight_decay", 0.0),
                ("scale_parameter", True),
                ("warmup_init", False),
                ("min_dim_size_to_factor", 16),
                ("caution", False),
            ],
        ),
        (  # timm 1.0.31, timm/optim/adafactor_bv.py
            "from_big_vision",
            [
                ("params", E),
                ("lr", 1.0),
                ("min_dim_size_to_factor", 16),
                ("decay_rate", 0.8),
                ("decay_offset", 0),
                ("beta2_cap", 0.999),
                ("momentum", 0.9),
                ("momentum_dtype", torch.bfloat16),
                ("eps", None),
                ("weight_decay", 0.0),
                ("clipping_threshold", None),
                ("unscaled_wd", False),
                ("caution", False),
                ("corrected_weight_decay", False),
            ],
        ),
        (  # optax 0.2.8, optax/_src/alias.py (params first: torch optimizers take them)
            "from_optax",
            [
                ("params", E),
                ("learning_rate", None),
                ("min_dim_size_to_factor", 128),
                ("decay_rate", 0.8),
                ("decay_offset", 0),
                ("multiply_by_parameter_scale", True),
                ("clipping_threshold", 1.0),
                ("momentum", None),
                ("dtype_momentum", torch.float32),
                ("weight_decay_rate", None),
                ("eps", 1e-30),
                ("factored", True),
                ("weight_decay_mask", None),
            ],
        ),
    ],
)
def test_reference_signatures(name: str, expected: list[tuple[str, Any]]) -> None:
    assert _signature(getattr(constructors, name), 1) == [(n, d, P) for n, d in expected]


@needs_wiring
def test_classmethods_are_the_module_functions() -> None:
    for name in (*BACKEND_CTOR.values(), "from_keras"):
        method = getattr(Adafactor, name)
        assert method.__func__ is getattr(constructors, name)
        assert next(iter(inspect.signature(method).parameters)) == "params"


# ---------------------------------------------------------------------------------------------
# torch.optim.Adafactor, live, on torch's own sample and error inputs
# ---------------------------------------------------------------------------------------------
@functools.cache
def _torch_optim_info() -> Any:
    # torch's test helpers import expecttest (a test dependency of torch, not of this package)
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    (info,) = [i for i in optim_db if i.optim_cls is torch.optim.Adafactor]
    return info


def _model(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _train_side_by_side(
    ours: Adafactor, theirs: torch.optim.Optimizer, a: torch.nn.Module, b: torch.nn.Module
) -> dict[str, float]:
    """10 steps: gradients of model ``a``'s loss, copied onto ``b``; each parameter's worst
    difference relative to its largest movement under torch."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(10, 8, 2, 5, 5, generator=gen)
    targets = torch.randn(10, 8, 3, generator=gen)
    init = {n: p.detach().clone() for n, p in b.named_parameters()}
    trace_a, trace_b = [], []
    for x, y in zip(inputs, targets):
        ours.zero_grad()
        theirs.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        ours.step()
        theirs.step()
        trace_a.append({n: p.detach().clone() for n, p in a.named_parameters()})
        trace_b.append({n: p.detach().clone() for n, p in b.named_parameters()})
    worst = {}
    for n in init:
        movement = max(float((s[n] - init[n]).abs().max()) for s in trace_b)
        assert movement > 0, n
        worst[n] = max(float((sa[n] - sb[n]).abs().max()) for sa, sb in zip(trace_a, trace_b))
        worst[n] /= movement
    return worst


def _torch_samples() -> list[Any]:
    """torch's sample kwargs, plus torch's group keys and d = inf, which its samples lack."""
    return [{"d": math.inf, "lr": 0.02}, {"eps": (1e-10, 1e-2), "weight_decay": 0.01}]


@pytest.mark.parametrize("extra", [None, *_torch_samples()], ids=["optim_db", "d_inf", "eps"])
def test_torch_samples_match_live_torch(extra: dict[str, Any] | None) -> None:
    """Every kwargs of torch's optim_inputs_func, verbatim, against torch.optim.Adafactor.

    Tolerance: both sides run float32 with different but correct rounding (torch takes RMS as
    norm / sqrt(n), V_hat as (R @ C) / mean(R); ours sums per row and column), which leaves
    ~1e-6 of the movement after 10 steps; a semantic difference (eps1 placement, the weight
    decay's lr, the clipping threshold) shows as 1e-3 or more. 1e-4 of each parameter's largest
    movement separates the two, as in test_parity_golden."""
    if extra is None:
        info = _torch_optim_info()
        samples = [s.kwargs for s in info.optim_inputs_func(device="cpu", dtype=torch.float32)]
        assert len(samples) >= 5
    else:
        samples = [extra]
    for kwargs in samples:
        a, b = _model(), _model()
        ours = _quiet(functools.partial(ctor("from_torch"), a.parameters(), **kwargs))
        theirs = torch.optim.Adafactor(b.parameters(), **kwargs)
        worst = _train_side_by_side(ours, theirs, a, b)
        bad = {n: e for n, e in worst.items() if not e <= RTOL}
        assert not bad, f"from_torch(**{kwargs}): relative error above {RTOL}: {bad}"


def test_torch_error_inputs_raise_torch_types() -> None:
    """Every error input of torch's OptimizerInfo raises (or warns) with torch's exception type,
    at construction or at the first step, and with a message torch's regex finds."""
    info = _torch_optim_info()
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    errors = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert any(e.error_on == OptimizerErrorEnum.STEP_ERROR for e in errors)
    for error in errors:
        sample = error.optimizer_error_input
        params, kwargs = sample.params, dict(sample.kwargs)

        def build_and_step(params: Any = params, kwargs: dict[str, Any] = kwargs) -> None:
            opt = ctor("from_torch")(params, **kwargs)
            opt.step()

        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                build_and_step()
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                build_and_step()


def test_torch_group_keys_are_translated_per_group() -> None:
    """Param groups with torch's keys (d, eps, foreach) step as torch.optim.Adafactor does."""
    a, b = _model(), _model()

    def groups(m: torch.nn.Module) -> list[dict[str, Any]]:
        ps = list(m.parameters())
        return [
            {"params": ps[:2], "d": 1.5, "eps": (None, 1e-2), "foreach": True},
            {"params": ps[2:4], "lr": 1e-3, "weight_decay": 0.1, "foreach": False},
            {"params": ps[4:], "eps": [1e-10, 1e-3], "beta2_decay": -0.5},
        ]

    ours = _quiet(lambda: ctor("from_torch")(groups(a)))
    theirs = torch.optim.Adafactor(groups(b))
    g0, g1, g2 = ours.param_groups
    assert not {"d", "eps", "foreach"} & (set(g0) | set(g1) | set(g2))
    assert (g0["clip_threshold"], g0["eps1"], g0["eps2"]) == (1.5, None, 1e-2)
    assert (g1["lr"], g1["weight_decay"], g1["clip_threshold"]) == (1e-3, 0.1, 1.0)
    assert (g2["eps1"], g2["eps2"], g2["beta2_decay"]) == (1e-10, 1e-3, -0.5)
    worst = _train_side_by_side(ours, theirs, a, b)
    assert max(worst.values()) <= RTOL, worst


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": "0.01"}, TypeError, r"lr must be a real number, got '0.01'"),
        ({"lr": None}, TypeError, r"lr must be a real number, got None"),
        ({"lr": lambda step: 0.01}, TypeError, r"preset='torch', lr=schedule"),
        ({"lr": -1.0}, ValueError, r"Learning rate should be >= 0 but is: -1.0"),
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"Tensor lr must be 1-element"),
        ({"beta2_decay": 0.5}, ValueError, r"beta2_decay should be <= 0 but is: 0.5"),
        ({"eps": 1e-3}, TypeError, r"eps must be a pair \(eps1, eps2\), got 0.001"),
        ({"eps": (None, -1.0)}, ValueError, r"epsilon2 should be >= 0 but is: -1.0"),
        ({"eps": (1e-30, 1e-3)}, ValueError, r"eps1=1e-30 with eps1_mode='clamp'"),
        ({"d": 0.5}, ValueError, r"Clipping threshold d should be >= 1 but is: 0.5"),
        ({"weight_decay": -0.1}, ValueError, r"weight_decay should be >= 0 but is: -0.1"),
    ],
)
def test_from_torch_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ctor("from_torch")(_model().parameters(), **kwargs)


def test_from_torch_group_errors() -> None:
    ps = list(_model().parameters())
    with pytest.raises(
        ValueError,
        match=r"param_groups\[1\]: the group sets both d .*clip_threshold=2.0\) and clip",
    ):
        ctor("from_torch")([{"params": ps[:2]}, {"params": ps[2:], "d": 2.0, "clip_threshold": 1}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Clipping threshold d should be >= 1"):
        ctor("from_torch")([{"params": ps, "d": 0.5}])
    complex_param = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="view_as_real"):
        ctor("from_torch")([{"params": [complex_param]}])


# ---------------------------------------------------------------------------------------------
# transformers, timm, big_vision, optax: checks and options
# ---------------------------------------------------------------------------------------------
def _ps() -> list[torch.nn.Parameter]:
    return list(_model().parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 1e-3}, r"Cannot combine manual `lr` and `relative_step=True` options: lr=0.001"),
        ({"lr": 1e-3, "warmup_init": True, "relative_step": False}, r"`warmup_init=True` requires"),
        ({"relative_step": False}, r"lr=None with relative_step=False"),
    ],
)
def test_from_transformers_checks(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ctor("from_transformers")(_ps(), **kwargs)


def test_from_transformers_groups() -> None:
    ps = _ps()
    opt = ctor("from_transformers")(
        [{"params": ps[:2], "eps": (1e-20, 1e-2), "decay_rate": -0.6}, {"params": ps[2:]}],
        lr=1e-3,
        relative_step=False,
    )
    g0, g1 = opt.param_groups
    assert (g0["eps1"], g0["eps2"], g0["beta2_decay"], g0["lr"]) == (1e-20, 1e-2, -0.6, 1e-3)
    assert (g1["eps1"], g1["eps2"], g1["beta2_decay"], g1["lr"]) == (1e-30, 1e-3, -0.8, 1e-3)
    assert "eps" not in g0 and "decay_rate" not in g0
    # transformers ignores a group's lr in relative mode: refused instead of silently capping
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Cannot combine manual `lr`"):
        ctor("from_transformers")([{"params": ps, "lr": 1e-3}])
    relative = ctor("from_transformers")([{"params": ps, "relative_step": True}], lr=0.5,
                                         relative_step=False)  # fmt: skip
    assert relative.param_groups[0]["lr"] == 1e-2  # transformers' constant cap, not lr=0.5


def test_from_timm_options() -> None:
    relative = ctor("from_timm")(_ps())
    g = relative.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["lr"]) == (True, True, 1e-2)
    assert g["min_dim_size_to_factor"] == 17 and g["weight_decay_mode"] == "alpha"
    external = ctor("from_timm")(_ps(), lr=1e-3, betas=(0.9, 0.999))
    g = external.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["lr"], g["beta1"]) == (
        False,
        False,  # timm never scales an explicit lr by RMS(x)
        1e-3,
        0.9,
    )
    with pytest.raises(ValueError, match=r"warmup_init requires relative_step=True"):
        ctor("from_timm")(_ps(), lr=1e-3, warmup_init=True)
    with pytest.raises(NotImplementedError, match=r"caution=True"):
        ctor("from_timm")(_ps(), caution=True)
    with pytest.raises(NotImplementedError, match=r"param_groups\[0\]: caution=True"):
        ctor("from_timm")([{"params": _ps(), "caution": True}])


def test_from_timm_warns_for_its_leading_dims_rule() -> None:
    conv = torch.nn.Parameter(torch.randn(32, 24, 3, 3))  # timm: dims (0, 1); here: none
    with pytest.warns(UserWarning, match=r"timm factors their second moment over dims \(0, 1\)"):
        ctor("from_timm")([conv])
    _quiet(lambda: ctor("from_timm")([{"params": [conv], "factor_dims": "largest2"}]))
    _quiet(lambda: ctor("from_timm")([conv], min_dim_size_to_factor=24))  # 24 is not > 24


def test_from_big_vision_options() -> None:
    opt = ctor("from_big_vision")(_ps(), momentum_dtype="float32", eps=1e-20)
    g = opt.param_groups[0]
    assert (g["momentum_dtype"], g["eps1"], g["beta1"], g["beta2_cap"]) == (
        torch.float32,
        1e-20,
        0.9,
        0.999,
    )
    assert (g["beta2_decay"], g["momentum_kind"], g["clip_threshold"]) == (
        -0.8,
        "normalized_update",
        None,
    )
    g = ctor("from_big_vision")(_ps(), weight_decay=0.1).param_groups[0]
    assert (g["weight_decay"], g["weight_decay_mode"]) == (0.1, "lr")
    g = ctor("from_big_vision")(_ps(), weight_decay=0.1, unscaled_wd=True).param_groups[0]
    assert (g["weight_decay"], g["weight_decay_mode"]) == (0.1, "unscaled")
    groups = [{"params": _ps(), "momentum": None, "clipping_threshold": 2.0, "decay_rate": 0.5}]
    g = ctor("from_big_vision")(groups).param_groups[0]
    assert (g["beta1"], g["clip_threshold"], g["beta2_decay"]) == (None, 2.0, -0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay_offset": 10}, NotImplementedError, r"decay_offset=10"),
        ({"caution": True}, NotImplementedError, r"caution=True"),
        (
            {"weight_decay": 0.1, "corrected_weight_decay": True},
            NotImplementedError,
            r"lr_t\*\*2 / max_lr",
        ),
        ({"lr": 0.0, "corrected_weight_decay": True}, ValueError, r"positive max lr, got 0.0"),
        ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1.0"),
        ({"weight_decay": -1.0}, ValueError, r"Invalid weight_decay: -1.0"),
        ({"momentum_dtype": "int8"}, ValueError, r"momentum_dtype='int8' is not supported"),
    ],
)
def test_from_big_vision_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ctor("from_big_vision")(_ps(), **kwargs)


def test_from_optax_weight_decay_is_unscaled_and_masked() -> None:
    """optax: x <- x - (m + rate * x), no lr; the mask moves masked-out params to a group
    with weight_decay=0."""

    def one_step(**kwargs: Any) -> list[torch.Tensor]:
        model = _model()
        opt = ctor("from_optax")(model.parameters(), learning_rate=1e-2, **kwargs)
        x = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(3))
        model(x).square().mean().backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    x0 = [p.detach() for p in _model().parameters()]
    plain = one_step()
    decayed = one_step(weight_decay_rate=0.1)
    for p, q, x in zip(plain, decayed, x0):
        torch.testing.assert_close(q, p - 0.1 * x, rtol=1e-6, atol=1e-7)
    masked = one_step(weight_decay_rate=0.1, weight_decay_mask=lambda p: p.ndim > 1)
    for p, q, m, x in zip(plain, decayed, masked, x0):
        torch.testing.assert_close(m, q if x.ndim > 1 else p, rtol=0, atol=0)


def test_from_optax_options_and_errors() -> None:
    opt = ctor("from_optax")(_ps(), momentum=0.9, dtype_momentum="bfloat16", decay_rate=0.5)
    g = opt.param_groups[0]
    assert (g["beta1"], g["momentum_dtype"], g["beta2_decay"], g["lr"]) == (
        0.9,
        torch.bfloat16,
        -0.5,
        1.0,  # learning_rate=None: no learning-rate scaling
    )
    ps = _ps()
    opt = ctor("from_optax")(ps, weight_decay_rate=0.1, weight_decay_mask=[p.ndim > 1 for p in ps])
    assert [len(g["params"]) for g in opt.param_groups] == [3, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match=r"weight_decay_mask has 2 entries for 6 parameters"):
        ctor("from_optax")(_ps(), weight_decay_rate=0.1, weight_decay_mask=[True, False])
    with pytest.raises(NotImplementedError, match=r"decay_offset=100"):
        ctor("from_optax")(_ps(), decay_offset=100)
    with pytest.raises(NotImplementedError, match=r"weight_decay_rate=.* is a schedule"):
        ctor("from_optax")(_ps(), weight_decay_rate=lambda count: 1e-4)
    sched = ctor("from_optax")(_ps(), learning_rate=cosine_lr)
    assert sched.param_groups[0]["lr"] is cosine_lr


# ---------------------------------------------------------------------------------------------
# Adam habits
# ---------------------------------------------------------------------------------------------
FOREIGN: list[tuple[dict[str, Any], str]] = [
    ({"betas": (0.9, 0.999)}, r"'betas': use beta1=0.9 .*beta2_decay.*beta2=0.999"),
    ({"betas": (0.0, 0.99)}, r"'betas': use beta1=None \(no momentum\)"),
    ({"eps": 1e-8}, r"'eps': Adafactor has two epsilons: eps1.*eps2.*Adafactor\.from_torch"),
    ({"eps": (1e-30, 1e-3)}, r"'eps': use eps1=1e-30, eps2=0.001.*Adafactor\.from_torch"),
    ({"learning_rate": 1e-3}, r"'learning_rate': use lr=0.001.*from_keras.*from_optax"),
    ({"momentum": 0.9}, r"'momentum': use beta1=0.9"),
    ({"momentum": "normalized_update"}, r"momentum_kind='normalized_update'"),
    ({"decay_rate": -0.8}, r"'decay_rate': use beta2_decay=-0.8.*from_transformers"),
    ({"decay_rate": 0.8}, r"'decay_rate': use beta2_decay=-0.8: optax.*from_optax"),
    ({"d": 2.0}, r"'d': use clip_threshold=2.0.*Adafactor\.from_torch"),
    ({"foreach": True}, r"'foreach': Adafactor picks its own implementation: impl="),
    ({"fused": True}, r"'fused': Adafactor picks its own implementation: impl="),
    ({"amsgrad": True}, r"'amsgrad': Adafactor has no AMSGrad variant"),
    ({"capturable": True}, r"'capturable': Adafactor has no capturable"),
    ({"differentiable": False}, r"'differentiable': .*cannot be differentiated"),
    ({"beta_1": 0.9}, r"argument 'beta_1'; did you mean 'beta1'\?$"),
    ({"clip_treshold": 1.0}, r"argument 'clip_treshold'; did you mean 'clip_threshold'\?$"),
    ({"lerning_rate": 1.0}, r"did you mean 'learning_rate'\? use lr=1.0"),
    ({"zzz": 1}, r"^Adafactor\(\) got an unexpected keyword argument 'zzz'$"),
    (
        {"betas": (0.9, 0.999), "amsgrad": False},
        r"got unexpected keyword arguments 'betas', 'amsgrad':\n  'betas': .*\n  'amsgrad': ",
    ),
]


@pytest.mark.parametrize(("kwargs", "match"), FOREIGN, ids=[str(k) for k, _ in FOREIGN])
def test_foreign_kwargs_name_the_equivalent(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        constructors.reject_foreign_kwargs(kwargs)


def test_no_foreign_kwargs_is_fine() -> None:
    assert constructors.reject_foreign_kwargs({}) is None


@needs_wiring
@pytest.mark.parametrize(("kwargs", "match"), FOREIGN[:15], ids=[str(k) for k, _ in FOREIGN[:15]])
def test_adafactor_rejects_foreign_kwargs(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Adafactor(_ps(), **kwargs)


# ---------------------------------------------------------------------------------------------
# an explicit lr under the relative step
# ---------------------------------------------------------------------------------------------
LR_WARNING = r"Adafactor\(lr=0.001\) with relative_step=True uses lr as the cap of the relative"


@pytest.mark.parametrize(
    ("preset", "relative_step", "given", "warns"),
    [
        (None, True, False, True),
        ("transformers", True, False, True),  # transformers refuses an lr in relative mode
        ("t5", True, False, True),
        (None, True, True, False),  # relative_step=True passed: the caller chose the cap
        (None, False, False, False),
        ("torch", True, False, False),  # torch's, Keras' and the paper's lr is this cap
        ("keras", True, False, False),
        ("paper", True, False, False),
    ],
)
def test_lr_warning_condition(
    preset: str | None, relative_step: bool, given: bool, warns: bool
) -> None:
    def call() -> bool:
        return constructors.warn_explicit_lr_with_relative_step(
            1e-3,
            preset=preset,
            relative_step=relative_step,
            relative_step_given=given,
            scale_parameter=True,
        )

    if warns:
        with pytest.warns(UserWarning, match=LR_WARNING) as record:
            assert call()
        assert len(record) == 1
        assert "relative_step=False, scale_parameter=False" in str(record[0].message)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not call()


class _WiredHere(Adafactor):
    """Adafactor with the lead's __init__ wiring applied by a subclass (a local stand-in until
    optimizer.py calls the helper itself; its own warning, if any, is silenced here)."""

    def __init__(self, params: Any, lr: Any = None, **kwargs: Any) -> None:
        constructors.reject_foreign_kwargs(
            {k: v for k, v in kwargs.items() if k not in inspect.signature(Adafactor).parameters}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(params, **({} if lr is None else {"lr": lr}), **kwargs)
        if lr is not None:
            group = self.defaults
            constructors.warn_explicit_lr_with_relative_step(
                lr,
                preset=self.preset,
                relative_step=group["relative_step"],
                relative_step_given="relative_step" in kwargs,
                scale_parameter=group["scale_parameter"],
            )


def test_lr_warning_with_the_wiring_applied_locally() -> None:
    with pytest.warns(UserWarning, match=LR_WARNING) as record:
        _WiredHere(_ps(), lr=1e-3)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    for kwargs in (
        {},
        {"lr": 1e-3, "relative_step": False, "scale_parameter": False},
        {"lr": 1e-3, "preset": "torch"},
        {"lr": 1e-3, "relative_step": True},
    ):
        _quiet(lambda kwargs=kwargs: _WiredHere(_ps(), **kwargs))
    with pytest.raises(TypeError, match=r"'betas': use beta1=0.9"):
        _WiredHere(_ps(), betas=(0.9, 0.999))


@needs_wiring
def test_explicit_lr_warns_once() -> None:
    with pytest.warns(UserWarning, match=LR_WARNING) as record:
        Adafactor(_ps(), lr=1e-3)
    assert len(record) == 1 and record[0].filename == __file__
    _quiet(lambda: Adafactor(_ps()))
    _quiet(lambda: Adafactor(_ps(), lr=1e-3, relative_step=False, scale_parameter=False))
    _quiet(lambda: Adafactor(_ps(), lr=1e-3, preset="torch"))


def test_constructors_never_warn_with_their_defaults() -> None:
    for name in (*BACKEND_CTOR.values(), "from_keras"):
        _quiet(lambda name=name: ctor(name)(_ps()))
    _quiet(lambda: ctor("from_torch")(_ps(), lr=1e-3))  # torch's lr is the cap: no warning
    _quiet(lambda: ctor("from_transformers")(_ps(), lr=1e-3, relative_step=False))
    _quiet(lambda: ctor("from_timm")(_ps(), lr=1e-3))
