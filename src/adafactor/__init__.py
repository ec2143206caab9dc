"""Adafactor for PyTorch: exact, fast, memory-light, and correct under sharding.

>>> import torch, adafactor
>>> opt = adafactor.Adafactor([torch.nn.Parameter(torch.zeros(3, 2))], preset="paper")
>>> sorted(adafactor.PRESETS)
['big_vision', 'keras', 'optax', 'paper', 't5', 'torch', 'transformers']
"""

from .factoring import FactorDims, factor_dims
from .optimizer import Adafactor, LRSchedule, StepStats
from .presets import PRESETS

__all__ = ["PRESETS", "Adafactor", "FactorDims", "LRSchedule", "StepStats", "factor_dims"]
__version__ = "0.1.0"
