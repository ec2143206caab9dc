"""``adafactor.Adafactor``: validation, state, and the per-step driver around the reference math."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checkpoint
from . import constructors as _ctors
from ._release import GradientRelease, check_accumulation_steps
from ._state import complete_state, state_options
from ._validation import (
    check_added_group,
    check_group,
    check_group_cached,
    check_instance_options,
)
from .functional import GroupResult, MissingStateError, adafactor, found_inf, global_grad_scale
from .presets import preset_defaults

__all__ = ["Adafactor", "LRSchedule", "StepStats"]

LRSchedule = Callable[[int], float]
_T = TypeVar("_T")


class _Unset:
    """Marks a keyword the caller did not pass, so a preset may fill it; shows the plain default."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _default(value: _T) -> _T:
    return cast(_T, _Unset(value))


# Hyperparameters each param group carries (torch convention: every option is per group).
_GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "beta2_decay": -0.8,
    "beta2_cap": None,
    "beta2": None,
    "eps1": 1e-30,
    "eps1_mode": "add",
    "eps2": 1e-3,
    "clip_threshold": 1.0,
    "relative_step": True,
    "scale_parameter": True,
    "warmup_init": False,
    "beta1": None,
    "momentum_kind": "update",
    "momentum_dtype": None,
    "weight_decay": 0.0,
    "weight_decay_mode": "lr",
    "factored": True,
    "factor_dims": "last2",
    "min_dim_size_to_factor": 0,
    "clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "maximize": False,
    "state_dtype": None,
    "stochastic_rounding": False,
    "skip_nonfinite": False,
    "kahan_summation": False,
}

# Constructor options kept on the optimizer itself (not per group), with their defaults.
_INSTANCE_DEFAULTS: dict[str, Any] = {
    "preset": None,
    "global_clipnorm": None,
    "impl": "auto",
    "carry_param_rms": True,
    "generator": None,
    "gradient_release": False,
    "accumulation_steps": 1,
}


class StepStats(NamedTuple):
    """What one param group's last step did, as device tensors (reading them is the only sync).

    ``alpha``, ``update_rms`` and ``clipped`` have one entry per parameter that had a gradient,
    in group order (0 for an empty parameter, and for every parameter of a skipped step).
    """

    lr: Tensor  # lr_t of the step (the schedule's value when lr is a schedule), 0-d
    alpha: Tensor  # alpha_t: the step size applied to the clipped update U_hat
    update_rms: Tensor  # RMS(U) before update clipping
    clipped: Tensor  # bool: update clipping fired (RMS(U) > clip_threshold)


