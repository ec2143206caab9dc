"""The Triton kernels against the reference, on CPU tensors under ``TRITON_INTERPRET=1``.

The interpreter must be selected before triton is imported, so the check runs in a subprocess
(the parent test process may already have imported triton without it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from adafactor.kernels import HAS_TRITON

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
]

_CHECK = textwrap.dedent(
    """
    import torch
    from adafactor import Adafactor
    from adafactor.kernels import triton_module

    tk = triton_module()
    kernel_step, calls = tk.tensor_step, [0]

    def counted(*args):  # every tensor of every step must run the kernels, not the reference
        calls[0] += 1
        return kernel_step(*args)

    tk.tensor_step = counted

    CASES = [
        {},
        {"beta1": 0.9},
        {"beta1": 0.9, "momentum_kind": "grad"},
        {"beta1": 0.9, "momentum_kind": "normalized_update", "momentum_dtype": torch.bfloat16},
        {"factored": False, "maximize": True},
        {"weight_decay": 0.1, "weight_decay_mode": "alpha", "clipvalue": 0.01},
        {"weight_decay": 0.1, "weight_decay_mode": "lr_before", "clip_threshold": None},
        {"weight_decay": 0.1, "weight_decay_mode": "lr"},
        {"weight_decay": 0.1, "weight_decay_mode": "unscaled"},
        {"lr": 1e-3, "relative_step": False, "scale_parameter": False},
        {"use_ema": True, "ema_momentum": 0.9},
    ]
    SHAPES = [(5, 3), (2, 17, 70), (300,), (1, 1)]
    for kwargs in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            g0 = torch.Generator().manual_seed(0)
            init = [(torch.randn(s, generator=g0) * 0.1).to(dtype) for s in SHAPES]
            grads = [[(torch.randn(s, generator=g0) * 1e-2).to(dtype) for s in SHAPES]
                     for _ in range(3)]
            runs = []
            for impl in ("reference", "triton"):
                params = [p.clone().requires_grad_(True) for p in init]
                opt = Adafactor(params, impl=impl, **kwargs)
                calls[0] = 0
                for step in range(3):
                    for p, g in zip(params, grads[step]):
                        p.grad = g
                    opt.step()
                assert calls[0] == (3 * len(SHAPES) if impl == "triton" else 0), (kwargs, calls)
                runs.append((params, [opt.state[p] for p in params]))
            for pr, pt, sr, st in zip(runs[0][0], runs[1][0], runs[0][1], runs[1][1]):
                pairs = [(pt.detach(), pr.detach())] + [(st[k], sr[k]) for k in sr]
                for a, e in pairs:
                    diff = (a.double() - e.double()).abs().max().item()
                    scale = e.double().abs().max().item()
                    # fp32: 1e-6 of the tensor's scale; bf16 data: one-ulp rounding flips
                    bf16 = a.dtype == torch.bfloat16 or dtype == torch.bfloat16
                    tol = 2.0**-7 if bf16 else 1e-6
                    assert diff <= tol * scale + 1e-30, (kwargs, dtype, pr.shape, diff, scale)
    print("ok")
    """
)


def test_triton_kernels_match_reference_in_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
