"""Named presets: each sets the defaults under which a public implementation computes.

A preset is a plain mapping of :class:`~adafactor.Adafactor` keyword arguments. Explicit keyword
arguments passed to the constructor override the preset. ``docs/presets.md`` explains every
deviation and how each reference's own keyword names map onto ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["PRESETS", "preset_defaults"]

_PRESETS: dict[str, dict[str, Any]] = {
    # Algorithms 4-6 of the paper as Tensor2Tensor implements them: factor matrices only.
    "paper": {
        "lr": 1e-2,
        "relative_step": True,
        "scale_parameter": True,
        "factor_dims": "matrix",
        "weight_decay_mode": "lr",
    },
    # tf_keras.optimizers.Adafactor and keras.optimizers.Adafactor (Keras 3).
    "keras": {
        "lr": 1e-3,
        "relative_step": True,
        "scale_parameter": True,
        "factor_dims": "last2",
        "weight_decay_mode": "lr_before",
    },
    # torch.optim.Adafactor: eps1 clamps the estimate instead of being added to g^2.
    "torch": {
        "lr": 1e-2,
        "eps1": None,
        "eps1_mode": "clamp",
        "relative_step": True,
        "scale_parameter": True,
        "factor_dims": "last2",
        "weight_decay_mode": "lr",
    },
    # transformers.optimization.Adafactor (and fairseq's, which it copies).
    "transformers": {
        "lr": 1e-2,
        "relative_step": True,
        "scale_parameter": True,
        "factor_dims": "last2",
        "momentum_kind": "update",
        "weight_decay_mode": "alpha",
    },
    # optax.adafactor: learning_rate=None there means no learning-rate scaling at all (lr=1).
    "optax": {
        "lr": 1.0,
        "relative_step": False,
        "scale_parameter": True,
        "factor_dims": "largest2",
        "min_dim_size_to_factor": 128,
        "momentum_kind": "update",
        "weight_decay_mode": "unscaled",
    },
    # Mesh TensorFlow as T5 used it: rho_t = 1/sqrt(max(t, 1e4)) = min(1e-2, 1/sqrt(t)).
    "t5": {
        "lr": 1e-2,
        "relative_step": True,
        "scale_parameter": True,
        "factor_dims": "largest2_first",
        "min_dim_size_to_factor": 128,
        "momentum_kind": "update",
        "weight_decay_mode": "unscaled",
    },
    # Scaling ViT (Zhai et al. 2021) as timm's AdafactorBigVision computes it.
    "big_vision": {
        "lr": 1.0,
        "relative_step": False,
        "scale_parameter": False,
        "beta2_cap": 0.999,
        "beta1": 0.9,
        "momentum_kind": "normalized_update",
        "momentum_dtype": torch.bfloat16,
        "clip_threshold": None,
        "factor_dims": "largest2",
        "min_dim_size_to_factor": 16,
        "weight_decay_mode": "lr",
    },
}

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(values) for name, values in _PRESETS.items()}
)


def preset_defaults(preset: str | None) -> dict[str, Any]:
    """Return a copy of the keyword defaults a preset sets (empty for ``None``)."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ValueError(
            f"preset={preset!r} is not a known preset; choose one of {sorted(PRESETS)} or None"
        )
    return dict(PRESETS[preset])
