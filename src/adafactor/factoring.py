"""Which two dimensions of a tensor carry the factored second moment.

For a tensor with factored dims ``(row_dim, col_dim)`` (``row_dim < col_dim``) the optimizer keeps

* ``row_var``: moving average of the mean of ``g^2`` over ``col_dim`` (size 1 at ``col_dim``),
* ``col_var``: moving average of the mean of ``g^2`` over ``row_dim`` (size 1 at ``row_dim``),

both with ``keepdim`` shapes, so for the last two dims of ``[..., m, n]`` they are ``[..., m, 1]``
and ``[..., 1, n]`` exactly as in ``torch.optim.Adafactor``. Every other dim is a batch dim: each
slice along it gets its own pair of factors.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["FACTOR_POLICIES", "FactorDims", "factor_dims"]

FactorPolicy = Literal["last2", "largest2", "largest2_first", "matrix"]
FACTOR_POLICIES: tuple[str, ...] = ("last2", "largest2", "largest2_first", "matrix")


class FactorDims(NamedTuple):
    """The two factored dims of a tensor, in increasing order."""

    row_dim: int
    col_dim: int


def factor_dims(
    shape: tuple[int, ...] | list[int],
    policy: str = "last2",
    min_dim_size_to_factor: int = 0,
    factored: bool = True,
) -> FactorDims | None:
    """Return the factored dims of ``shape`` under ``policy``, or ``None`` for a full second moment.

    Policies:

    * ``"last2"``: the last two dims of any tensor of rank >= 2 (tf_keras, Keras 3, torch,
      transformers). A conv kernel ``[O, I, kh, kw]`` is factored over ``(kh, kw)``.
    * ``"largest2"``: the two largest dims; among equal sizes the later dim counts as larger
      (optax's argsort, big_vision, timm).
    * ``"largest2_first"``: the two largest dims; among equal sizes the earlier dim counts as
      larger (Mesh TF's stable sort, as T5 used it). Differs from ``"largest2"`` only when the
      second largest size is shared, e.g. ``(12, 6, 6)``.
    * ``"matrix"``: rank-2 tensors only; every other rank keeps a full second moment (Tensor2Tensor,
      the paper's Algorithms 4 and 5).

    A tensor is factored only if the smaller of its two factored dims is at least
    ``min_dim_size_to_factor`` (optax's rule: the second largest dim must reach the threshold).

    >>> factor_dims((16, 4, 8), "last2")
    FactorDims(row_dim=1, col_dim=2)
    >>> factor_dims((16, 4, 8), "largest2")
    FactorDims(row_dim=0, col_dim=2)
    >>> factor_dims((12, 6, 6), "largest2"), factor_dims((12, 6, 6), "largest2_first")
    (FactorDims(row_dim=0, col_dim=2), FactorDims(row_dim=0, col_dim=1))
    >>> factor_dims((64, 127), "largest2", min_dim_size_to_factor=128) is None
    True
    """
    if not factored or len(shape) < 2:
        return None
    if policy == "last2":
        dims = (len(shape) - 2, len(shape) - 1)
    elif policy in ("largest2", "largest2_first"):
        tie = 1 if policy == "largest2" else -1  # which of two equal dims counts as larger
        order = sorted(range(len(shape)), key=lambda d: (shape[d], tie * d))
        dims = tuple(sorted(order[-2:]))
    elif policy == "matrix":
        if len(shape) != 2:
            return None
        dims = (0, 1)
    else:
        raise ValueError(
            f"factor_dims={policy!r} is not a factoring policy; choose one of {FACTOR_POLICIES}"
        )
    if min(shape[dims[0]], shape[dims[1]]) < min_dim_size_to_factor:
        return None
    return FactorDims(dims[0], dims[1])
