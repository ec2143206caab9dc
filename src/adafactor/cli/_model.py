"""A byte-level decoder-only Transformer in plain torch.nn, sized for CPU demos.

Pre-norm blocks without biases, sinusoidal positions and a softmax tied to the input embedding,
as in the Tensor2Tensor Transformer the paper trained. Initialisation follows T2T too: every
matrix has RMS ``fan_in ** -0.5``, which matters for Adafactor because its relative step moves a
tensor by about ``1e-2 * RMS(tensor)`` per step.

``unscaled_embedding=True`` is the paper's unscaled-embedding test (Tensor2Tensor's
``afx_unscale``): the embedding is initialised with standard deviation 1 and not multiplied by
``sqrt(d_model)``, and the softmax gets its own weights (``shared_embedding_and_softmax_weights
= False``). The first block sees inputs of the same scale either way; only the embedding's own
scale changes, from ``d_model ** -0.5`` to 1, which an absolute step size does not follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MODEL_SIZES", "ByteTransformer", "ModelSize"]

VOCAB_SIZE = 256  # one token per byte: no tokenizer to download


@dataclass(frozen=True)
class ModelSize:
    """Shape of the model and of one training batch."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    batch_size: int


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(d_model=32, n_layers=1, n_heads=2, context=32, batch_size=8),
    "small": ModelSize(d_model=64, n_layers=2, n_heads=2, context=64, batch_size=16),
    "base": ModelSize(d_model=128, n_layers=2, n_heads=4, context=128, batch_size=16),
    # The demo's default: one wide layer. Factored second moments keep r + c numbers for an
    # r x c matrix against AdamW's 2rc, so width (not depth) sets Adafactor's state ratio.
    "wide": ModelSize(d_model=512, n_layers=1, n_heads=8, context=64, batch_size=16),
    "large": ModelSize(d_model=256, n_layers=4, n_heads=4, context=256, batch_size=16),
}


def _sinusoids(context: int, d_model: int) -> Tensor:
    position = torch.arange(context, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(1e4) / d_model)
    )
    table = torch.zeros(context, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model, bias=False)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.LayerNorm(d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.mlp_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nn.Module):
    """Next-byte language model: ``forward(bytes[B, T]) -> logits[B, T, 256]``."""

    def __init__(self, size: ModelSize, *, unscaled_embedding: bool = False) -> None:
        super().__init__()
        if size.d_model % size.n_heads:
            raise ValueError(f"d_model {size.d_model} is not divisible by n_heads {size.n_heads}")
        self.size = size
        self.unscaled_embedding = unscaled_embedding
        self.embed = nn.Embedding(VOCAB_SIZE, size.d_model)
        # afx_unscale unties the softmax: logits from std-1 embeddings would start sqrt(d) large
        self.softmax = (
            nn.Linear(size.d_model, VOCAB_SIZE, bias=False) if unscaled_embedding else None
        )
        self.register_buffer("positions", _sinusoids(size.context, size.d_model), persistent=False)
        self.blocks = nn.ModuleList(
            _Block(size.d_model, size.n_heads) for _ in range(size.n_layers)
        )
        self.final_norm = nn.LayerNorm(size.d_model, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Embedding RMS d^-0.5 times sqrt(d) on the way in gives unit-scale inputs, and the tied
        # softmax then starts with logits of about unit scale (T2T's shared embedding). Unscaled:
        # RMS 1 and no multiplier, the same inputs; the untied softmax is a Linear like the rest.
        std = 1.0 if self.unscaled_embedding else self.size.d_model**-0.5
        nn.init.normal_(self.embed.weight, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens)
        if not self.unscaled_embedding:
            x = x * self.size.d_model**0.5
        x = x + self.positions[:length]
        for block in self.blocks:
            x = block(x)
        if self.softmax is not None:
            return self.softmax(self.final_norm(x))
        return self.final_norm(x) @ self.embed.weight.T

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats (in float32 whatever the parameters' dtype)."""
        logits = self(tokens).float()
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))
