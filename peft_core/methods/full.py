"""Full fine-tuning: every backbone parameter trains.

Mergeable trivially: the fine-tuned model is a plain timm model.
"""

from __future__ import annotations

from torch import nn

from ._registry import HParams, register_method


class FullHP(HParams):
    """Full fine-tuning has no hyper-parameters of its own (lr / wd are the study's)."""


def apply(model: nn.Module, hp: FullHP) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = register_method("full", FullHP, apply, merge)
