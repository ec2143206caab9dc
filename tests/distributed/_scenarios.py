"""What each gloo process runs; every scenario compares against an in-process single-device run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from adafactor import PRESETS, Adafactor

from ._common import (
    assert_matches,
    assert_rel_close,
    count_all_reduce,
    count_driver_batches,
    count_fused_passes,
    full,
    make_model,
    train,
)

# (global shape, placement): uneven shards (5 over 2 or 4), empty shards (3 and 2 rows over 4
# ranks), 3-D tensors sharded on a batch, row or column dim, vectors and replicated matrices.
CASES: list[tuple[tuple[int, ...], Any]] = [
    ((5, 6), Shard(0)),
    ((5, 6), Shard(1)),
    ((3, 7), Shard(0)),
    ((3, 7), Shard(1)),
    ((6, 5, 4), Shard(0)),
    ((6, 5, 4), Shard(1)),
    ((6, 5, 4), Shard(2)),
    ((7,), Shard(0)),
    ((4, 3), Replicate()),
    ((2, 9), Shard(0)),
    ((9, 2), Shard(-1)),
]

OPTIONS: list[dict[str, Any]] = [
    {},
    {"beta1": 0.9, "weight_decay": 0.01, "clipnorm": 0.5, "factor_dims": "largest2"},
    {
        "eps1_mode": "clamp",
        "eps1": None,
        "beta1": 0.9,
        "momentum_kind": "grad",
        "weight_decay": 0.1,
        "weight_decay_mode": "lr_before",
        "use_ema": True,
        "global_clipnorm": 1.0,
    },
    *({"preset": name} for name in sorted(PRESETS)),
    # the options above run the fused kernel on the local shards; these the reference passes
    {"impl": "reference"},
    {"impl": "reference", "beta1": 0.9, "clipnorm": 0.5, "factor_dims": "largest2"},
]

TRANSFORMER_OPTIONS: dict[str, Any] = {"beta1": 0.9, "weight_decay": 0.01, "global_clipnorm": 1.0}
STEPS = 10


def _pairs(
    mesh: DeviceMesh, cases: list[tuple[tuple[int, ...], Any]], kwargs: dict[str, Any]
) -> tuple[list[nn.Parameter], Adafactor, list[nn.Parameter], Adafactor]:
    gen = torch.Generator().manual_seed(7)
    full_params = [torch.randn(shape, generator=gen) for shape, _ in cases]
    ref = [nn.Parameter(t.clone()) for t in full_params]
    sharded = [
        nn.Parameter(distribute_tensor(t.clone(), mesh, _list(pl), src_data_rank=None))
        for t, (_, pl) in zip(full_params, cases)
    ]
    return sharded, Adafactor(sharded, **kwargs), ref, Adafactor(ref, **kwargs)


def _set_grads(mesh: DeviceMesh, cases: list, sharded: list, ref: list, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for (shape, pl), p, q in zip(cases, sharded, ref):
        g = torch.randn(shape, generator=gen)
        q.grad = g.clone()
        p.grad = distribute_tensor(g, mesh, _list(pl), src_data_rank=None)


def _list(placement: Any) -> list[Any]:
    return list(placement) if isinstance(placement, (list, tuple)) else [placement]


# On a 2 x 2 mesh: rows and columns sharded on different mesh dims, one dim sharded twice (with
# empty shards), replicated mesh dims.
CASES_2D: list[tuple[tuple[int, ...], Any]] = [
    ((5, 6), (Shard(0), Shard(1))),
    ((5, 6), (Shard(1), Shard(0))),
    ((3, 5), (Shard(0), Shard(0))),
    ((6, 5, 4), (Replicate(), Shard(1))),
    ((6, 5, 4), (Shard(2), Replicate())),
    ((7,), (Shard(0), Replicate())),
]


def dtensor_placements(
    rank: int, world: int, cases: list[tuple[tuple[int, ...], Any]] = CASES, mesh_shape: Any = None
) -> None:
    """Every placement case under every option set equals the unsharded tensors after 3 steps."""
    mesh = init_device_mesh("cpu", mesh_shape or (world,))
    for kwargs in OPTIONS:
        sharded, opt, ref, ref_opt = _pairs(mesh, cases, kwargs)
        with count_fused_passes() as fused_calls:
            for step in range(3):
                _set_grads(mesh, cases, sharded, ref, step)
                opt.step()
                ref_opt.step()
        # every rank holds a non-empty shard of some case (a replicated or evenly split one)
        assert (fused_calls[0] > 0) == (kwargs.get("impl") != "reference"), (kwargs, fused_calls)
        names = {f"case{i}{cases[i]}": p for i, p in enumerate(sharded)}
        ref_names = {f"case{i}{cases[i]}": p for i, p in enumerate(ref)}
        assert_matches(names, opt, ref_names, ref_opt)
        stats, ref_stats = opt.last_step_stats[0], ref_opt.last_step_stats[0]
        assert stats is not None and ref_stats is not None
        assert_rel_close(stats.alpha, ref_stats.alpha, f"alpha {kwargs}")
        assert_rel_close(stats.update_rms, ref_stats.update_rms, f"RMS(U) {kwargs}")


def collectives_constant(rank: int, world: int) -> None:
    """The number of all-reduces per step does not grow with the number of tensors."""
    mesh = init_device_mesh("cpu", (world,))
    counts = {}
    for kwargs in ({}, {"global_clipnorm": 1.0}):
        for n in (2, len(CASES), 3 * len(CASES)):
            cases = (CASES * 3)[:n]
            sharded, opt, ref, _ = _pairs(mesh, cases, kwargs)
            _set_grads(mesh, cases, sharded, ref, 0)
            opt.step()  # state creation is not part of the steady state
            with count_all_reduce() as stats:
                opt.step()
            counts[(bool(kwargs), n)] = stats[0]
    assert counts[(False, 2)] == counts[(False, len(CASES))] == counts[(False, 3 * len(CASES))]
    assert counts[(True, 2)] == counts[(True, 3 * len(CASES))]
    assert counts[(False, 2)] == 3, counts  # rows/cols/x^2, mean of R, U^2
    assert counts[(True, 2)] == 4, counts  # plus the global gradient norm


def _reference_run(**kwargs: Any) -> tuple[nn.Module, Adafactor]:
    model = make_model()
    opt = Adafactor(model.parameters(), **kwargs)
    train(model, opt, range(STEPS))
    return model, opt


def fsdp2(rank: int, world: int) -> None:
    ref, ref_opt = _reference_run(**TRANSFORMER_OPTIONS)
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Adafactor(model.parameters(), **TRANSFORMER_OPTIONS)
    train(model, opt, range(STEPS), (rank, world))
    assert_matches(dict(model.named_parameters()), opt, dict(ref.named_parameters()), ref_opt)


_TP_PLAN = {
    "q": ColwiseParallel(),
    "k": ColwiseParallel(),
    "v": ColwiseParallel(),
    "o": RowwiseParallel(),
    "fc1": ColwiseParallel(),
    "fc2": RowwiseParallel(),
}


def tensor_parallel(rank: int, world: int) -> None:
    ref, ref_opt = _reference_run(**TRANSFORMER_OPTIONS)
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for block in model.blocks:
        parallelize_module(block, mesh, _TP_PLAN)
    opt = Adafactor(model.parameters(), **TRANSFORMER_OPTIONS)
    train(model, opt, range(STEPS))  # every tensor-parallel rank sees the whole batch
    assert_matches(dict(model.named_parameters()), opt, dict(ref.named_parameters()), ref_opt)


def fsdp_tp_2d(rank: int, world: int) -> None:
    ref, ref_opt = _reference_run(**TRANSFORMER_OPTIONS)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = make_model()
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], _TP_PLAN)
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = Adafactor(model.parameters(), **TRANSFORMER_OPTIONS)
    train(model, opt, range(STEPS), (mesh["dp"].get_local_rank(), 2))
    assert_matches(dict(model.named_parameters()), opt, dict(ref.named_parameters()), ref_opt)


def ddp(rank: int, world: int) -> None:
    ref, ref_opt = _reference_run(**TRANSFORMER_OPTIONS)
    model = DistributedDataParallel(make_model())
    opt = Adafactor(model.parameters(), **TRANSFORMER_OPTIONS)
    train(model, opt, range(STEPS), (rank, world))
    named = {name.removeprefix("module."): p for name, p in model.named_parameters()}
    assert_matches(named, opt, dict(ref.named_parameters()), ref_opt)


def errors(rank: int, world: int) -> None:
    """FSDP1 flat parameters, Partial gradients and a wrong mesh raise errors that say why."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (True, False):
        wrapped = FSDP(
            nn.Linear(6, 5), use_orig_params=use_orig_params, device_id=torch.device("cpu")
        )
        with pytest.raises(ValueError, match="FSDP1 flattened parameter"):
            Adafactor(wrapped.parameters())

    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    opt = Adafactor([p])
    p.grad = DTensor.from_local(torch.ones(4, 4), mesh, [Partial()])  # an unreduced sum
    with pytest.raises(ValueError, match="Partial gradient"):
        opt.step()
    p.grad = torch.ones(4, 4)
    with pytest.raises(TypeError, match="gradient must be a DTensor"):
        opt.step()

    # from_keras(mesh=): the parameters' mesh (or a parent of it) is accepted, another is not
    Adafactor.from_keras([p], mesh=mesh)
    mesh_2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
    q = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh_2d["b"], [Shard(0)]))
    Adafactor.from_keras([q], mesh=mesh_2d)
    with pytest.raises(ValueError, match="not on the given mesh"):
        Adafactor.from_keras([q], mesh=init_device_mesh("cpu", (world, 1)))
    with pytest.raises(TypeError, match="DeviceMesh"):
        Adafactor.from_keras([p], mesh="data")


