"""Linear probing: only the new classification head trains.

Mergeable trivially (the backbone is untouched); 0 trainable backbone parameters.
"""

from __future__ import annotations

from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method


class LinearHP(HParams):
    """Linear probing has no hyper-parameters of its own."""


def apply(model: nn.Module, hp: LinearHP) -> nn.Module:
    freeze_all(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = register_method("linear", LinearHP, apply, merge)
