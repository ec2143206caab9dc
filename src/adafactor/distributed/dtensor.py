"""Adafactor on DTensor parameters: local shards plus the few collectives the statistics need.

Every rank runs the driver of every step (:func:`adafactor._driver.run_passes`) on its local
shards (the fused CPU kernel's passes where they apply, else :mod:`adafactor._reference`), with
a reduction (:class:`_MeshReduction`) that all-reduces the partial sums spanning shards between
the passes (float64), batched into one flat buffer per process group, so a step costs a
constant number of collectives whatever the number of tensors:

* round 1 (after pass 1): per-row sums of g^2 over the mesh dims that shard the column dim, per-
  column sums over those that shard the row dim, sum(x^2) (for RMS(x)), sum(g^2) (clipnorm) and
  the overflow probe (CPU tensors: float32 sums beyond range, finite gradient) over every
  sharding mesh dim;
* only when a tensor's probe says so (alike on every rank): round 1 again, for the float64 sums;
* round 2 (after the moving averages): sum of R over rows, over the mesh dims sharding rows,
  for V_hat = R C / mean(R);
* round 3 (after pass 2): sum(U^2) over every sharding mesh dim, for RMS(U).

A round sends nothing on a process group no tensor needs. ``global_clipnorm`` adds one more
round (:func:`grad_square_sum`). Parameters and gradients are never gathered.

State buffers are DTensors on the parameter's mesh with its placements, so
``torch.distributed.checkpoint`` saves, loads and reshards them. ``row_var`` / ``col_var`` keep a
size-1 dim where the parameter is reduced; a mesh dim sharding that dim is ``Replicate`` for them
(each rank then holds the factor entries of exactly its own rows or columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from .._driver import LocalPasses, Reduction, local_passes, run_passes
from .._plan import GroupPlan, step_scalars
from .._reference import rounding_noise

__all__ = [
    "check_mesh",
    "found_inf",
    "grad_square_sum",
    "is_dtensor",
    "load_state_tensor",
    "new_state_buffer",
    "sharded_adafactor_step",
]

_Groups = tuple[dist.ProcessGroup, ...]


def is_dtensor(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def _shard_dims(t: DTensor) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of every placement that shards ``t``."""
    out = []
    for mesh_dim, placement in enumerate(t.placements):
        dim = _norm_dim(placement, t.ndim)
        if dim >= 0:
            out.append((mesh_dim, dim))
    return out


def _groups(t: Tensor, tensor_dims: Sequence[int] | None) -> _Groups:
    """Process groups that a partial sum across ``tensor_dims`` (None: all) is reduced over."""
    if not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    return tuple(
        mesh.get_group(mesh_dim)
        for mesh_dim, dim in _shard_dims(t)
        if tensor_dims is None or dim in tensor_dims
    )


