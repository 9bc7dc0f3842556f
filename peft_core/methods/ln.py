"""LayerNorm tuning: train the weight and bias of every LayerNorm, nothing else.

LayerNorms are selected by module type (``nn.LayerNorm``, which timm's own
``LayerNorm`` subclasses), wherever they sit: ``blocks.i.norm1/norm2``, the
final ``norm`` or ``fc_norm``, CLIP's ``norm_pre``, a patch-embedding norm.
On ViT-B/16 that is 25 LayerNorms x 2 x 768 = 38,400 parameters. The
reference study selects them by the substring ``norm`` in the parameter name,
which on a timm ViT picks the same tensors. Mergeable trivially: only native
timm tensors change.
"""

from __future__ import annotations

from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method


class LNHP(HParams):
    """LayerNorm tuning has no hyper-parameters of its own."""


def apply(model: nn.Module, hp: LNHP) -> nn.Module:
    freeze_all(model)
    found = False
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            found = True
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    if not found:
        raise TypeError(f"{type(model).__name__} has no nn.LayerNorm to tune")
    return model


def merge(model: nn.Module) -> nn.Module:
    return model


METHOD = register_method("ln", LNHP, apply, merge)
