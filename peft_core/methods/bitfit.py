"""BitFit (Ben Zaken et al., 2022): train every bias term, nothing else.

Biases of every module (linear, conv patch embedding, LayerNorm) are selected
by their exact parameter name ``bias`` on the owning module, never by a
substring of the full path. Mergeable trivially.
"""

from __future__ import annotations

from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method


class BitFitHP(HParams):
    """BitFit has no hyper-parameters of its own."""


def apply(model: nn.Module, hp: BitFitHP) -> nn.Module:
    freeze_all(model)
    for module in model.modules():
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = register_method("bitfit", BitFitHP, apply, merge)
