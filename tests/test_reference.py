"""The reference math against hand-written float64 formulas and the paper's properties."""

import math

import numpy as np
import pytest
import torch

from adafactor import Adafactor
from adafactor._reference import rounding_noise, stochastic_round_to_bf16


def _paper_matrix_steps(x0, grads, lr=1e-2, eps1=1e-30, eps2=1e-3, d=1.0):
    """Algorithm 4 in float64 with the paper's row and column *sums*."""
    x = x0.astype(np.float64).copy()
    n, m = x.shape
    r = np.zeros(n)
    c = np.zeros(m)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, math.sqrt(np.mean(x**2))) * rho
        beta2 = 1 - t**-0.8
        s = g**2 + eps1
        r = beta2 * r + (1 - beta2) * s.sum(axis=1)
        c = beta2 * c + (1 - beta2) * s.sum(axis=0)
        v = np.outer(r, c) / r.sum()
        u = g / np.sqrt(v)
        u = u / max(1.0, math.sqrt(np.mean(u**2)) / d)
        x = x - alpha * u
    return x


def _paper_vector_steps(x0, grads, lr=1e-2, eps1=1e-30, eps2=1e-3, d=1.0):
    """Algorithm 5 in float64."""
    x = x0.astype(np.float64).copy()
    v = np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        alpha = max(eps2, math.sqrt(np.mean(x**2))) * min(lr, 1 / math.sqrt(t))
        beta2 = 1 - t**-0.8
        v = beta2 * v + (1 - beta2) * (g**2 + eps1)
        u = g / np.sqrt(v)
        x = x - alpha * u / max(1.0, math.sqrt(np.mean(u**2)) / d)
    return x


@pytest.mark.parametrize("shape", [(6, 4), (1, 5), (9,)])
def test_matches_paper_algorithms(shape):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1 for _ in range(8)]
    grads[4] = grads[4] * 50  # a spike, so update clipping fires
    p = torch.nn.Parameter(x0.clone())
    opt = Adafactor([p], preset="paper")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    algorithm = _paper_matrix_steps if len(shape) == 2 else _paper_vector_steps
    expected = algorithm(x0.numpy(), [g.numpy() for g in grads])
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-15)


def _one_update(w: torch.Tensor, g: torch.Tensor, **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(w.clone())
    opt = Adafactor([p], **kwargs)
    for scale in (1.0, 0.5, 2.0):
        p.grad = g * scale
        opt.step()
    return p.detach() - w


@pytest.mark.parametrize("policy", ["last2", "largest2"])
def test_update_is_orientation_equivariant(policy):
    # update(W^T) == update(W)^T: the row/column roles must not depend on orientation
    # (timm's AdafactorBigVision dropped the row factor for rows > cols before 1.0.31).
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    g = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    g[:, 3] *= 40  # a loud column and a quiet row make the two factors differ strongly
    g[7] *= 0.01
    kwargs = {"factor_dims": policy}
    torch.testing.assert_close(_one_update(w.T, g.T, **kwargs), _one_update(w, g, **kwargs).T)


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # between two bf16 values
    gen = torch.Generator().manual_seed(0)
    rounded = stochastic_round_to_bf16(x, rounding_noise(x, gen)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, rel=2e-4)
    exact = torch.tensor([1.0, -2.5, 0.0], dtype=torch.float32)
    assert torch.equal(stochastic_round_to_bf16(exact, rounding_noise(exact, gen)).float(), exact)


def test_bf16_parameters_keep_learning_at_large_steps():
    # tf_keras computes t and beta2 in bf16 and freezes at t ~ 3000; fp16 stops at t > 65504.
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
        opt = Adafactor([p], lr=1e-1, relative_step=False)
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.state[p]["step"].fill_(100_000)
        before = opt.state[p]["row_var"].clone()
        p.grad = torch.full_like(p, 2e-3)
        opt.step()
        assert opt.state[p]["row_var"].dtype == torch.float32
        assert not torch.equal(opt.state[p]["row_var"], before)
        assert torch.isfinite(p).all()


def test_fp16_zero_gradient_column_stays_finite():
    # eps1 = 1e-30 underflows in fp16; math runs in fp32 here, so a zero column is harmless.
    p = torch.nn.Parameter(torch.randn(8, 6).half())
    opt = Adafactor([p])
    grad = torch.randn(8, 6).half() * 1e-2
    grad[:, 2] = 0
    p.grad = grad
    opt.step()
    assert torch.isfinite(p).all()
