"""Shared pieces of the gloo tests: process spawning, a tiny transformer, comparisons."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, DIM, HEADS, SEQ, BATCH = 13, 32, 4, 8, 4  # 13 rows: uneven over 2 and 4 ranks


def _entry(rank: int, world: int, init_file: str, fn: Callable[..., None], args: tuple) -> None:
    faulthandler.enable()  # a native abort prints the Python stack of every thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown once the work has passed: gloo worker threads still alive there
    # can abort the process (seen once in CI as SIGABRT after the scenarios had run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], world: int, tmp_path: Path, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; a failure raises here."""
    init_file = str(tmp_path / f"init_{fn.__name__}_{world}")
    mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=True)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(3))
        # A key bias shifts every score of a query equally: its exact gradient is 0, and
        # Adafactor would normalise rounding noise into a full-size step.
        self.k = nn.Linear(DIM, DIM, bias=False)
        self.qkv = (self.q, self.k, self.v)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        # -1 heads: under tensor parallelism each rank holds a subset of the heads
        q, k, v = (m(h).view(b, t, -1, DIM // HEADS).transpose(1, 2) for m in self.qkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: the same on every rank and in the single-process run."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Train on slice ``shard = (index, count)`` of each global batch (data parallel)."""
    index, count = shard
    per = BATCH // count
    for step in steps:
        tokens, targets = batch(step)
        rows = slice(index * per, (index + 1) * per)
        opt.zero_grad(set_to_none=True)
        loss_of(model, tokens[rows], targets[rows]).backward()
        opt.step()


def full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_rel_close(actual: Tensor, expected: Tensor, what: str, rtol: float = 1e-5) -> None:
    """Relative error of the whole tensor, ||a - e|| / ||e||, at most ``rtol``."""
    actual, expected = full(actual).detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.norm().clamp(min=1e-30)
    err = float((actual - expected).norm() / scale)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def assert_matches(
    named: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    ref_named: dict[str, Tensor],
    ref_opt: torch.optim.Optimizer,
) -> None:
    """Parameters and every optimizer state tensor equal the single-process run's."""
    assert named.keys() == ref_named.keys()
    for name, p in named.items():
        ref_p = ref_named[name]
        assert_rel_close(p, ref_p, name)
        state, ref_state = opt.state[p], ref_opt.state[ref_p]
        assert state.keys() == ref_state.keys(), name
        for key, value in ref_state.items():
            assert_rel_close(state[key], value, f"{name} state[{key!r}]")


@contextlib.contextmanager
def _counting(owner: Any, name: str, weigh: Callable[..., int]) -> Iterator[list[int]]:
    """Wrap ``owner.name`` while the block runs: yields [calls, sum of weigh(*args)]."""
    stats = [0, 0]
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        stats[0] += 1
        stats[1] += weigh(*args)
        return original(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield stats
    finally:
        setattr(owner, name, original)


def count_all_reduce() -> contextlib.AbstractContextManager[list[int]]:
    """Count torch.distributed.all_reduce calls and bytes: yields [calls, bytes]."""
    return _counting(dist, "all_reduce", lambda t, *_: t.numel() * t.element_size())


def count_fused_passes() -> contextlib.AbstractContextManager[list[int]]:
    """Count pass-2 calls of the fused kernel on local shards (sharded driver only): [calls, _]."""
    from adafactor._driver import FusedPasses

    return _counting(FusedPasses, "update_square_sum", lambda *_: 0)


def count_driver_batches() -> contextlib.AbstractContextManager[list[int]]:
    """Count the batches the pass driver (adafactor._driver) steps: [calls, tensors]."""
    from adafactor import _driver

    return _counting(_driver, "_step", lambda batch, *_: len(batch))
