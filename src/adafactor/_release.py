"""Gradient release: step each parameter inside backward, as soon as its gradient is complete.

``Adafactor(params, gradient_release=True)`` registers a post-accumulate-grad hook on every
parameter. When autograd has finished a parameter's gradient (all its uses in the graph summed
into ``p.grad``), the hook steps that parameter alone, through the optimizer's own group step
(one call of ``torch.ops.adafactor.step_`` with a one-element list), and frees the gradient
(``p.grad = None``). At most one full gradient is alive besides those autograd is still summing,
instead of all of them, so peak memory drops by about the size of the gradients (docs/memory.md).

Every per-tensor option runs as in a normal step, so parameters and state are bit-identical to the
loop ``backward(); opt.step(); opt.zero_grad()``. Stochastic rounding draws from the generator in
hook order (the order in which backward completes the gradients), so with
``stochastic_rounding=True`` release equals a normal loop whose parameters are listed in that
order (:attr:`GradientRelease.order`). What needs every gradient at once (``global_clipnorm``,
``skip_nonfinite``, fp16 ``GradScaler``) raises, and so does DDP, whose all-reduce runs after the
hooks. FSDP2 runs the hooks of its sharded parameters after each reduce-scatter: it works.

The optimizer wires this module in (``optimizer.py``); nothing here is public API.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import distributed
from ._validation import check_group_cached

if TYPE_CHECKING:
    from collections.abc import Callable

    from .optimizer import Adafactor

__all__ = ["GradientRelease", "check_accumulation_steps"]

# parameter -> weak reference to the release that steps it (one optimizer per tensor); kept
# here, not as an attribute, so that the parameters still pickle
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_accumulation_steps(accumulation_steps: Any, gradient_release: Any) -> int:
    """Check the two constructor keywords; return ``accumulation_steps`` as an int."""
    if type(gradient_release) is not bool:
        raise TypeError(
            f"gradient_release must be True or False, got {gradient_release!r} of type "
            f"{type(gradient_release).__name__}"
        )
    if type(accumulation_steps) is not int or accumulation_steps < 1:
        raise ValueError(
            f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}: the number of "
            "backward passes whose gradients are summed before each parameter is stepped"
        )
    if accumulation_steps > 1 and not gradient_release:
        raise ValueError(
            f"accumulation_steps={accumulation_steps} needs gradient_release=True; without "
            "release, accumulate as usual: call backward() on each micro-batch, then opt.step()"
        )
    return accumulation_steps


def _incompatible(option: str, why: str, instead: str) -> ValueError:
    return ValueError(f"gradient_release=True cannot be combined with {option}: {why}. {instead}")


def _check_group(group: dict[str, Any], index: int) -> None:
    if group["skip_nonfinite"]:
        raise _incompatible(
            f"skip_nonfinite=True (param_groups[{index}])",
            "it skips the whole group's step when any of its gradients is not finite, and with "
            "release a group's gradients never exist at the same time (each parameter is stepped "
            "as soon as its own gradient is ready)",
            "Check the loss for inf/NaN before backward, or use gradient_release=False",
        )


def _plain(params: list[Tensor]) -> bool:
    """Whether some of ``params`` is a plain tensor (not a DTensor)."""
    return not params or any(not distributed.has_dtensor([p]) for p in params)


def _check_distributed(params: list[Tensor]) -> None:
    """Plain parameters in a multi-rank process group: DDP, whose all-reduce runs after the hook.

    DTensor parameters are fine: FSDP2 runs each sharded parameter's post-accumulate-grad hooks
    after its reduce-scatter, and tensor parallel gradients are complete when autograd ends."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if _plain(params):
        raise _incompatible(
            f"plain (non-DTensor) parameters in a process group of {dist.get_world_size()} "
            "ranks (DistributedDataParallel)",
            "a parameter's hook fires when its local gradient is complete, before DDP's "
            "all-reduce averages it, so each rank would step with its own gradient and the "
            "replicas would drift apart; DDP's buckets also keep a copy of every gradient, so "
            "release would save no memory",
            "Use gradient_release=False with DDP, or shard with FSDP2 (fully_shard), which "
            "works with gradient_release=True (under tensor parallel, make the replicated "
            "parameters DTensors too, or leave them to another optimizer)",
        )


class _Backward:
    """What one backward pass (one autograd graph task) has stepped so far."""

    __slots__ = ("stats", "task")

    def __init__(self, task: int) -> None:
        self.task = task
        self.stats: dict[Tensor, Any] = {}  # param -> its one-element StepStats