def load_full_state(rank: int, world: int) -> None:
    """A single-device state dict loads onto sharded parameters: each rank keeps its slice."""
    mesh = init_device_mesh("cpu", (world,))
    kwargs = {"beta1": 0.9}
    sharded, opt, ref, ref_opt = _pairs(mesh, CASES, kwargs)
    _set_grads(mesh, CASES, sharded, ref, 0)
    ref_opt.step()
    for p, q in zip(sharded, ref):  # bring the sharded params to the reference's values
        p.data.to_local().copy_(distribute_tensor(q.detach(), mesh, p.placements).to_local())
    opt.load_state_dict(ref_opt.state_dict())
    for p in sharded:  # each rank holds only its slice: DTensor state on the parameter's mesh
        for key, value in opt.state[p].items():
            assert key == "step" or (isinstance(value, DTensor) and value.device_mesh == mesh)
    _set_grads(mesh, CASES, sharded, ref, 1)
    opt.step()
    ref_opt.step()
    names = {str(i): p for i, p in enumerate(sharded)}
    assert_matches(names, opt, {str(i): p for i, p in enumerate(ref)}, ref_opt)


def run_two(rank: int, world: int) -> None:
    for scenario in (
        dtensor_placements,
        collectives_constant,
        fsdp2,
        tensor_parallel,
        ddp,
        load_full_state,
    ):
        scenario(rank, world)


