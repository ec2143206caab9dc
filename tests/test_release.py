"""Gradient release (``gradient_release=True``): each parameter is stepped in backward and its
gradient freed; parameters, state and stats equal the normal ``opt.step()`` loop bit for bit."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from adafactor import Adafactor
from tests.conftest import SHAPES
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput

Released = Adafactor


# ---------------------------------------------------------------------------------------------
# a model whose parameters have every shape of tests/conftest.py
# ---------------------------------------------------------------------------------------------
class ShapesModel(nn.Module):
    """One parameter per shape of SHAPES; the loss uses them in an order other than theirs, so
    backward completes the gradients (and release steps them) in yet another order."""

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList(
            nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in SHAPES.values()
        )
        n = len(self.ps)
        self.use_order = [(3 * i + 1) % n for i in range(n)]  # a permutation (n = 11)

    def loss(self, step: int, skip: tuple[int, ...] = ()) -> Tensor:
        """A loss of every parameter but those of ``skip``; its gradients change with ``step``."""
        gen = torch.Generator().manual_seed(100 + step)
        total = torch.zeros((), dtype=torch.float32)
        for i in self.use_order:
            p = self.ps[i]
            a = torch.randn(p.shape, generator=gen).to(p.dtype)
            b = torch.randn(p.shape, generator=gen).to(p.dtype)
            if i not in skip:  # a product makes the gradient depend on p: b + 2 a p
                total = total + (p * b + a * p * p).sum().float() * 1e-2
        return total


def _kwargs(sample: AdafactorInput, seed: int = 0) -> dict[str, Any]:
    kwargs = dict(sample.kwargs)
    if kwargs.get("stochastic_rounding"):
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


def _dtype(sample: AdafactorInput) -> torch.dtype:
    return torch.bfloat16 if sample.bf16 else torch.float32


def _train(model: ShapesModel, opt: Any, steps: range) -> list[Any]:
    """The loop frameworks run; with release, step() and zero_grad() are no-ops. Returns the
    stats of each step."""
    stats = []
    for step in steps:
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()
        stats.append(copy.copy(opt.last_step_stats))
    return stats


def _assert_same(a: ShapesModel, opt_a: Any, b: ShapesModel, opt_b: Any) -> None:
    """Parameters and every state tensor equal bit for bit (and have the same dtype)."""
    for name, p, q in zip(SHAPES, a.ps, b.ps):
        assert p.dtype == q.dtype and torch.equal(p, q), name
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb), name
        for key, value in sa.items():
            assert value.dtype == sb[key].dtype, (name, key)
            assert torch.equal(value, sb[key]), (name, key)


def _assert_same_stats(a: Any, b: Any) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


RELEASABLE = [s for s in OPTIM_INPUTS if "global_clipnorm" not in s.kwargs]
# the table's "lr schedule" row keeps relative_step=True on purpose
_LR_WARNING = "ignore:Adafactor\\(lr=a schedule\\) with relative_step=True:UserWarning"


@pytest.mark.filterwarnings(_LR_WARNING)
@pytest.mark.parametrize("sample", RELEASABLE, ids=[s.desc for s in RELEASABLE])
def test_release_equals_the_normal_loop_bit_for_bit(sample: AdafactorInput) -> None:
    released = ShapesModel(_dtype(sample))
    opt = Released(released.ps, gradient_release=True, **_kwargs(sample))
    released_stats = _train(released, opt, range(4))
    assert all(p.grad is None for p in released.ps)

    normal = ShapesModel(_dtype(sample))
    index = {id(p): i for i, p in enumerate(released.ps)}
    order = [index[id(p)] for p in opt._release.order]
    assert sorted(order) == list(range(len(SHAPES))) and order != sorted(order)
    # Stochastic rounding draws from the generator in the order the parameters are stepped:
    # release equals the normal loop over the parameters listed in hook order.
    listed = order if sample.kwargs.get("stochastic_rounding") else range(len(SHAPES))
    ref = Adafactor([normal.ps[i] for i in listed], **_kwargs(sample))
    normal_stats = _train(normal, ref, range(4))
    _assert_same(released, opt, normal, ref)
    for mine, theirs in zip(released_stats, normal_stats):  # one StepStats per backward
        if listed != order:
            _assert_same_stats(mine[0], theirs[0])
        else:  # the normal loop lists them in hook order: compare entry by entry
            where = [order.index(i) for i in range(len(SHAPES))]
            assert torch.equal(mine[0].lr, theirs[0].lr)
            for x, y in zip(mine[0][1:], theirs[0][1:]):
                assert torch.equal(x, y[where])


@pytest.mark.filterwarnings(_LR_WARNING)
@pytest.mark.parametrize("sample", RELEASABLE, ids=[s.desc for s in RELEASABLE])
def test_release_state_dict_resumes_bit_exactly(sample: AdafactorInput) -> None:
    model = ShapesModel(_dtype(sample))
    opt = Released(model.ps, gradient_release=True, **_kwargs(sample))
    _train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = [p.detach().clone() for p in model.ps]
    rng = opt.generator.get_state() if opt.generator is not None else None
    _train(model, opt, range(3, 6))

    resumed = ShapesModel(_dtype(sample))
    with torch.no_grad():
        for p, value in zip(resumed.ps, saved):
            p.copy_(value)
    kwargs = _kwargs(sample)
    if rng is not None:
        kwargs["generator"].set_state(rng)
    opt2 = Released(resumed.ps, gradient_release=True, **kwargs)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=False))
    _train(resumed, opt2, range(3, 6))
    _assert_same(model, opt, resumed, opt2)


def test_checkpoints_move_between_release_and_the_normal_loop() -> None:
    kwargs = {"beta1": 0.9, "use_ema": True}
    normal = ShapesModel()
    ref = Adafactor(normal.ps, **kwargs)
    _train(normal, ref, range(2))
    released = copy.deepcopy(normal)
    opt = Released(released.ps, gradient_release=True, **kwargs)
    opt.load_state_dict(ref.state_dict())  # a normal loop's checkpoint, continued with release
    _train(normal, ref, range(2, 5))
    _train(released, opt, range(2, 5))
    _assert_same(released, opt, normal, ref)


def test_lr_scheduler_sets_the_lr_of_the_next_backward() -> None:
    kwargs = {"lr": 0.1, "relative_step": False}
    released, normal = ShapesModel(), ShapesModel()
    opt = Released(released.ps, gradient_release=True, **kwargs)
    ref = Adafactor(normal.ps, **kwargs)
    lrs = []
    for o, m in ((opt, released), (ref, normal)):
        sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
        for step in range(3):
            m.loss(step).backward()
            o.step()
            o.zero_grad()
            lrs.append(float(o.last_step_stats[0].lr))
            sched.step()
    assert lrs == [0.1, 0.05, 0.025] * 2
    _assert_same(released, opt, normal, ref)


def test_step_and_zero_grad_are_no_ops_and_counters_advance_once_per_backward() -> None:
    model = ShapesModel()
    opt = Released(model.ps, gradient_release=True)
    model.loss(0).backward()
    after = [p.detach().clone() for p in model.ps]
    stats = opt.last_step_stats
    state = copy.deepcopy(opt.state_dict()["state"])
    for _ in range(2):
        assert opt.step() is None
        opt.zero_grad()
    assert opt.last_step_stats is stats and stats[0] is not None
    assert all(torch.equal(p, q) for p, q in zip(model.ps, after))
    for key, value in opt.state_dict()["state"].items():
        assert all(torch.equal(value[k], state[key][k]) for k in value)
    model.loss(1).backward()
    assert {float(s["step"]) for s in opt.state.values()} == {2.0}


def test_step_with_a_closure_is_a_clear_error() -> None:
    model = ShapesModel()
    opt = Released(model.ps, gradient_release=True)
    with pytest.raises(RuntimeError, match=r"opt.step\(closure\) with gradient_release=True"):
        opt.step(lambda: model.loss(0))


def test_remove_gradient_release_returns_to_normal_steps() -> None:
    released, normal = ShapesModel(), ShapesModel()
    opt = Released(released.ps, gradient_release=True, beta1=0.9)
    ref = Adafactor(normal.ps, beta1=0.9)
    _train(released, opt, range(2))
    opt.remove_gradient_release()
    released.loss(2).backward()
    assert all(p.grad is not None for p in released.ps)  # no hook any more
    opt.step()
    opt.zero_grad()
    _train(released, opt, range(3, 4))
    _train(normal, ref, range(4))
    _assert_same(released, opt, normal, ref)
    Released(released.ps, gradient_release=True)  # the parameters are free for another one


def test_gradients_never_coexist() -> None:
    """When a gradient is complete, every earlier one has been stepped and freed."""
    layers = nn.Sequential(*(nn.Linear(16, 16) for _ in range(4)))
    opt = Released(layers.parameters(), gradient_release=True)
    alive: list[int] = []
    for p in layers.parameters():  # runs after the release hook, registered first
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in layers.parameters()))
        )
    layers(torch.randn(8, 16)).square().sum().backward()
    assert alive == [0] * 8 and opt.last_step_stats[0].alpha.shape == (8,)


def test_stats_of_groups_follow_the_normal_step() -> None:
    a, b = ShapesModel(), ShapesModel()
    groups = [{"params": list(m.ps)[:5], "beta1": 0.9} for m in (a, b)]
    opt = Released([groups[0], {"params": list(a.ps)[5:]}], gradient_release=True)
    ref = Adafactor([groups[1], {"params": list(b.ps)[5:]}])
    _train(a, opt, range(2))
    _train(b, ref, range(2))
    _assert_same(a, opt, b, ref)
    for mine, theirs in zip(opt.last_step_stats, ref.last_step_stats):
        _assert_same_stats(mine, theirs)
    a.loss(2, skip=tuple(range(5))).backward()  # the first group gets no gradient
    assert opt.last_step_stats[0] is None and opt.last_step_stats[1] is not None


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta1": 0.9, "weight_decay": 0.1}, {"stochastic_rounding": True}],
    ids=["defaults", "momentum+decay", "stochastic rounding"],
)
def test_accumulation_steps_equal_accumulating_micro_batches(kwargs: dict[str, Any]) -> None:
    """3 micro-batches per step; parameter 2 misses the first micro-batch of each window and
    parameter 4 the last (stepped at the end of the last backward), as parameter 6 misses all."""
    dtype = torch.bfloat16 if kwargs.get("stochastic_rounding") else torch.float32
    released, normal = ShapesModel(dtype), ShapesModel(dtype)

    def options() -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0) if kwargs.get("stochastic_rounding") else None
        return {**kwargs, "generator": gen}

    opt = Released(released.ps, gradient_release=True, accumulation_steps=3, **options())
    skips = [(2, 6), (6,), (4, 6)]
    for window in range(3):
        for micro, skip in enumerate(skips):
            released.loss(10 * window + micro, skip).backward()
            held = [p.grad is not None for p in released.ps]
            assert any(held) == (micro < 2)  # gradients kept until the window's last backward
            opt.step()
            opt.zero_grad() if micro == 2 else None
    index = {id(p): i for i, p in enumerate(released.ps)}
    order = [index[id(p)] for p in opt._release.order]
    listed = order if kwargs.get("stochastic_rounding") else range(len(SHAPES))
    ref = Adafactor([normal.ps[i] for i in listed if i != 6], **options())
    for window in range(3):
        for micro, skip in enumerate(skips):
            normal.loss(10 * window + micro, skip).backward()
        ref.step()
        ref.zero_grad()
    _assert_same(released, opt, normal, ref)
    assert float(opt.state[released.ps[0]]["step"]) == 3 and not opt.state[released.ps[6]]


def test_accumulating_without_accumulation_steps_is_warned() -> None:
    """A loop that calls opt.step() every 2 backward passes accumulates gradients: release
    without accumulation_steps=2 would have stepped each micro-batch."""
    for steps, warned in ((1, True), (2, False)):
        model = ShapesModel()
        opt = Released(model.ps, gradient_release=True, accumulation_steps=steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6):
                model.loss(step).backward()
                if step % 2 == 1:
                    opt.step()
        messages = [str(w.message) for w in caught if "accumulation_steps" in str(w.message)]
        assert bool(messages) == warned
        assert all("2 backward passes since the last opt.step()" in m for m in messages)
        assert len(messages) == (2 if warned else 0)  # from the 2nd window on, once each


def test_a_parameter_unfrozen_after_construction_is_stepped_and_hooked() -> None:
    released, normal = ShapesModel(), ShapesModel()
    for m in (released, normal):
        m.ps[7].requires_grad_(False)
    opt = Released(released.ps, gradient_release=True)
    ref = Adafactor(normal.ps)
    assert opt._release.hooked == len(SHAPES) - 1
    _train(released, opt, range(1))
    _train(normal, ref, range(1))
    for m in (released, normal):
        m.ps[7].requires_grad_(True)
    _train(released, opt, range(1, 3))  # step 1: opt.step() steps it and hooks it
    _train(normal, ref, range(1, 3))
    assert opt._release.hooked == len(SHAPES)
    _assert_same(released, opt, normal, ref)


def test_deepcopy_and_pickle_release_their_own_parameters() -> None:
    model = ShapesModel()
    opt = Released(model.ps, gradient_release=True, accumulation_steps=2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.gradient_release and clone.accumulation_steps == 2
        params = clone.param_groups[0]["params"]
        assert all(p not in opt._release._handles for p in params)
        assert clone._release.hooked == len(SHAPES)
    pickle.loads(pickle.dumps(model))  # the hooked parameters still pickle


# ---------------------------------------------------------------------------------------------
# what release cannot do: clear errors
# ---------------------------------------------------------------------------------------------
def _param() -> nn.Parameter:
    return nn.Parameter(torch.randn(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"global_clipnorm": 1.0}, ValueError, r"global_clipnorm=1.0: .* Use clipnorm="),
        ({"skip_nonfinite": True}, ValueError, r"skip_nonfinite=True \(param_groups\[0\]\)"),
        ({"accumulation_steps": 0}, ValueError, r"accumulation_steps must be an int >= 1"),
        ({"accumulation_steps": 2.0}, ValueError, r"accumulation_steps must be an int >= 1"),
    ],
)
def test_options_that_need_every_gradient_raise_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Released([_param()], gradient_release=True, **kwargs)


def test_accumulation_steps_need_release_and_release_needs_a_bool() -> None:
    with pytest.raises(ValueError, match=r"accumulation_steps=2 needs gradient_release=True"):
        Released([_param()], accumulation_steps=2)
    with pytest.raises(TypeError, match=r"gradient_release must be True or False, got 1"):
        Released([_param()], gradient_release=1)


def test_a_group_with_skip_nonfinite_cannot_be_added() -> None:
    opt = Released([_param()], gradient_release=True)
    with pytest.raises(ValueError, match=r"skip_nonfinite=True \(param_groups\[1\]\)"):
        opt.add_param_group({"params": [_param()], "skip_nonfinite": True})


def test_options_switched_on_later_raise_in_backward() -> None:
    p = _param()
    opt = Released([p], gradient_release=True)
    opt.param_groups[0]["skip_nonfinite"] = True
    with pytest.raises(ValueError, match=r"skip_nonfinite=True"):
        p.square().sum().backward()
    opt.param_groups[0]["skip_nonfinite"] = False
    opt.param_groups[0]["beta1"] = 2.0  # checked as by a normal step
    p.grad = None
    with pytest.raises(ValueError, match=r"beta1 must be in \[0.0, 1.0\), got 2.0"):
        p.square().sum().backward()


def test_fp16_gradients_name_the_grad_scaler() -> None:
    p = nn.Parameter(torch.randn(4, 3).half())
    Released([p], gradient_release=True)
    with pytest.raises(RuntimeError, match=r"float16 gradient: .*GradScaler.* bfloat16"):
        p.float().square().sum().backward()


def test_grad_scaler_step_says_why_it_cannot_work() -> None:
    """fp32 parameters under fp16 autocast have fp32 gradients: the hooks cannot tell that they
    are scaled, but GradScaler.step(opt) then raises, naming the scaler."""
    model = nn.Linear(8, 4)
    opt = Released(model.parameters(), gradient_release=True)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 8)).float().square().mean()
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match=r"GradScaler.step\(opt\) with gradient_release=True"):
        scaler.step(opt)
    opt.remove_gradient_release()  # a normal optimizer again: the scaler works
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 8)).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_stats[0] is not None


def test_non_reentrant_checkpointing_equals_the_normal_loop() -> None:
    """A layer used in two checkpointed segments gets one complete gradient per backward."""
    from torch.utils.checkpoint import checkpoint

    def run(release: bool) -> tuple[nn.Linear, Any]:
        torch.manual_seed(0)
        layer = nn.Linear(8, 8)
        opt = Released(layer.parameters(), gradient_release=release, beta1=0.9)
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            y = checkpoint(layer, x, use_reentrant=False)
            checkpoint(layer, torch.tanh(y), use_reentrant=False).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return layer, opt

    (a, opt_a), (b, opt_b) = run(True), run(False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(v, opt_b.state[q][k]) for k, v in opt_a.state[p].items())
    assert float(opt_a.state[a.weight]["step"]) == 3


def test_sparse_gradients_raise() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    Released(emb.parameters(), gradient_release=True)
    with pytest.raises(RuntimeError, match=r"sparse gradient"):
        emb(torch.tensor([1, 2])).sum().backward()


def test_a_parameter_has_one_releasing_optimizer() -> None:
    p = _param()
    Released([p], gradient_release=True)
    with pytest.raises(ValueError, match=r"already stepped in backward by another optimizer"):
        Released([p], gradient_release=True)
    Released([p])  # without release: as before


# ---------------------------------------------------------------------------------------------
# the memory benchmark (benchmarks/bench_memory.py, adafactor bench --memory)
# ---------------------------------------------------------------------------------------------
def _bench_memory() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", ["adafactor", "adafactor_release", "adafactor_bf16_release_sr"])
def test_memory_benchmark_counts_each_part(row: str) -> None:
    bench = _bench_memory()
    spec = {"row": row, "layers": 1, "d_model": 32, "heads": 2, "vocab": 97, "batch": 2}
    spec |= {"seq": 8, "steps": 1, "threads": torch.get_num_threads(), "device": "cpu"}
    out = bench.worker({**spec, "untie": False})
    width = 2 if "bf16" in row else 4
    largest = 1024 * 32 * width  # the position table (at GPT-2's shapes: the token embedding)
    assert out["largest_grad_bytes"] == largest
    assert out["param_bytes"] == out["all_grad_bytes"] == out["params"] * width
    assert out["grad_bytes"] == (largest if "release" in row else out["param_bytes"])
    assert out["noise_bytes"] == (1024 * 32 * 4 if "_sr" in row else 0)
    assert 0 < out["state_bytes"] < out["param_bytes"] / 10  # factored
    assert out["activation_bytes"] > 2 * 8 * 97 * 4  # the log-softmax of the logits, at least
    assert out["peak_bytes"] > 0 and all(math.isfinite(x) for x in out["losses"])


def test_memory_benchmark_table_and_target() -> None:
    bench = _bench_memory()
    mib = 2**20
    base = {"param_bytes": 100 * mib, "all_grad_bytes": 100 * mib, "largest_grad_bytes": 30 * mib}
    base |= {"state_bytes": 1 * mib, "activation_bytes": 20 * mib, "noise_bytes": 0}
    base |= {"step_s": 1.0, "phase_peak_bytes": {"backward": 1}}
    rows = [
        {**base, "row": "floor", "grad_bytes": 30 * mib, "state_bytes": 0, "peak_bytes": 160 * mib},
        {**base, "row": "adamw", "grad_bytes": 100 * mib, "peak_bytes": 440 * mib},
        {**base, "row": "adafactor", "grad_bytes": 100 * mib, "peak_bytes": 230 * mib},
        {**base, "row": "adafactor_release", "grad_bytes": 30 * mib, "peak_bytes": 161 * mib},
        {"row": "adafactor_bf16_release_kahan", "note": "n/a: no kahan_summation"},
    ]
    args = argparse.Namespace(layers=1, d_model=8, vocab=9, batch=1, seq=2, device="cpu")
    args.threads, args.steps, args.untie = 1, 1, False
    table = bench.markdown(rows, args)
    release = next(line for line in table.splitlines() if line.startswith("| adafactor_release"))
    cells = [c.strip() for c in release.strip("|").split("|")]
    assert cells[1:8] == ["100.0", "30.0 (largest)", "1.0", "20.0", "151.0", "161.0", "1.07"]
    assert cells[8:12] == ["backward", "1.0", "0.37", "0.70"]
    assert "(params + state + activations + largest gradient) x 1.1 = 166.1 MiB: PASS" in table
    assert "(floor 160.0 MiB + state) x 1.1 = 177.1 MiB: PASS" in table
    assert "| adafactor_bf16_release_kahan | n/a: no kahan_summation |" in table


def test_bench_memory_flag_runs_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from adafactor.cli import bench, main

    assert bench.memory_script().is_file()  # this checkout's benchmarks/bench_memory.py
    calls: list[list[str]] = []
    monkeypatch.setattr(bench.subprocess, "call", lambda argv: calls.append(argv) or 0)
    out = tmp_path / "memory.json"
    assert main(["bench", "--memory", "--threads", "3", "--output", str(out)]) == 0
    assert calls[0][1:] == [str(bench.memory_script()), "--threads", "3", "--output", str(out)]
    assert main(["bench", "--memory", "--output", str(tmp_path / "m.csv")]) == 2
    assert "--memory writes JSON" in capsys.readouterr().err
    monkeypatch.setattr(bench, "memory_script", lambda: tmp_path / "missing.py")
    assert main(["bench", "--memory"]) == 2
    assert "run it from a source checkout" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# DDP and FSDP2 on two gloo ranks
# ---------------------------------------------------------------------------------------------
def _ddp(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    ddp = DistributedDataParallel(copy.deepcopy(model))
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Any:
        def hook(p: Tensor) -> None:
            seen[name] = p.grad.clone()

        return hook

    for name, p in ddp.module.named_parameters():
        p.register_post_accumulate_grad_hook(record(name))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))  # differs per rank
    ddp(x).square().sum().backward()
    model(x).square().sum().backward()  # the local gradient, without DDP
    for name, p in ddp.module.named_parameters():
        local = dict(model.named_parameters())[name].grad
        assert torch.equal(seen[name], local), name  # the hook fires before the all-reduce
        assert not torch.allclose(p.grad, local), name  # which then averages over the ranks
    with pytest.raises(ValueError, match=r"process group of 2 ranks \(DistributedDataParallel\)"):
        Released(ddp.parameters(), gradient_release=True)


def _sharded(rank: int, world: int) -> None:
    """FSDP2 runs the hooks of its sharded parameters after the reduce-scatter, tensor parallel
    when autograd completes the sharded gradient: release steps each shard there, with the
    collectives of the sharded step, and equals the normal step bit for bit (also with
    accumulation_steps=2 under FSDP2, which sums the sharded gradients of both backwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from tests.distributed._common import BATCH, batch, loss_of, make_model
    from tests.distributed._scenarios import _TP_PLAN

    mesh = init_device_mesh("cpu", (world,))
    kwargs = {"beta1": 0.9, "weight_decay": 0.01, "clipnorm": 1.0}
    for setup, micro in (("fsdp2", 1), ("fsdp2", 2), ("tensor parallel", 1)):
        runs = []
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if setup == "tensor parallel":
            rows = slice(None)  # every tensor-parallel rank sees the whole batch
        for release in (True, False):
            model = make_model()
            for block in model.blocks:
                if setup == "fsdp2":
                    fully_shard(block, mesh=mesh)
                else:
                    parallelize_module(block, mesh, _TP_PLAN)
            if setup == "fsdp2":
                fully_shard(model, mesh=mesh)
            elif release:
                with pytest.raises(ValueError, match=r"plain \(non-DTensor\) parameters"):
                    Released(model.parameters(), gradient_release=True)
            # plain parameters (outside the blocks under tensor parallel) are refused on 2 ranks
            params = [p for p in model.parameters() if isinstance(p, DTensor)]
            options = {"gradient_release": True, "accumulation_steps": micro} if release else {}
            opt = Released(params, **options, **kwargs)
            for step in range(3):
                for m in range(micro):
                    tokens, targets = batch(micro * step + m)
                    loss_of(model, tokens[rows], targets[rows]).backward()
                opt.step()
                opt.zero_grad()
            assert all(p.grad is None for p in params)
            runs.append((model, opt))
        (released, opt), (normal, ref) = runs
        for (name, p), q in zip(released.named_parameters(), normal.parameters()):
            what = (setup, micro, name)
            assert torch.equal(_local(p), _local(q)), what
            assert opt.state[p].keys() == ref.state[q].keys()
            assert bool(opt.state[p]) == isinstance(p, DTensor), what
            for key, value in ref.state[q].items():
                assert torch.equal(_local(opt.state[p][key]), _local(value)), (*what, key)
        mine, theirs = opt.last_step_stats[0], ref.last_step_stats[0]
        for x, y in zip(mine, theirs):
            assert torch.equal(x, y), (setup, micro)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _two_ranks(rank: int, world: int) -> None:
    _ddp(rank, world)
    _sharded(rank, world)


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_is_refused_and_sharded_release_equals_the_normal_step(tmp_path: Path) -> None:
    """On 2 gloo ranks: the hook of a DDP parameter sees the local gradient, before the
    all-reduce, so release refuses DDP; with FSDP2 and tensor parallel release equals the
    normal step bit for bit."""
    from tests.distributed._common import spawn

    spawn(_two_ranks, 2, tmp_path)