def new_state_buffer(param: DTensor, shape: Sequence[int], dtype: torch.dtype) -> DTensor:
    """Zero state of global ``shape`` laid out like ``param``'s shards.

    Dims where ``shape`` is 1 but the parameter is not (the reduced dim of row_var / col_var)
    are Replicate on the mesh dims that shard them; every other dim follows the parameter.
    """
    shape = tuple(shape)
    reduced = {d for d in range(param.ndim) if shape[d] != param.shape[d]}
    local_shape = [1 if d in reduced else n for d, n in enumerate(param.to_local().shape)]
    local = torch.zeros(local_shape, dtype=dtype, device=param.to_local().device)
    return DTensor.from_local(
        local,
        param.device_mesh,
        _state_placements(param, shape),
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def _state_placements(param: DTensor, shape: Sequence[int]) -> list[Placement]:
    reduced = {d for d in range(param.ndim) if shape[d] != param.shape[d]}
    return [Replicate() if _norm_dim(pl, param.ndim) in reduced else pl for pl in param.placements]


def load_state_tensor(param: DTensor, value: Tensor, dtype: torch.dtype) -> DTensor:
    """A copy of saved state ``value`` (DTensor or full tensor) in ``param``'s layout."""
    placements = _state_placements(param, tuple(value.shape))
    mesh = param.device_mesh
    if isinstance(value, DTensor):
        if value.device_mesh != mesh:
            raise ValueError(
                f"load_state_dict: a state DTensor lives on mesh {value.device_mesh} but its "
                f"parameter on {mesh}; load through torch.distributed.checkpoint "
                "(get_state_dict / set_state_dict), which reshards onto the current mesh"
            )
        if tuple(value.placements) != tuple(placements):
            value = value.redistribute(mesh, placements)
        return value.to(dtype=dtype, copy=True)
    # A full (unsharded) tensor: every rank keeps its own slice, no communication.
    local = value.to(device=param.to_local().device, dtype=dtype, copy=True)
    return distribute_tensor(local, mesh, placements, src_data_rank=None)


def _norm_dim(placement: Placement, ndim: int) -> int:
    """The tensor dim a placement shards, or -1. FSDP x TP on one dim gives ``_StridedShard``,
    for which ``is_shard()`` is False: anything neither Replicate nor Partial shards ``.dim``."""
    if placement.is_replicate() or placement.is_partial():
        return -1
    dim = placement.dim  # type: ignore[attr-defined]
    return dim + ndim if dim < 0 else dim


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _to_local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _check_pair(p: Tensor, g: Tensor, index: int) -> None:
    """A DTensor parameter needs a DTensor gradient with its mesh and placements."""
    if not isinstance(p, DTensor):
        if isinstance(g, DTensor):
            raise TypeError(
                f"params[{index}] is a plain tensor but its gradient is a DTensor; give both the "
                "same type (shard the parameter, or call grad.full_tensor() yourself)"
            )
        return
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"params[{index}] has placements {p.placements}: a Partial parameter has no "
            "well-defined value to update; redistribute it to Shard or Replicate"
        )
    if not isinstance(g, DTensor):
        raise TypeError(
            f"params[{index}] is a DTensor but its gradient is a plain {type(g).__name__}; "
            "the gradient must be a DTensor with the parameter's mesh and placements"
        )
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        hint = (
            "a Partial gradient is an unreduced sum across ranks: reduce it first (FSDP2 and "
            "tensor-parallel styles do), e.g. grad.redistribute(p.device_mesh, p.placements)"
            if any(pl.is_partial() for pl in g.placements)
            else "redistribute it with grad.redistribute(p.device_mesh, p.placements)"
        )
        raise ValueError(
            f"params[{index}] has placements {p.placements} but its gradient has "
            f"{g.placements} on mesh {g.device_mesh}; Adafactor steps each rank's shard with the "
            f"gradient shard of the same elements: {hint}"
        )