def skip_nonfinite_agrees(rank: int, world: int) -> None:
    """A NaN in one rank's shard makes every rank skip the step (no divergence, no deadlock)."""
    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    opt = Adafactor([p], skip_nonfinite=True)
    g = torch.ones(4, 4)
    g[-1, -1] = float("nan")  # only on the last rank's rows
    p.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 1
    # the state exists (made before the step) but did not advance; the weights did not move
    assert int(opt.state[p]["step"]) == 0 and torch.equal(p.full_tensor(), torch.ones(4, 4))
    p.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
    opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 1 and int(opt.state[p]["step"]) == 1


# (global shape, placement, elements set huge): a finite 1e30 on the last rank's shard only
# (g^2 overflows float32 there), and 1.5e19 twice in one column on different ranks (each rank's
# float32 sums fit; their all-reduced sum does not).
OVERFLOW_CASES: list[tuple[tuple[int, ...], Any, list[tuple[tuple[int, ...], float]]]] = [
    ((5, 6), Shard(0), [((4, 5), 1e30)]),
    ((5, 6), Shard(1), [((4, 5), -1e30)]),
    ((6, 5, 4), Shard(2), [((5, 4, 3), 1e30)]),
    ((7,), Shard(0), [((6,), 1e30)]),
    ((4, 3), Shard(0), [((0, 0), 1.5e19), ((3, 0), 1.5e19)]),
    ((5, 6), Shard(0), []),  # no outlier: stays on the float32 path
]