class Adafactor(Optimizer):
    r"""Adafactor (Shazeer & Stern, 2018) with every option of the public implementations.

    .. math::
        \begin{aligned}
        &\textbf{input}: x_0,\ \text{lr}_t,\ c = \text{beta2\_decay},\ \epsilon_1,\ \epsilon_2,
            \ d = \text{clip\_threshold},\ \beta_1 \\
        &\textbf{for}\ t = 1, 2, \ldots \\
        &\quad G_t = \pm\nabla f_t(x_{t-1}) \quad\text{(after clipnorm / clipvalue /
            global\_clipnorm)} \\
        &\quad \hat\beta_{2t} = \min(\text{beta2\_cap},\ 1 - t^{c}) \\
        &\quad \rho_t = \min(\text{lr}_t, 1/\sqrt t)\ \text{if relative\_step else lr}_t \\
        &\quad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(x_{t-1}))\,\rho_t\
            \text{if scale\_parameter else}\ \rho_t \\
        &\quad \textbf{if}\ x\ \text{factored over dims (rows, cols)}: \\
        &\qquad R_t = \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,
            \mathrm{mean}_{cols}(G_t^2 + \epsilon_1) \\
        &\qquad C_t = \hat\beta_{2t} C_{t-1} + (1-\hat\beta_{2t})\,
            \mathrm{mean}_{rows}(G_t^2 + \epsilon_1) \\
        &\qquad \hat V_t = R_t C_t / \mathrm{mean}_{rows}(R_t) \\
        &\quad \textbf{else}\ \ \hat V_t = \hat\beta_{2t}\hat V_{t-1} + (1-\hat\beta_{2t})
            (G_t^2 + \epsilon_1) \\
        &\quad U_t = G_t / \sqrt{\hat V_t}, \qquad
            \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
        &\quad \textbf{if}\ \beta_1:\ m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\alpha_t\hat U_t,
            \ \ \Delta_t = m_t \quad\text{else}\ \ \Delta_t = \alpha_t \hat U_t \\
        &\quad x_t = \mathrm{decay}(x_{t-1}) - \Delta_t \\
        \end{aligned}

    Args:
        params: iterable of tensors or of param-group dicts; every option below can be set per
            group.
        lr: learning rate :math:`\text{lr}_t`: a float, a one-element tensor, or a schedule,
            a callable of the 0-based update index as Keras evaluates a LearningRateSchedule.
            torch LR schedulers (which write ``group["lr"]``) work with a float lr.
        beta2_decay: exponent :math:`c` of :math:`\hat\beta_{2t} = 1 - t^{c}`, at most 0.
        beta2_cap: upper bound of :math:`\hat\beta_{2t}` (big_vision: 0.999), or None.
        beta2: a fixed decay with Adam's bias correction folded in,
            :math:`\hat\beta_{2t} = \beta_2(1-\beta_2^{t-1})/(1-\beta_2^t)`, in place of
            ``beta2_decay`` (the paper's "beta2 = 0.999" rows); None uses ``beta2_decay``.
        eps1: regulariser :math:`\epsilon_1` added to :math:`G^2` (``eps1_mode="add"``), or the
            floor of mean(R) and, squared, of :math:`\hat V` (``"clamp"``, torch.optim; None
            there means the parameter dtype's machine epsilon).
        eps2: floor of RMS(x) in the parameter scale.
        clip_threshold: update clipping threshold :math:`d`; None disables update clipping.
        relative_step: cap the step size by :math:`1/\sqrt t` (the paper's relative step).
        scale_parameter: multiply the step size by :math:`\max(\epsilon_2, \mathrm{RMS}(x))`.
        beta1: momentum decay; None (or 0) keeps no first moment.
        weight_decay: decay coefficient :math:`\lambda`, applied as ``weight_decay_mode`` says.
        factored: keep factored second moments for tensors of rank >= 2 (False: full V
            everywhere, the paper's ablation).
        min_dim_size_to_factor: factor only when both factored dims are at least this large.
        clipnorm: clip each gradient to this L2 norm before the step (Keras).
        clipvalue: clip each gradient element to [-clipvalue, clipvalue] (Keras).
        global_clipnorm: clip all gradients of the optimizer to this joint L2 norm (Keras).
        use_ema: keep an exponential moving average of the weights (Keras).
        ema_momentum: EMA decay: ``ema = m * ema + (1 - m) * x`` after each step.
        ema_overwrite_frequency: every this many steps, overwrite the weights with their EMA.
        maximize: maximize the objective instead of minimizing it.
        preset: one of ``adafactor.PRESETS`` ("paper", "keras", "torch", "transformers",
            "optax", "t5", "big_vision"): defaults under which this optimizer reproduces that
            implementation. Keyword arguments passed explicitly override the preset.
        warmup_init: with ``relative_step``, also cap the step size by :math:`10^{-6} t`
            (transformers' warm-up).
        momentum_kind: what the momentum averages: ``"update"`` (the applied update
            :math:`\alpha_t\hat U_t`: T2T, transformers, optax), ``"normalized_update"`` (the
            clipped update :math:`\hat U_t` before the step size: big_vision) or ``"grad"`` (the
            gradient, normalised by :math:`\sqrt{\hat V_t}` afterwards: Adam-style).
        momentum_dtype: dtype of the momentum buffer (e.g. ``torch.bfloat16``); default: the
            state dtype.
        weight_decay_mode: ``"lr"``: :math:`x(1-\text{lr}_t\lambda)` (torch, big_vision);
            ``"lr_before"``: the same applied before RMS(x) is measured (tf_keras, Keras 3);
            ``"alpha"``: :math:`x(1-\alpha_t\lambda)` (transformers, timm);
            ``"unscaled"``: :math:`x(1-\lambda)` (optax, T5X).
        eps1_mode: ``"add"`` (the paper) or ``"clamp"`` (torch.optim.Adafactor), see ``eps1``.
        factor_dims: which two dims are factored: ``"last2"``, ``"largest2"`` or ``"matrix"``
            (rank-2 tensors only), see :func:`adafactor.factor_dims`.
        state_dtype: dtype of the second-moment state and EMA; default float32 (float64 for
            float64 parameters), whatever the parameter dtype.
        stochastic_rounding: round bf16 parameters stochastically when writing them back.
        kahan_summation: write bf16 parameters back with Kahan-style error feedback: the part of
            each update lost to rounding is kept in a bf16 buffer (state ``"kahan_comp"``, the
            parameter's shape, bf16 parameters only: 2 bytes per element) and added to the next
            write, so updates below one bf16 ulp accumulate. Not with ``stochastic_rounding``.
        skip_nonfinite: skip the whole group's step (no state change) when any of its gradients
            holds inf or NaN, and count it in ``group["skipped_steps"]`` (a 0-d tensor: no host
            sync). With ``global_clipnorm`` a non-finite gradient in any group skips every group.
        impl: ``"auto"`` (the fastest available path: the fused CPU kernel when it builds),
            ``"reference"`` (the readable math), ``"fused"`` (the CPU kernel, or a clear error),
            ``"triton"`` (CUDA kernels, experimental).
        carry_param_rms: on the fused CPU path, take RMS(x) of a step from the sum of x^2 that
            the previous step computed while writing x (saves one read of every parameter,
            about 15 % of a step). The carried sum is dropped when the parameter's data
            pointer changes or its version counter moves by more than a step moves it (one
            bump; two under ``torch.compile``, learned from a sum proved unchanged); a change
            that bypasses both (``p.data.mul_``,
            a NumPy view) is caught at the next step, whose update then used the stale RMS(x),
            and reported with a warning. Set ``False`` to re-read x every step.
        generator: random generator for stochastic rounding (for reproducible runs).
        gradient_release: step each parameter inside backward, as soon as its gradient is
            complete, and free that gradient (``p.grad = None``): the gradients never all
            exist at once. ``step()`` and ``zero_grad()`` are then no-ops for released
            parameters; results are bit-identical to the normal loop (stochastic rounding draws
            in backward order). Incompatible with ``global_clipnorm``, ``skip_nonfinite``, an
            fp16 ``GradScaler`` and DDP; works with FSDP2. See docs/memory.md.
        accumulation_steps: with ``gradient_release``, sum the gradients of this many backward
            passes and step in the last one (exact gradient accumulation; the gradients are
            held between micro-batches).

    After each step, :attr:`last_step_stats` holds one :class:`StepStats` per param group.

    .. note::
        Math runs in float32 for bf16/fp16 parameters and the state stays float32 (unless
        ``state_dtype`` says otherwise), so :math:`\epsilon_1` never underflows and
        :math:`\hat\beta_{2t}` never rounds to 1. Non-finite gradients propagate into the
        parameters and state, as in every reference implementation, unless ``skip_nonfinite``.

    Examples:
        >>> import torch
        >>> from adafactor import Adafactor
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Adafactor(model.parameters())
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['col_var', 'row_var', 'step']

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
        ICML 2018, https://arxiv.org/abs/1804.04235
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor | LRSchedule = _default(1e-2),
        *,
        beta2_decay: float = _default(-0.8),
        beta2_cap: float | None = _default(None),
        beta2: float | None = _default(None),
        eps1: float | None = _default(1e-30),
        eps2: float = _default(1e-3),
        clip_threshold: float | None = _default(1.0),
        relative_step: bool = _default(True),
        scale_parameter: bool = _default(True),
        beta1: float | None = _default(None),
        weight_decay: float = _default(0.0),
        factored: bool = _default(True),
        min_dim_size_to_factor: int = _default(0),
        clipnorm: float | None = _default(None),
        clipvalue: float | None = _default(None),
        global_clipnorm: float | None = None,
        use_ema: bool = _default(False),
        ema_momentum: float = _default(0.99),
        ema_overwrite_frequency: int | None = _default(None),
        maximize: bool = _default(False),
        preset: str | None = None,
        warmup_init: bool = _default(False),
        momentum_kind: str = _default("update"),
        momentum_dtype: torch.dtype | None = _default(None),
        weight_decay_mode: str = _default("lr"),
        eps1_mode: str = _default("add"),
        factor_dims: str = _default("last2"),
        state_dtype: torch.dtype | None = _default(None),
        stochastic_rounding: bool = _default(False),
        skip_nonfinite: bool = _default(False),
        kahan_summation: bool = _default(False),
        impl: str = "auto",
        carry_param_rms: bool = True,
        generator: torch.Generator | None = None,
        gradient_release: bool = False,
        accumulation_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        if kwargs:  # Adam's and other libraries' names get an error naming ours
            _ctors.reject_foreign_kwargs(kwargs)
        given = {k: v for k, v in locals().items() if k in _GROUP_DEFAULTS}
        explicit = {k: v for k, v in given.items() if not isinstance(v, _Unset)}
        defaults = {**_GROUP_DEFAULTS, **preset_defaults(preset), **explicit}
        check_group(defaults)
        self.global_clipnorm = check_instance_options(
            impl=impl,
            carry_param_rms=carry_param_rms,
            generator=generator,
            global_clipnorm=global_clipnorm,
            clipnorm=defaults["clipnorm"],
            clipvalue=defaults["clipvalue"],
        )
        if not isinstance(lr, _Unset):
            _ctors.warn_explicit_lr_with_relative_step(
                lr,
                preset=preset,
                relative_step=defaults["relative_step"],
                relative_step_given=not isinstance(relative_step, _Unset),
                scale_parameter=defaults["scale_parameter"],
            )
        self.preset = preset
        self.impl = impl
        self.carry_param_rms = carry_param_rms
        self.generator = generator
        self.gradient_release = gradient_release
        self.accumulation_steps = check_accumulation_steps(accumulation_steps, gradient_release)
        self._release: GradientRelease | None = None
        self.last_step_stats: list[StepStats | None] = []
        self._group_snapshots: list[Any] = []
        self._state_layouts: dict[int, tuple[Any, ...]] = {}  # per group: state_options()
        super().__init__(params, defaults)
        if gradient_release:  # hooks every group's parameters (added groups: add_param_group)
            self._release = GradientRelease(self, accumulation_steps)

    # Other libraries' exact constructors (adafactor.constructors): their names and defaults.
    from_keras = classmethod(_ctors.from_keras)
    from_torch = classmethod(_ctors.from_torch)
    from_transformers = classmethod(_ctors.from_transformers)
    from_timm = classmethod(_ctors.from_timm)
    from_big_vision = classmethod(_ctors.from_big_vision)
    from_optax = classmethod(_ctors.from_optax)

    # -----------------------------------------------------------------------------------------
    # param groups and state
    # -----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        checkpoint.migrate_group(group)
        options = {k: getattr(self, k) for k in _INSTANCE_DEFAULTS if hasattr(self, k)}
        check_added_group(group, index, options)
        if getattr(self, "_release", None) is not None:
            self._release.add_group(index)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups: copy and pickle the
        # constructor's other options too
        return {**super().__getstate__(), **{k: getattr(self, k) for k in _INSTANCE_DEFAULTS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _INSTANCE_DEFAULTS.items():
            if not hasattr(self, key):
                setattr(self, key, value)
        self.last_step_stats, self._group_snapshots, self._state_layouts = [], [], {}
        for group in self.param_groups:  # checkpoints from older versions lack newer options
            checkpoint.migrate_group(group, _GROUP_DEFAULTS)
        # unpickled or deep-copied (not load_state_dict, which keeps the live hooks): hook the
        # copy's own parameters
        if self.gradient_release and getattr(self, "_release", None) is None:
            self._release = GradientRelease(self, self.accumulation_steps)
        elif not hasattr(self, "_release"):
            self._release = None

    def remove_gradient_release(self) -> None:
        """Remove the hooks of ``gradient_release=True``: ``step()`` steps every parameter
        again (gradients an unfinished accumulation window holds are kept for it)."""
        if self._release is not None:
            self._release.remove()
            self._release = None
        self.gradient_release = False
        self.accumulation_steps = 1

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, created or completed for ``group``'s options."""
        return complete_state(self.state, p, group)

    # -----------------------------------------------------------------------------------------
    # the step
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Each param group is one call of ``torch.ops.adafactor.step_``; nothing is read back to
        the host, so ``torch.compile(opt.step)`` traces it whole. With ``gradient_release``
        the parameters were stepped in backward: a no-op (a closure raises)."""
        if self._release is not None:
            self._release.step(closure)
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # every option is checked before it touches a parameter, wherever it was written from
        snaps = self._group_snapshots
        if len(snaps) != len(self.param_groups):
            snaps[:] = [None] * len(self.param_groups)
        for i, group in enumerate(self.param_groups):
            snaps[i] = check_group_cached(group, snaps[i])
        work = [self._grads_of(group, i) for i, group in enumerate(self.param_groups)]
        every = [g for _, grads in work for g in grads]
        global_scale = None
        if self.global_clipnorm is not None:
            global_scale = global_grad_scale(every, self.global_clipnorm)
        skip_all = None  # with global_clipnorm a non-finite gradient anywhere skips every group
        if global_scale is not None and any(g["skip_nonfinite"] for g in self.param_groups):
            skip_all = found_inf(every)
        stats: list[StepStats | None] = []
        for index, (group, (params, grads)) in enumerate(zip(self.param_groups, work)):
            if not params:
                stats.append(None)
                continue
            skip = None
            if group["skip_nonfinite"]:
                skip = skip_all if skip_all is not None else found_inf(grads)
            stats.append(self._step_group(index, group, params, grads, global_scale, skip))
        # filled in place: torch.compile replays list mutations, not attribute stores on optimizers
        self.last_step_stats[:] = stats
        return loss

    def _grads_of(self, group: dict[str, Any], index: int) -> tuple[list[Tensor], list[Tensor]]:
        params = group["params"]
        grads = [p.grad for p in params]  # (no appends: thousands of small tensors are common)
        if any(map(operator.is_, grads, repeat(None))):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if any(g.is_sparse for g in grads):
            i = next(
                i for i, p in enumerate(group["params"]) if p.grad is not None and p.grad.is_sparse
            )
            raise RuntimeError(
                f"param_groups[{index}]['params'][{i}] has a sparse gradient; Adafactor needs "
                "dense gradients (use nn.Embedding(sparse=False), or densify with "
                "grad.to_dense())"
            )
        return params, grads

    def _step_group(
        self,
        index: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        global_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> StepStats:
        layouts = self._state_layouts
        layout = state_options(group)
        if layouts.get(index) != layout:  # first step, or state options changed: complete
            states = [complete_state(self.state, p, group) for p in params]
            layouts[index] = layout
        else:
            states = [self.state[p] for p in params]

        def run(states: list[dict[str, Any]]) -> GroupResult:
            return adafactor(
                params,
                grads,
                states,
                group,
                global_grad_scale=global_scale,
                found_inf=found_inf,
                generator=self.generator,
                impl=self.impl,
                carry_param_rms=self.carry_param_rms,
            )

        try:
            result = run(states)
        except MissingStateError:  # new parameters, or state removed: nothing changed yet
            result = run([complete_state(self.state, p, group) for p in params])
        rms = result.update_rms.float()
        threshold = group["clip_threshold"]
        clipped = rms > threshold if threshold is not None else torch.zeros_like(rms, dtype=bool)
        return StepStats(result.lr, result.alpha.float(), rms, clipped)

    def finalize_variable_values(self) -> None:
        """Write the EMA of the weights into the parameters (Keras' end-of-training call)."""
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    ema = self.state[p].get("ema") if p in self.state else None
                    if ema is not None:
                        p.copy_(ema)

    # -----------------------------------------------------------------------------------------
    # state_dict
    # -----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adafactor``, checking everything
        before anything changes (:func:`adafactor.checkpoint.load_state_dict`)."""
        checkpoint.load_state_dict(self, state_dict)

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state dict in ``torch.optim.Adafactor``'s format
        (:func:`adafactor.checkpoint.torch_state_dict`)."""
        return checkpoint.torch_state_dict(self)
