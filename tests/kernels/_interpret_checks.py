"""The Triton kernels' checks, run in a subprocess with ``TRITON_INTERPRET=1`` (CPU tensors).

``python -m tests.kernels._interpret_checks [name ...]`` runs the named checks (all by default)
and prints one JSON object: check name -> list of failures (empty: passed), plus timings. The
interpreter must be selected before triton is imported, hence the subprocess; one process runs
every check so that torch and triton are imported once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from adafactor import Adafactor  # noqa: E402
from adafactor.cli.bench import SHAPE_SETS  # noqa: E402
from adafactor.functional import group_op_args, group_plan  # noqa: E402
from adafactor.kernels import triton_module  # noqa: E402
from adafactor.ops import OpArgs  # noqa: E402
from tests.optim_inputs import OPTIM_INPUTS, AdafactorInput  # noqa: E402
from tests.test_impl_parity import _assert_matches  # noqa: E402

tk = triton_module()

# block boundaries: 4097 = 2 * 2048 + 1 elements (one past two 1-D chunks, past a row / column
# tile), a vector of one, and a 3-D tensor with a batch dim and ragged row and column tiles
SHAPES = [(1,), (4097,), (1, 4097), (4097, 1), (5, 31, 37)]
STEPS = 3

CHECKS: dict[str, Callable[[], list[str]]] = {}


def check(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
    CHECKS[fn.__name__] = fn
    return fn


class LaunchCounter:
    """Counts kernel launches by wrapping each kernel's ``run`` (what ``kernel[grid](...)``
    calls), by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        for kernel in tk.KERNELS:
            real = kernel.run

            def run(*args: Any, _real: Any = real, _name: str = kernel.__name__, **kw: Any) -> Any:
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _real(*args, **kw)

            kernel.run = run

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()


COUNTER = LaunchCounter()
PARTS: list[list[int]] = []  # the index list of every Triton part of every step
_real_run_part = tk.run_part


def _run_part(*args: Any) -> None:
    PARTS.append(list(args[8]))
    _real_run_part(*args)


tk.run_part = _run_part


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    init = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=init) * 0.1).to(dtype).requires_grad_(True) for s in shapes]


def _run(
    kwargs: dict[str, Any], impl: str, shapes: list[tuple[int, ...]], dtype: torch.dtype,
    steps: int = STEPS,
) -> tuple[list[torch.Tensor], Adafactor]:  # fmt: skip
    params = _params(shapes, dtype)
    opt = Adafactor(params, impl=impl, generator=torch.Generator().manual_seed(1), **kwargs)
    grads = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * 1e-2).to(dtype)
        opt.step()
    return params, opt