def _all_reduce(values: list[Tensor], groups: list[_Groups]) -> list[Tensor]:
    """Each value summed over its process groups: one collective per (process group, dtype)."""
    values = list(values)
    # Every rank passes the same entries in the same order (they follow the param list and the
    # global placements), so this first-seen order of groups matches across ranks.
    keys: list[tuple[dist.ProcessGroup, torch.dtype]] = []
    for value, gs in zip(values, groups):
        for pg in gs:
            if not any(pg is k[0] and value.dtype == k[1] for k in keys):
                keys.append((pg, value.dtype))
    for pg, dtype in keys:
        idx = [
            i
            for i, (v, gs) in enumerate(zip(values, groups))
            if v.dtype == dtype and any(pg is g for g in gs)
        ]
        flat = torch.cat([values[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, group=pg)
        offset = 0
        for i in idx:
            n = values[i].numel()
            values[i] = flat[offset : offset + n].view(values[i].shape)
            offset += n
    return values


class _MeshReduction(Reduction):
    """The driver's reduction for a list of (DTensor or plain) parameters: a partial sum over
    some tensor dims is all-reduced over the mesh dims that shard them."""

    collective = True

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params

    def peers(self, index: int, dims: tuple[int, ...] | None) -> _Groups:
        return _groups(self.params[index], dims)

    def all_reduce(self, values: list[Tensor], peers: list[_Groups]) -> list[Tensor]:
        return _all_reduce(values, peers)


def grad_square_sum(grads: Sequence[Tensor]) -> Tensor:
    """Sum of g^2 over every element of every (sharded or plain) gradient: one round."""
    # float64 accumulation, as unsharded: finite gradients never overflow the norm
    return _sum_over_shards(
        grads, lambda g: torch.linalg.vector_norm(g, dtype=torch.float64).square()
    )


def found_inf(tensors: Sequence[Tensor]) -> Tensor:
    """Whether some element of some tensor is not finite, decided alike on every rank (one
    round; a shard-local test would let ranks skip different steps and then deadlock)."""
    bad = _sum_over_shards(tensors, lambda t: (~torch.isfinite(t)).sum(dtype=torch.float32))
    return bad > 0


def _sum_over_shards(tensors: Sequence[Tensor], local_sum: Any) -> Tensor:
    totals: dict[_Groups, Tensor] = {}
    for t in tensors:
        local = local_sum(_to_local(t))
        key = _groups(t, None)
        totals[key] = totals[key] + local if key in totals else local
    if not totals:
        return torch.zeros(())
    return torch.stack(_all_reduce(list(totals.values()), list(totals))).sum()


def sharded_adafactor_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    plan: GroupPlan,
    lr_t: float | Tensor,
    global_grad_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float | Tensor, Tensor, Tensor]:
    """One Adafactor step of a param group holding DTensor (and possibly plain) parameters.

    Returns ``(lr_t, alpha, update_rms)`` like :func:`adafactor.functional.adafactor`. Must be
    called on every rank of the parameters' meshes with the same param list. The local shards go
    through the pass driver (:func:`adafactor._driver.run_passes`) with :class:`_MeshReduction`;
    the fused CPU kernel runs on those it supports unless ``plan.impl`` is the reference.
    """
    from ..factoring import factor_dims

    for i, (p, g) in enumerate(zip(params, grads)):
        _check_pair(p, g, i)
    torch._foreach_add_([state["step"] for state in states], 1.0)
    passes: list[LocalPasses] = []
    stepped: list[Tensor] = []
    lr_f = float(lr_t) if isinstance(lr_t, Tensor) else lr_t
    for p, g, state in zip(params, grads, states):
        if p.numel() == 0:  # the global size: the same decision on every rank
            continue
        # to_local() shares storage, so in-place updates of the views land in the DTensors.
        view = {key: _to_local(value) for key, value in state.items()}
        scalars = step_scalars(plan, float(state["step"]), lr_f)
        dims = factor_dims(
            tuple(p.shape), group["factor_dims"], group["min_dim_size_to_factor"], group["factored"]
        )
        passes.append(
            local_passes(_to_local(p), _to_local(g), view, plan, scalars, dims, tuple(p.shape))
        )
        stepped.append(p)

    def noise(k: int) -> Tensor | None:  # drawn per local shard, in pass 3
        local = passes[k].param
        if plan.stochastic_rounding and local.dtype == torch.bfloat16:
            return rounding_noise(local, generator)
        return None

    out = run_passes(passes, plan, _MeshReduction(stepped), global_grad_scale, noise)
    alphas = [torch.as_tensor(alpha, dtype=torch.float32).reshape(()) for alpha, _ in out]
    update_rms = [torch.as_tensor(rms, dtype=torch.float32).reshape(()) for _, rms in out]
    empty = torch.zeros(0, dtype=torch.float32)
    return (
        lr_t,
        torch.stack(alphas) if alphas else empty,
        torch.stack(update_rms) if update_rms else empty,
    )


def check_mesh(params: Sequence[Tensor], mesh: Any) -> None:
    """``from_keras(mesh=)``: every DTensor parameter must live on ``mesh`` or a sub-mesh of it."""
    if mesh is None:
        return
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"mesh must be a torch.distributed.device_mesh.DeviceMesh (e.g. "
            f"init_device_mesh('cuda', (8,))), got {type(mesh).__name__}"
        )
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            continue  # a plain parameter is replicated: each rank steps its own full copy
        pm = p.device_mesh
        root = pm._get_root_mesh() if hasattr(pm, "_get_root_mesh") else pm
        if pm != mesh and root != mesh:
            raise ValueError(
                f"from_keras(mesh=...): parameter {i} (shape {tuple(p.shape)}) is a DTensor on "
                f"mesh {pm}, not on the given mesh {mesh} or a sub-mesh of it; pass the mesh the "
                "model was sharded with (fully_shard(..., mesh=) / parallelize_module)"
            )
