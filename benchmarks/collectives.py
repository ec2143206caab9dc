"""Collectives per optimizer step under FSDP2 on gloo CPU ranks, against the parameter count.

Counts, for one steady-state ``opt.step()`` (the backward's reduce-scatter is not counted):

* this package's ``adafactor.Adafactor``: the calls and bytes of ``torch.distributed.all_reduce``;
* ``torch.optim.Adafactor`` on the same FSDP2 model: whether it runs, whether the result equals
  single-process training, and the collectives DTensor dispatch issues (``CommDebugMode``).

Run: ``python benchmarks/collectives.py [--world 2] [--layers 2 8 32] [--dim 64]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model(layers: int, dim: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(dim, dim) for _ in range(layers)))


def _grads(model: nn.Module, dim: int, world: int, rank: int | None) -> None:
    """Gradient of the mean loss on this rank's 8 rows of the global batch (None: all rows)."""
    x = torch.randn(8 * world, dim, generator=torch.Generator().manual_seed(1))
    rows = slice(None) if rank is None else slice(rank * 8, (rank + 1) * 8)
    model(x[rows]).square().mean().backward()


def _count(fn: Any) -> tuple[int, int]:
    """all_reduce calls and bytes issued by ``fn()``."""
    stats = [0, 0]
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stats[0] += 1
        stats[1] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        fn()
    finally:
        dist.all_reduce = original
    return stats[0], stats[1]


def _fsdp(layers: int, dim: int, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model(layers, dim)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _max_rel_err(model: nn.Module, ref: nn.Module) -> float:
    errs = []
    for p, q in zip(model.parameters(), ref.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        errs.append(float((full - q).norm() / q.norm().clamp(min=1e-30)))
    return max(errs)


def _worker(rank: int, world: int, init: str, layers_list: list[int], dim: int) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    from adafactor import Adafactor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for layers in layers_list:
        for kwargs in ({}, {"global_clipnorm": 1.0}):
            model = _fsdp(layers, dim, world)
            opt = Adafactor(model.parameters(), **kwargs)
            for _ in range(2):  # the first step also creates the state
                opt.zero_grad()
                _grads(model, dim, world, rank)
                calls, nbytes = _count(opt.step)
            n_params = sum(p.numel() for p in model.parameters())
            n_tensors = len(list(model.parameters()))
            rows.append((layers, n_tensors, n_params, str(kwargs or "defaults"), calls, nbytes))

    # torch.optim.Adafactor on the same FSDP2 model, against single-process training
    layers = layers_list[0]
    model, ref = _fsdp(layers, dim, world), _model(layers, dim)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adafactor(ref.parameters(), lr=1e-2)
    outcome = "runs"
    comm = CommDebugMode()
    try:
        for step in range(3):
            opt.zero_grad()
            ref_opt.zero_grad()
            _grads(model, dim, world, rank)
            _grads(ref, dim, world, None)
            if step == 2:
                with comm:
                    calls, nbytes = _count(opt.step)
            else:
                opt.step()
            ref_opt.step()
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        outcome = (
            f"runs; max relative error vs single process after 3 steps: "
            f"{_max_rel_err(model, ref):.3g}; collectives in one step: {counts} "
            f"(+ {calls} direct all_reduce)"
        )
    except Exception as exc:  # report what happens, whatever it is
        message = " ".join(str(exc).split())[:400]
        outcome = f"raises {type(exc).__name__}: {message}"
    if rank == 0:
        print(f"world={world} dim={dim}")
        print("| layers | tensors | parameters | options | all_reduce calls | bytes |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(v) for v in r) + " |")
        print(f"\ntorch.optim.Adafactor under FSDP2 ({layers} layers): {outcome}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init = tempfile.mktemp(prefix="collectives_")
    mp.spawn(_worker, args=(args.world, init, args.layers, args.dim), nprocs=args.world)


if __name__ == "__main__":
    main()