def _compare(sample: AdafactorInput, ref: Any, got: Any) -> None:
    (ref_params, ref_opt), (params, opt) = ref, got
    for pr, pf in zip(ref_params, params):
        where = f"{tuple(pr.shape)}"
        sr, sf = ref_opt.state[pr], opt.state[pf]
        bf16_state = sr.get("exp_avg", pr).dtype == torch.bfloat16
        _assert_matches(pf.detach(), pr.detach(), f"{where} param", bf16_state)
        assert sorted(sr) == sorted(sf), where
        for key in sr:
            _assert_matches(sf[key], sr[key], f"{where} state[{key!r}]", bf16_state)
    gr, gf = ref_opt.last_step_stats[0], opt.last_step_stats[0]
    assert gr is not None and gf is not None
    torch.testing.assert_close(gf.alpha, gr.alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(gf.update_rms, gr.update_rms, rtol=1e-5, atol=0)


@check
def table() -> list[str]:
    """Every sample of the configuration table: Adafactor.step(impl='triton') against the
    reference, every tensor in the Triton part at every step."""
    failures = []
    for sample in OPTIM_INPUTS:
        dtype = torch.bfloat16 if sample.bf16 else torch.float32
        try:
            # two steps (the second reads the state the first wrote); three where the third
            # step differs (the EMA overwrites the weights, the schedule halves lr)
            steps = 3 if sample.desc in ("ema", "lr schedule") else 2
            ref = _run(sample.kwargs, "reference", SHAPES, dtype, steps)
            PARTS.clear()
            got = _run(sample.kwargs, "triton", SHAPES, dtype, steps)
            # Kahan summation is not in the Triton kernels: supports() routes it to the reference
            expected = [] if sample.kwargs.get("kahan_summation") else [list(range(len(SHAPES)))]
            assert PARTS == expected * steps, f"Triton parts {PARTS}"
            _compare(sample, ref, got)
        except Exception as e:
            failures.append(f"{sample.desc}: {type(e).__name__}: {e}")
    return failures


@check
def layouts() -> list[str]:
    """Factored dims other than the last two ([A, R, B, C, D] with B, D > 1), tall and wide
    narrow tiles, bf16 momentum and EMA, strips of row blocks in the statistics kernel."""
    failures = []
    cases = [
        ({"factor_dims": "largest2", "min_dim_size_to_factor": 4}, [(6, 3, 9, 2), (17, 2, 5)]),
        ({"factor_dims": "largest2", "beta1": 0.9, "momentum_kind": "grad"}, [(9, 2, 33, 3)]),
        ({"beta1": 0.9, "momentum_dtype": torch.bfloat16}, [(40, 3), (3, 40), (2, 5, 300)]),
        ({"use_ema": True, "ema_overwrite_frequency": 2, "state_dtype": None}, [(40, 3), (7,)]),
        # 69 row blocks: strips of 2 in the statistics kernel
        ({"clipnorm": 0.05, "beta1": 0.9}, [(1100, 20)]),
    ]
    for kwargs, shapes in cases:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                ref = _run(kwargs, "reference", shapes, dtype)
                PARTS.clear()
                got = _run(kwargs, "triton", shapes, dtype)
                assert PARTS == [list(range(len(shapes)))] * STEPS, f"Triton parts {PARTS}"
                _compare(AdafactorInput(str(kwargs), kwargs), ref, got)
            except Exception as e:
                failures.append(f"{kwargs} {dtype}: {type(e).__name__}: {e}")
    return failures


def _gpt2_standin() -> list[tuple[int, ...]]:
    """GPT-2 small's 148 tensors with every dim divided by 32 (768 -> 24, 50257 -> 1570): the
    same kinds and the same bucket structure, small enough for the interpreter."""
    return [tuple(max(1, s // 32) for s in shape) for shape in SHAPE_SETS["gpt2-small"]()]


@check
def launches() -> list[str]:
    """A GPT-2-small-shaped step: 148 tensors in two buckets, 11 launches."""
    shapes = _gpt2_standin()
    assert len(shapes) == 148
    params = _params(shapes, torch.float32)
    opt = Adafactor(params, impl="triton")
    out = []
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-2
    COUNTER.reset()
    opt.step()
    if COUNTER.total > 12:
        out.append(f"{COUNTER.total} launches: {COUNTER.counts}")
    RESULTS["launches"] = dict(COUNTER.counts)
    return out


def _snapshot(params: list[torch.Tensor], opt: Adafactor) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    last = opt.last_step_stats[0]
    assert last is not None
    return [*out, last.alpha.clone(), last.update_rms.clone()]


@check
def determinism() -> list[str]:
    """Two runs from the same inputs: bitwise the same parameters, state and statistics."""
    kwargs = {"beta1": 0.9, "clipnorm": 0.05, "weight_decay": 0.1}
    shapes = [(4097, 1), (64, 300), (5, 31, 37), (4097,)]
    runs = [_snapshot(*_run(kwargs, "triton", shapes, torch.float32)) for _ in range(2)]
    return [f"tensor {i} differs" for i, (a, b) in enumerate(zip(*runs)) if not torch.equal(a, b)]


def _group_args(
    opt: Adafactor, params: list[torch.Tensor], grads: list[torch.Tensor], lr: torch.Tensor,
    found_inf: torch.Tensor, skipped: torch.Tensor,
) -> tuple[OpArgs, Any]:  # fmt: skip
    group = opt.param_groups[0]
    sts = [opt._state_of(p, group) for p in params]
    plan = group_plan(group, "triton", True)
    op = group_op_args(params, grads, sts, group, plan, lr=lr, found_inf=found_inf)
    op = op._replace(skipped_steps=skipped)
    return op, plan


@check
def capturable() -> list[str]:
    """Per-step scalars from the counters on the 'device' (capturable mode) give the same bits
    as host scalars; a step with found_inf set changes nothing and counts the skip."""
    out = []
    shapes = [(4097, 1), (5, 31, 37), (300,)]
    kwargs = {"beta1": 0.9, "use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.1}
    finals = []
    for capt in (False, True):
        params = _params(shapes, torch.float32)
        opt = Adafactor(params, **kwargs)
        gen = torch.Generator().manual_seed(3)
        skipped = torch.zeros((), dtype=torch.int64)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
            lr = torch.tensor(1e-2, dtype=torch.float64)
            op, plan = _group_args(opt, params, grads, lr, torch.tensor(False), skipped)
            tk.group_step(op, plan, capturable=capt)
        before = _snapshot_state(params, opt)
        bad = [g.clone() for g in grads]
        bad[0][5, 0] = math.nan
        if capt:
            op, plan = _group_args(opt, params, bad, lr, torch.tensor(True), skipped)
            a, r = tk.group_step(op, plan, capturable=True)
            after = _snapshot_state(params, opt)
            if not all(torch.equal(x, y) for x, y in zip(before, after)):
                out.append("a skipped step changed the parameters or the state")
            if int(skipped) != 1 or a.any() or r.any():
                out.append(f"skip not counted or statistics not zero: {int(skipped)}, {a}, {r}")
        finals.append(before)
    if not all(torch.equal(x, y) for x, y in zip(*finals)):
        out.append("capturable mode differs from host scalars")
    return out


@check
def lr_zero() -> list[str]:
    """A step with lr 0 leaves the weights and their EMA exactly as they were (every decay
    form, the EMA overwrite included)."""
    out = []
    for mode in ("lr", "lr_before", "alpha", "unscaled"):
        params = _params([(40, 3), (5, 31, 37), (300,)], torch.float32)
        before = [p.detach().clone() for p in params]
        opt = Adafactor(
            params, impl="triton", lr=0.0, relative_step=False, weight_decay=0.1,
            weight_decay_mode=mode, use_ema=True, ema_overwrite_frequency=1, beta1=0.9,
        )  # fmt: skip
        for p in params:
            p.grad = torch.randn(p.shape) * 1e-2
        opt.step()
        for b, p in zip(before, params):
            if not (torch.equal(p.detach(), b) and torch.equal(opt.state[p]["ema"], b)):
                out.append(f"{mode} {tuple(p.shape)}: changed")
    return out


NO_CLIP = [
    {"clip_threshold": None},
    {"clip_threshold": None, "beta1": 0.0},
    {"clip_threshold": None, "beta1": 0.9, "momentum_kind": "grad",
     "momentum_dtype": torch.bfloat16},
    {"clip_threshold": None, "relative_step": False, "lr": 1e-3, "scale_parameter": False,
     "weight_decay": 0.1, "weight_decay_mode": "alpha"},
    {"preset": "big_vision"},
]  # fmt: skip


OUTLIER_SHAPES = [(32, 24), (24,), (1, 40)]


def _run_outlier(
    kwargs: dict[str, Any], impl: str, dtype: torch.dtype, huge: float,
    shapes: list[tuple[int, ...]] = OUTLIER_SHAPES, steps: int = 4,
) -> tuple[list[torch.Tensor], Adafactor]:  # fmt: skip
    """``steps`` steps of small gradients, the outlier ``huge`` in one element of each at the
    second."""
    params = _params(shapes, dtype)
    opt = Adafactor(params, impl=impl, **kwargs)
    grads = torch.Generator().manual_seed(2)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * 1e-2).to(dtype)
            if step == 1:
                p.grad.view(-1)[p.numel() // 3] = huge
        opt.step()
    return params, opt


@check
def no_clip() -> list[str]:
    """Without update clipping, an outlier whose square still fits float32 (1e19): U beyond
    float32 saturates as in the reference (finite weights and state, the same values). (Larger
    ones, whose squares overflow, take the overflow path: the overflow check below.)"""
    from tests.test_numerics import _assert_close_saturated

    failures = []
    for kwargs in NO_CLIP:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                ref_params, ref_opt = _run_outlier(kwargs, "reference", dtype, 1e19)
                PARTS.clear()
                params, opt = _run_outlier(kwargs, "triton", dtype, 1e19)
                assert PARTS == [[0, 1, 2]] * 4, f"Triton parts {PARTS}"
                for i, (a, b) in enumerate(zip(ref_params, params)):
                    pairs = [("param", b.detach(), a.detach())]
                    pairs += [(k, opt.state[b][k], v) for k, v in ref_opt.state[a].items()
                              if isinstance(v, torch.Tensor)]  # fmt: skip
                    for key, got, want in pairs:
                        assert bool(got.isfinite().all()), f"param {i} {key} not finite"
                        _assert_close_saturated(got, want, f"param {i} {key}")
            except Exception as e:
                failures.append(f"{kwargs} {dtype}: {type(e).__name__}: {e}")
    return failures


OVERFLOW_SHAPES = [(32, 24), (3, 10, 12), (300,)]  # factored 2-D and 3-D, unfactored 1-D
OVERFLOW_HUGE = [1e19, 1e25, 1e30, 3e38]
OVERFLOW = [
    ({}, (torch.float32, torch.bfloat16)),
    ({"clip_threshold": None}, (torch.float32, torch.bfloat16)),
    ({"beta1": 0.9}, (torch.float32, torch.bfloat16)),
    ({"clip_threshold": None, "beta1": 0.9}, (torch.float32, torch.bfloat16)),
    ({"beta1": 0.9, "momentum_kind": "grad"}, (torch.float32,)),
    ({"preset": "torch"}, (torch.float32,)),  # eps1 'clamp'
    ({"clipnorm": 1.0}, (torch.float32,)),
]
# the float64 statistics in more than one chunk of rows (1100 rows) or columns (1100), with
# factored dims other than the last two (a strided column dim), at one outlier
OVERFLOW_LAYOUTS = (
    {"factor_dims": "largest2", "beta1": 0.9},
    [(1100, 20), (20, 1100), (9, 2, 33, 3)],
    1e25,
)


@check
def overflow() -> list[str]:
    """A finite gradient element whose square overflows float32 (1e19 .. 3e38; 1e19: its
    square fits, but U^2 beside it does not): finite weights and state, and (up to 1e30) the
    reference's float64 path within 1e-5 of each tensor's scale (float32; 2^-8, a bf16
    rounding, for bf16 tensors), as tests/test_foreach.py asks of foreach, and elementwise as
    the no_clip check. Near float32's largest value U itself exceeds float32 on that step (as
    in foreach, docs/algorithm.md), so there only finiteness. Every tensor in the Triton part."""
    from tests.test_numerics import _assert_close_saturated

    failures = []
    cases = [
        (kwargs, dtype, huge, OVERFLOW_SHAPES)
        for kwargs, dtypes in OVERFLOW
        for dtype in dtypes
        for huge in OVERFLOW_HUGE
    ]
    cases.append((OVERFLOW_LAYOUTS[0], torch.float32, OVERFLOW_LAYOUTS[2], OVERFLOW_LAYOUTS[1]))
    for kwargs, dtype, huge, shapes in cases:
        try:
            ref_params, ref_opt = _run_outlier(kwargs, "reference", dtype, huge, shapes, steps=3)
            PARTS.clear()
            params, opt = _run_outlier(kwargs, "triton", dtype, huge, shapes, steps=3)
            assert PARTS == [[0, 1, 2]] * 3, f"Triton parts {PARTS}"
            bad = []
            for pr, pf in zip(ref_params, params):
                pairs = [("param", pf.detach(), pr.detach())]
                pairs += [(k, opt.state[pf][k], v) for k, v in ref_opt.state[pr].items()
                          if isinstance(v, torch.Tensor) and k != "step"]  # fmt: skip
                for key, got, want in pairs:
                    where = f"{tuple(pr.shape)} {key}"
                    if not bool(got.isfinite().all()):
                        bad.append(f"{where} not finite")
                        continue
                    if huge > 1e30:
                        continue
                    rtol = 2.0**-8 if want.dtype == torch.bfloat16 else 1e-5
                    scale = want.double().abs().max().item()
                    worst = (got.double() - want.double()).abs().max().item()
                    if not worst <= rtol * scale:
                        bad.append(f"{where} off by {worst:.3g} (scale {scale:.3g})")
                    try:  # and elementwise, beside saturated elements (a tensor's scale)
                        _assert_close_saturated(got, want, where)
                    except AssertionError as e:
                        bad.append(str(e))
            assert not bad, "; ".join(bad)
        except Exception as e:
            failures.append(f"{kwargs} {dtype} {huge:g}: {type(e).__name__}: {e}")
    return failures


def _snapshot_state(params: list[torch.Tensor], opt: Adafactor) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


RESULTS: dict[str, Any] = {}


def main(names: list[str]) -> None:
    report: dict[str, Any] = {}
    for name in names or list(CHECKS):
        start = time.perf_counter()
        try:
            failures = CHECKS[name]()
        except Exception:
            failures = [traceback.format_exc()]
        report[name] = {"failures": failures, "seconds": round(time.perf_counter() - start, 1)}
    report["extra"] = RESULTS
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
