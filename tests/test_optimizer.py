"""The Adafactor class: every configuration of the table, state_dict, torch conventions, errors."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

from adafactor import PRESETS, Adafactor
from adafactor._state import expected_state
from tests.conftest import SHAPES, make_grads, make_params
from tests.optim_inputs import ERROR_INPUTS, OPTIM_INPUTS, AdafactorInput, ErrorInput


def _build(sample: AdafactorInput, seed: int = 0):
    params = make_params(torch.bfloat16 if sample.bf16 else torch.float32, seed)
    kwargs = dict(sample.kwargs)
    if kwargs.get("stochastic_rounding"):
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return params, Adafactor(params, **kwargs)


def _run(params, opt, steps: range, seed: int = 0) -> None:
    for step in steps:
        for p, g in zip(params, make_grads(params, step, seed)):
            p.grad = g
        opt.step()


def _ids(samples):
    return [s.desc for s in samples]


@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=_ids(OPTIM_INPUTS))
def test_every_config_trains_every_shape(sample):
    params, opt = _build(sample)
    initial = [p.detach().clone() for p in params]
    _run(params, opt, range(5))
    for name, p, p0 in zip(SHAPES, params, initial):
        assert torch.isfinite(p).all(), name
        if p.numel() and not sample.bf16:  # bf16 may round a small step away: that is the point
            assert not torch.equal(p, p0), f"{name} did not move"  # of stochastic rounding
        state = opt.state[p]
        assert state["step"].item() == 5
        group = opt.param_groups[0]
        assert set(state) == set(expected_state(p, group)), name
    stats = opt.last_step_stats[0]
    assert stats is not None
    # one entry per parameter with a gradient; empty parameters report alpha_t = RMS(U) = 0
    assert stats.alpha.shape == stats.update_rms.shape == stats.clipped.shape == (len(params),)
    empty = torch.tensor([p.numel() == 0 for p in params])
    assert bool((stats.alpha[empty] == 0).all()) and bool((stats.alpha[~empty] > 0).all())


@pytest.mark.parametrize("sample", OPTIM_INPUTS, ids=_ids(OPTIM_INPUTS))
def test_state_dict_resume_is_bit_exact(sample):
    params, opt = _build(sample)
    _run(params, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    rng_state = opt.generator.get_state() if opt.generator is not None else None
    _run(params, opt, range(3, 6))

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    kwargs = dict(sample.kwargs)
    if rng_state is not None:
        kwargs["generator"] = torch.Generator()
        kwargs["generator"].set_state(rng_state)
    opt2 = Adafactor(resumed, **kwargs)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=False))
    _run(resumed, opt2, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert value.dtype == opt2.state[q][key].dtype, key
            assert torch.equal(value, opt2.state[q][key]), key


def test_deepcopy_and_pickle_keep_the_constructor_options():
    model = torch.nn.Linear(4, 3)
    opt = Adafactor(model.parameters(), impl="reference", global_clipnorm=1.0, preset="t5")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.impl, clone.global_clipnorm, clone.preset) == ("reference", 1.0, "t5")
        assert clone.carry_param_rms is True and clone.last_step_stats == []
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()  # steps its own copies of the parameters
        assert clone.last_step_stats[0] is not None
        assert not torch.equal(clone.param_groups[0]["params"][0], model.weight)


@pytest.mark.parametrize("case", ERROR_INPUTS, ids=[f"{list(e.kwargs)}" for e in ERROR_INPUTS])
def test_invalid_hyperparameters_raise_clear_errors(case: ErrorInput):
    with pytest.raises(case.error, match=case.match):
        Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], **case.kwargs)


def test_invalid_group_option_is_caught_in_add_param_group():
    opt = Adafactor([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"beta1 must be in \[0.0, 1.0\), got 2.0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "beta1": 2.0})


def test_explicit_keyword_overrides_preset_even_when_equal_to_generic_default():
    p = torch.nn.Parameter(torch.zeros(2))
    assert Adafactor([p], preset="keras").defaults["lr"] == 1e-3
    assert Adafactor([p], preset="keras", lr=1e-2).defaults["lr"] == 1e-2
    assert Adafactor([p], preset="big_vision", beta1=None).defaults["beta1"] is None
    for name, values in PRESETS.items():
        defaults = Adafactor([p], preset=name).defaults
        assert all(defaults[k] == v for k, v in values.items()), name


def test_param_groups_use_their_own_options():
    a, b = make_params(shapes={"w": (6, 4)}), make_params(seed=1, shapes={"v": (5,)})
    together = Adafactor([{"params": a, "beta1": 0.9}, {"params": b, "weight_decay": 0.1}])
    a2 = [torch.nn.Parameter(p.detach().clone()) for p in a]
    b2 = [torch.nn.Parameter(p.detach().clone()) for p in b]
    apart = [Adafactor(a2, beta1=0.9), Adafactor(b2, weight_decay=0.1)]
    for step in range(4):
        for group in (a, b, a2, b2):
            for p, g in zip(group, make_grads(group, step)):
                p.grad = g
        together.step()
        for o in apart:
            o.step()
    assert torch.equal(a[0], a2[0]) and torch.equal(b[0], b2[0])


def test_lr_scheduler_drives_the_learning_rate():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params, lr=0.1, relative_step=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for step in range(3):
        params[0].grad = make_grads(params, step)[0]
        opt.step()
        lrs.append(opt.last_step_stats[0].lr)
        sched.step()
    assert lrs == [0.1, 0.05, 0.025]


def test_lr_schedule_callable_and_tensor_lr_match_floats():
    def schedule(i: int) -> float:
        return 0.1 / (i + 1)

    def run(lr_per_step):
        params = make_params(shapes={"w": (6, 4), "b": (4,)})
        opt = Adafactor(
            params, lr=lr_per_step if callable(lr_per_step) else 0.0, relative_step=False
        )
        for step in range(4):
            if not callable(lr_per_step):
                opt.param_groups[0]["lr"] = lr_per_step[step]
            for p, g in zip(params, make_grads(params, step)):
                p.grad = g
            opt.step()
        return params

    expected = run([schedule(i) for i in range(4)])
    for p, q in zip(run(schedule), expected):
        assert torch.equal(p, q)
    # a float32 tensor lr differs from the float64 value by its rounding, nothing more
    for p, q in zip(run([torch.tensor(schedule(i)) for i in range(4)]), expected):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_stats_report_alpha_and_clipping():
    p = torch.nn.Parameter(torch.full((4, 4), 0.5))
    opt = Adafactor([p], lr=1e-2)
    grad = torch.full((4, 4), 1e-3)
    grad[0, 0] = 1.0  # a loud entry: RMS(U) >> 1 once beta2 > 0
    p.grad = grad
    opt.step()
    stats = opt.last_step_stats[0]
    assert stats.alpha.item() == pytest.approx(0.5 * 1e-2)  # max(eps2, RMS(x)) * min(lr, 1/sqrt 1)
    p.grad = torch.full((4, 4), 1e-3)
    p.grad[0, 0] = 1.0
    p.grad[3, 3] = 1.0
    opt.step()
    stats = opt.last_step_stats[0]
    assert stats.update_rms.item() > 1.0 and stats.clipped.item()


def test_closure_runs_with_grad_enabled():
    model = torch.nn.Linear(3, 2)
    opt = Adafactor(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.state[model.weight]["step"].item() == 1


def test_maximize_equals_minimizing_the_negated_gradient():
    def run(maximize: bool):
        params = make_params(shapes={"w": (6, 4), "b": (4,)})
        opt = Adafactor(params, maximize=maximize, weight_decay=0.1)
        for step in range(3):
            for p, g in zip(params, make_grads(params, step)):
                p.grad = g if maximize else -g
            opt.step()
        return params

    for p, q in zip(run(True), run(False)):
        assert torch.equal(p, q)


def test_grad_scaler_skips_inf_steps_and_unscales():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # initialises the scale, as scaling the loss would
    params[0].grad = torch.full((6, 4), float("inf"))
    before = params[0].detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(params[0], before) and not opt.state[params[0]]
    reference = [torch.nn.Parameter(params[0].detach().clone())]
    ref_opt = Adafactor(reference)
    grad = make_grads(params, 0)[0]
    params[0].grad = grad * scaler.get_scale()
    reference[0].grad = grad.clone()
    scaler.step(opt)
    ref_opt.step()
    torch.testing.assert_close(params[0], reference[0])


def test_skip_nonfinite_counts_and_leaves_state_untouched():
    params = make_params(shapes={"w": (6, 4), "b": (4,)})
    opt = Adafactor(params, skip_nonfinite=True)
    _run(params, opt, range(2))
    snapshot = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    params[0].grad = make_grads(params, 2)[0]
    params[1].grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    opt.step()
    assert int(opt.param_groups[0]["skipped_steps"]) == 1
    stats = opt.last_step_stats[0]  # a skipped step applied step size 0
    assert stats is not None and not bool(stats.alpha.any())
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    for key, value in snapshot["state"][0].items():
        assert torch.equal(opt.state[params[0]][key], value)


def test_nonfinite_gradient_without_opt_in_propagates_as_documented():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adafactor([p])
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert torch.isnan(p).all()  # RMS(U) is NaN, so the whole tensor is: as in every reference


def test_ema_is_saved_and_finalized():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params, use_ema=True, ema_momentum=0.5)
    initial = params[0].detach().clone()
    _run(params, opt, range(1))
    ema = opt.state[params[0]]["ema"]
    torch.testing.assert_close(ema, 0.5 * initial + 0.5 * params[0].detach())
    assert "ema" in opt.state_dict()["state"][0]
    opt.finalize_variable_values()
    assert torch.equal(params[0], ema)


def test_ema_overwrites_weights_every_frequency_steps():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2)
    _run(params, opt, range(1))
    assert not torch.equal(params[0], opt.state[params[0]]["ema"])
    _run(params, opt, range(1, 2))
    assert torch.equal(params[0], opt.state[params[0]]["ema"])


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
    ],
)
def test_state_dtype_follows_compute_precision(dtype, state_dtype):
    params = make_params(dtype, shapes={"w": (6, 4), "b": (4,)})
    opt = Adafactor(params, beta1=0.9, momentum_dtype=torch.bfloat16)
    _run(params, opt, range(2))
    assert opt.state[params[0]]["row_var"].dtype == state_dtype
    assert opt.state[params[1]]["variance"].dtype == state_dtype
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert all(p.dtype == dtype for p in params)


def test_step_counts_exactly_beyond_float32_range():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adafactor([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step"].fill_(2**24 + 1)
    opt.step()
    assert opt.state[p]["step"].item() == 2**24 + 2


def test_loads_a_torch_optim_adafactor_checkpoint():
    shapes = {"w": (6, 4), "t": (3, 5, 2), "b": (4,)}
    ours = make_params(shapes=shapes)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    torch_opt = torch.optim.Adafactor(theirs, lr=1e-2)
    _run(theirs, torch_opt, range(3))
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
    opt = Adafactor(ours, preset="torch")
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.state[ours[0]]["step"].dtype == torch.float64
    assert opt.param_groups[0]["clip_threshold"] == 1.0
    _run(theirs, torch_opt, range(3, 6))
    _run(ours, opt, range(3, 6))
    for p, q in zip(ours, theirs):
        movement = 1e-2
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4 * movement)


def test_state_dict_from_a_different_layout_is_rejected():
    params = make_params(shapes={"t": (16, 4, 8)})
    opt = Adafactor(params)
    _run(params, opt, range(1))
    # Same parameter count, other shape: loading would silently misapply the factors.
    other = Adafactor(make_params(shapes={"t": (16, 8, 4)}))
    with pytest.raises(
        ValueError,
        match=r"state\['row_var'\] of the parameter with id 0 has shape "
        r"\(16, 4, 1\), but this optimizer expects \(16, 8, 1\)",
    ):
        other.load_state_dict(opt.state_dict())
    too_few = Adafactor(make_params(shapes={"v": (4,)}))
    with pytest.raises(
        ValueError,
        match=r"shape \(4,\)\) has state \['col_var', 'row_var', 'step'\], "
        r"but this optimizer expects \['step', 'variance'\]",
    ):
        too_few.load_state_dict(opt.state_dict())


def test_sparse_complex_and_integer_parameters_are_rejected_clearly():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Adafactor(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradient; Adafactor needs dense gradients"):
        opt.step()
    with pytest.raises(TypeError, match=r"complex parameter of dtype torch.complex64"):
        Adafactor([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match=r"dtype torch.int64 is not floating point"):
        Adafactor([torch.zeros(2, dtype=torch.long)])


def test_from_keras_uses_keras_names_and_defaults():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor.from_keras(params, weight_decay=0.01, clipnorm=1.0, name="af")
    group = opt.param_groups[0]
    assert opt.name == "af" and opt.preset == "keras"
    assert group["lr"] == 0.001 and group["weight_decay"] == 0.01
    assert group["weight_decay_mode"] == "lr_before" and group["clipnorm"] == 1.0
    with pytest.warns(UserWarning, match=r"tf_keras ignores relative_step=False"):
        Adafactor.from_keras(params, relative_step=False)
    with pytest.raises(TypeError):
        Adafactor.from_keras(params, beta_1=0.9)  # Keras has no such argument either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Adafactor.from_keras(params)


def test_update_clipping_bounds_the_update_rms():
    p = torch.nn.Parameter(torch.ones(8, 8))
    opt = Adafactor([p], lr=1.0, relative_step=False, scale_parameter=False, clip_threshold=0.5)
    p.grad = torch.ones(8, 8) * 1e-3
    opt.step()
    before = p.detach().clone()
    p.grad = torch.ones(8, 8)  # 1000x louder than the history: RMS(U) >> d
    opt.step()
    update = before - p.detach()
    assert math.sqrt(update.square().mean().item()) == pytest.approx(0.5, rel=1e-5)


# --- checkpoint edges ----------------------------------------------------------------------------
def test_plain_number_step_loads_and_steps():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params)
    _run(params, opt, range(2))
    sd = opt.state_dict()
    sd["state"][0]["step"] = 2  # older torch checkpoints stored a Python number
    fresh = Adafactor(params)
    fresh.load_state_dict(sd)
    assert fresh.state[params[0]]["step"].dtype == torch.float64
    _run(params, fresh, range(2, 3))
    assert int(fresh.state[params[0]]["step"]) == 3


def test_bad_state_dict_leaves_the_optimizer_as_it_was():
    params = make_params(shapes={"w": (6, 4), "b": (4,)})
    opt = Adafactor(params)
    _run(params, opt, range(2))
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = 0.5
    bad["state"][1]["variance"] = torch.zeros(3)  # the second parameter's state has a bad shape
    with pytest.raises(ValueError, match=r"state\['variance'\] of the parameter with id 1"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == before["param_groups"][0]["lr"]
    for pid, st in before["state"].items():
        assert all(torch.equal(after["state"][pid][k], v) for k, v in st.items())


def test_load_hooks_behave_as_in_torch():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params)
    _run(params, opt, range(1))
    sd = opt.state_dict()
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        out = copy.deepcopy(state_dict)
        out["param_groups"][0]["lr"] = 0.123  # the hook's result is what gets loaded
        return out

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    opt.load_state_dict(sd)
    assert calls == ["pre", "post"]
    assert opt.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize("preset", [None, *PRESETS])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_zero_lr_step_never_changes_parameters(preset, impl):
    """torch.distributed.checkpoint's get_state_dict steps a fresh optimizer once with lr=0 and
    zero gradients to create its state: no weight-decay form may move the weights."""
    params = make_params(shapes={"w": (6, 4), "b": (4,)})
    before = [p.detach().clone() for p in params]
    opt = Adafactor(params, preset=preset, weight_decay=0.1, impl=impl)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_torch_format_export_continues_in_torch():
    shapes = {"w": (6, 4), "b": (4,)}
    ours_params, torch_params = make_params(shapes=shapes), make_params(shapes=shapes)
    ours = Adafactor.from_torch(ours_params, lr=1e-2, weight_decay=0.01)
    _run(ours_params, ours, range(3))
    with torch.no_grad():
        for a, b in zip(torch_params, ours_params):
            a.copy_(b)
    theirs = torch.optim.Adafactor(torch_params, lr=1e-2, weight_decay=0.01)
    theirs.load_state_dict(copy.deepcopy(ours.torch_state_dict()))  # (it would share tensors)
    _run(ours_params, ours, range(3, 6))
    _run(torch_params, theirs, range(3, 6))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_format_export_refuses_state_torch_lacks():
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params, beta1=0.9)
    with pytest.raises(ValueError, match=r"beta1=0\.9 keeps state that torch\.optim\.Adafactor"):
        opt.torch_state_dict()


def test_checkpoints_with_the_old_momentum_key_are_migrated():
    """Before momentum_kind, the semantics lived under "momentum", which torch clients read as a
    number (OneCycleLR's cycle_momentum crashed with KeyError)."""
    params = make_params(shapes={"w": (6, 4)})
    opt = Adafactor(params, beta1=0.9, momentum_kind="normalized_update")
    _run(params, opt, range(2))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        group["momentum"] = group.pop("momentum_kind")
        group["skipped_steps"] = 0  # an int before it became a tensor
    fresh = Adafactor(params, beta1=0.9)
    fresh.load_state_dict(old)
    group = fresh.param_groups[0]
    assert group["momentum_kind"] == "normalized_update" and "momentum" not in group
    assert isinstance(group["skipped_steps"], torch.Tensor)
    with pytest.raises(ValueError, match="momentum"):  # torch's own check: no momentum to cycle
        torch.optim.lr_scheduler.OneCycleLR(fresh, max_lr=0.1, total_steps=10)