def overflow_goes_float64(rank: int, world: int) -> None:
    """A finite gradient whose float32 squares overflow on one rank's shard takes the float64
    path on every rank, as unsharded: parameters and state stay finite and equal the single-device
    run (fused kernel and reference passes, with and without clipnorm)."""
    mesh = init_device_mesh("cpu", (world,))
    cases = [(shape, pl) for shape, pl, _ in OVERFLOW_CASES]
    for kwargs in ({}, {"impl": "reference"}, {"beta1": 0.9, "clipnorm": 1.0}):
        sharded, opt, ref, ref_opt = _pairs(mesh, cases, kwargs)
        for step in range(3):
            gen = torch.Generator().manual_seed(200 + step)
            for (shape, pl, huge), p, q in zip(OVERFLOW_CASES, sharded, ref):
                g = torch.randn(shape, generator=gen)
                if step == 0:  # later steps see the saturated statistics
                    for index, value in huge:
                        g[index] = value
                q.grad = g.clone()
                p.grad = distribute_tensor(g, mesh, _list(pl), src_data_rank=None)
            with count_driver_batches() as batches:
                opt.step()
            assert batches[0] == 1, batches  # the one driver, all tensors in one batch
            ref_opt.step()
        for i, p in enumerate(sharded):
            assert torch.isfinite(p.full_tensor()).all(), (kwargs, i)
            for key, value in opt.state[p].items():
                assert torch.isfinite(full(value)).all(), (kwargs, i, key)
        names = {f"case{i}": p for i, p in enumerate(sharded)}
        assert_matches(names, opt, {f"case{i}": p for i, p in enumerate(ref)}, ref_opt)


def run_errors(rank: int, world: int) -> None:
    errors(rank, world)
    skip_nonfinite_agrees(rank, world)


def _fsdp2_model(world: int) -> tuple[nn.Module, Adafactor]:
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, Adafactor(model.parameters(), **TRANSFORMER_OPTIONS)


def _snapshot(model: nn.Module, opt: Adafactor) -> dict[str, torch.Tensor]:
    """Full parameters and state by name (full_tensor is a collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p.detach()).clone()
        for key, value in opt.state[p].items():
            out[f"{name}/{key}"] = full(value).clone()
    return out


def run_four(rank: int, world: int, ckpt: str) -> None:
    """4 ranks: placements with empty shards, FSDP x TP, and an FSDP2 run saved halfway by DCP."""
    dtensor_placements(rank, world)
    dtensor_placements(rank, world, CASES_2D, (2, world // 2))
    fsdp_tp_2d(rank, world)
    model, opt = _fsdp2_model(world)
    train(model, opt, range(STEPS // 2), (rank, world))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(ckpt) / "dcp"))
    train(model, opt, range(STEPS // 2, STEPS), (rank, world))
    snapshot = _snapshot(model, opt)
    ref, ref_opt = _reference_run(**TRANSFORMER_OPTIONS)
    assert_matches(dict(model.named_parameters()), opt, dict(ref.named_parameters()), ref_opt)
    if rank == 0:
        torch.save(snapshot, Path(ckpt) / "uninterrupted.pt")


def run_resume_two(rank: int, world: int, ckpt: str) -> None:
    """2 ranks load the 4-rank checkpoint (resharded), continue, and match the uninterrupted run."""
    model, opt = _fsdp2_model(world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(ckpt) / "dcp"))
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for p in model.parameters():
        assert int(opt.state[p]["step"]) == STEPS // 2
    train(model, opt, range(STEPS // 2, STEPS), (rank, world))
    expected = torch.load(Path(ckpt) / "uninterrupted.pt")
    actual = _snapshot(model, opt)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert_rel_close(actual[key], value, f"resumed {key}")
    dist.barrier()