class GradientRelease:
    """The hooks of one optimizer: steps each parameter in backward, then frees its gradient.

    ``accumulation_steps=N`` keeps every gradient (summed in ``p.grad`` by autograd, as without
    release) through N backward passes and steps each parameter in the N-th, so the result is
    bit-identical to accumulating N micro-batches and calling ``opt.step()``; the gradients of
    the whole model are held between micro-batches, so the peak is that of the normal loop.
    """

    def __init__(self, optimizer: Adafactor, accumulation_steps: int = 1) -> None:
        check_accumulation_steps(accumulation_steps, True)
        if optimizer.global_clipnorm is not None:
            raise _incompatible(
                f"global_clipnorm={optimizer.global_clipnorm!r}",
                "the joint norm of all gradients is known only once every gradient exists, and "
                "release steps each parameter as soon as its own gradient is ready",
                "Use clipnorm= (each gradient's own norm) or gradient_release=False",
            )
        for index, group in enumerate(optimizer.param_groups):
            _check_group(group, index)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        _check_distributed(params)
        self._has_plain = _plain(params)
        for p in params:
            owner = _OWNERS.get(p)
            other = owner() if owner is not None else None
            if other is not None and other is not self and p in other._handles:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is already stepped in backward by "
                    "another optimizer with gradient_release=True; call that optimizer's "
                    "remove_gradient_release() first (each hook steps its own optimizer)"
                )
        self.accumulation_steps = accumulation_steps
        self._optimizer = optimizer
        self._handles: dict[Tensor, Any] = {}
        self._where: dict[Tensor, tuple[int, int]] = {}  # param -> (group index, index in group)
        self._snapshots: list[Any] = []
        self._backward: _Backward | None = None
        self._queued: set[int] = set()  # graph tasks whose end-of-backward callback is queued
        self._micro = 0  # backward passes of the current accumulation window, this one included
        self._since_step: int | None = None  # backward passes since opt.step() (None: never called)
        # the parameters in the order the first completed backward stepped them (SR draws)
        self.order: list[Tensor] = []
        for index in range(len(optimizer.param_groups)):
            self.add_group(index)
        # GradScaler.step(opt) then hands this optimizer its scale and found_inf and calls
        # opt.step(), which says why a scaler cannot work here (instead of the scaler's
        # "No inf checks were recorded for this optimizer")
        optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]

    # -----------------------------------------------------------------------------------------
    # hooks
    # -----------------------------------------------------------------------------------------
    def add_group(self, index: int) -> None:
        """Hook the parameters of ``optimizer.param_groups[index]`` (also for add_param_group)."""
        group = self._optimizer.param_groups[index]
        _check_group(group, index)
        _check_distributed(list(group["params"]))
        self._has_plain = self._has_plain or _plain(list(group["params"]))
        for i, p in enumerate(group["params"]):
            self._where[p] = (index, i)
            self._hook(p)

    def _hook(self, p: Tensor) -> None:
        # A parameter that does not require grad cannot take a hook; opt.step() hooks it (and
        # steps any gradient it got meanwhile) once it does.
        if p in self._handles or not p.requires_grad:
            return
        self._handles[p] = p.register_post_accumulate_grad_hook(self._on_grad)
        _OWNERS[p] = weakref.ref(self)

    def remove(self) -> None:
        """Remove every hook: ``opt.step()`` steps all parameters again. Gradients that an
        unfinished accumulation window holds stay in ``p.grad`` for that step."""
        for p, handle in self._handles.items():
            handle.remove()
            _OWNERS.pop(p, None)
        self._handles.clear()
        self._backward = None
        for key in ("_step_supports_amp_scaling", "grad_scale", "found_inf"):
            vars(self._optimizer).pop(key, None)

    @property
    def hooked(self) -> int:
        """How many parameters carry a hook."""
        return len(self._handles)

    def _on_grad(self, p: Tensor) -> None:
        record = self._enter_backward()
        if self._micro < self.accumulation_steps:
            return  # p.grad keeps the sum of this window's micro-batches
        self._step(p, record)

    def _enter_backward(self) -> _Backward:
        """The record of the running backward pass; the first hook of a pass opens it."""
        task = torch._C._current_graph_task_id()
        record = self._backward
        if record is not None and record.task == task:
            return record
        if self._has_plain:  # a process group started after the optimizer was built
            _check_distributed([])
        record = self._backward = _Backward(task)
        self._micro = self._micro % self.accumulation_steps + 1
        if self._since_step is not None:
            self._since_step += 1
            if self._since_step == self.accumulation_steps + 1:  # warned once per step() call
                warnings.warn(
                    f"gradient_release: {self._since_step} backward passes since the last "
                    f"opt.step(), and each {self.accumulation_steps} of them stepped the "
                    "parameters. If you accumulate gradients over micro-batches, pass "
                    "accumulation_steps=<micro-batches per step> to Adafactor",
                    stacklevel=2,
                )
        if task not in self._queued:
            self._queued.add(task)
            engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
            engine.queue_callback(lambda: self._end_backward(task))
        return record

    def _end_backward(self, task: int) -> None:
        self._queued.discard(task)
        record = self._backward
        if record is None or record.task != task:
            return
        if self._micro >= self.accumulation_steps:
            # the window's last pass: parameters it did not reach still hold earlier gradients
            for p in self._handles:
                if p.grad is not None and p not in record.stats:
                    self._step(p, record)
            self._publish(record)
        self._backward = None

    # -----------------------------------------------------------------------------------------
    # the step of one parameter
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, p: Tensor, record: _Backward | None) -> None:
        opt = self._optimizer
        index, position = self._where[p]
        group = opt.param_groups[index]
        grad = p.grad
        assert grad is not None
        where = f"param_groups[{index}]['params'][{position}]"
        if grad.is_sparse:
            raise RuntimeError(
                f"{where} has a sparse gradient; Adafactor needs dense gradients (use "
                "nn.Embedding(sparse=False), or densify with grad.to_dense())"
            )
        if grad.dtype == torch.float16:
            raise RuntimeError(
                f"{where} has a float16 gradient: gradient_release=True does not support fp16 "
                "training with a GradScaler, which unscales and inf-checks every gradient after "
                "backward (release has stepped each parameter by then). Train in bfloat16 (no "
                "scaler needed) or use gradient_release=False"
            )
        if opt.global_clipnorm is not None:
            raise _incompatible(
                f"global_clipnorm={opt.global_clipnorm!r}",
                "it was set after construction, and the joint norm needs every gradient at once",
                "Use clipnorm= or gradient_release=False",
            )
        _check_group(group, index)
        snaps = self._snapshots
        if len(snaps) < len(opt.param_groups):
            snaps.extend([None] * (len(opt.param_groups) - len(snaps)))
        snaps[index] = check_group_cached(group, snaps[index])
        stats = opt._step_group(index, group, [p], [grad], None, None)
        p.grad = None
        if record is not None:
            record.stats[p] = stats

    def _publish(self, record: _Backward) -> None:
        """``opt.last_step_stats`` as a normal step fills it: per group, the stepped
        parameters in group order (None for a group with none)."""
        from .optimizer import StepStats

        if not self.order:
            self.order = list(record.stats)
        out: list[Any] = []
        for group in self._optimizer.param_groups:
            parts = [record.stats[p] for p in group["params"] if p in record.stats]
            if not parts:
                out.append(None)
                continue
            out.append(
                StepStats(
                    parts[-1].lr,
                    torch.cat([s.alpha for s in parts]),
                    torch.cat([s.update_rms for s in parts]),
                    torch.cat([s.clipped for s in parts]),
                )
            )
        self._optimizer.last_step_stats[:] = out

    # -----------------------------------------------------------------------------------------
    # opt.step()
    # -----------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None) -> None:
        """``opt.step()`` while release is on: released parameters were stepped in backward.

        Hooks parameters that have started to require grad since, and steps any gradient they
        hold (those only; ``last_step_stats`` is left alone when there is none)."""
        if closure is not None:
            raise RuntimeError(
                "opt.step(closure) with gradient_release=True: the parameters are stepped inside "
                "backward, so there is nothing left for a closure's re-evaluation to step. Call "
                "loss.backward() yourself (opt.step() is then a no-op), or call "
                "opt.remove_gradient_release() first"
            )
        if "found_inf" in vars(self._optimizer):  # set by GradScaler.step(opt)
            raise RuntimeError(
                "GradScaler.step(opt) with gradient_release=True: the scaler unscales and "
                "inf-checks every gradient after backward, but release has already stepped each "
                "parameter with its scaled gradient inside backward (this step's update is wrong). "
                "Train in bfloat16 (no scaler needed) or use gradient_release=False"
            )
        self._since_step = 0
        late = [p for p in self._where if p not in self._handles and p.requires_grad]
        for p in late:
            self._hook(p)
        pending = [p for p in late if p.grad is not None]
        if not pending:
            return
        record = _Backward(-1)
        for p in pending:
            self._step(p, record)
        self._publish(record)
