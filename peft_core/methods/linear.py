"""Linear probing: only the new classification head trains.

``norm='batchnorm'`` puts a BatchNorm without affine parameters in front of the
head, the linear-probing recipe of MAE (He et al., CVPR 2022, appendix A.1):
frozen features whose dimensions differ widely in offset and scale make a
plain head converge slowly under a short schedule, and per-dimension
standardisation fixes that without any trainable parameter (the statistics
are buffers). The reference codebase's linear probe is the plain head, the
default ``norm='none'``.

Mergeable: the backbone is untouched, and the normalisation folds into the
head (``W / sigma``, ``b - W mu / sigma``, running statistics), leaving a plain
timm model; 0 trainable backbone parameters either way.

Only the head trains, so its cells train on the frozen backbone's features
computed once per split (``train.feature_cache``, peft_core/features.py), with
the same result as training on the images.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* option norm='batchnorm' (MAE's linear-probing recipe: parameter-free BatchNorm before the head) is not in the reference; the default norm='none' is the reference's plain head
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ._common import classifier, freeze_all
from ._registry import HParams, register_method


class LinearHP(HParams):
    norm: Literal["none", "batchnorm"] = Field(
        "none", description="'batchnorm': standardise the frozen features before the head (MAE's recipe)"
    )


class StandardisedHead(nn.Module):
    """``fc(BatchNorm(x))`` with a parameter-free BatchNorm (running mean and variance only)."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.norm = nn.BatchNorm1d(fc.in_features, affine=False)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        inv = torch.rsqrt(self.norm.running_var + self.norm.eps)
        out = nn.Linear(self.fc.in_features, self.fc.out_features, bias=True).to(self.fc.weight)
        out.weight.copy_(self.fc.weight * inv)
        bias = self.fc.bias if self.fc.bias is not None else torch.zeros_like(out.bias)
        out.bias.copy_(bias - out.weight @ self.norm.running_mean)
        out.requires_grad_(self.fc.weight.requires_grad)
        return out


def _head_owner(model: nn.Module) -> tuple[nn.Module, str]:
    head = classifier(model)
    name = next(n for n, m in model.named_modules() if m is head)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return parent, name.rpartition(".")[2]


def apply(model: nn.Module, hp: LinearHP) -> nn.Module:
    freeze_all(model)
    if hp.norm == "batchnorm":
        parent, attr = _head_owner(model)
        fc = getattr(parent, attr)
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"linear norm='batchnorm' needs an nn.Linear head, got {type(fc).__name__}")
        setattr(parent, attr, StandardisedHead(fc))
    return model


def merge(model: nn.Module) -> nn.Module:
    parent, attr = _head_owner(model)
    head = getattr(parent, attr)
    if isinstance(head, StandardisedHead):
        setattr(parent, attr, head.folded())
    return model


METHOD = register_method(
    "linear",
    LinearHP,
    apply,
    merge,
    deviations=(
        "option norm='batchnorm' (MAE's linear-probing recipe: parameter-free BatchNorm before the head) "
        "is not in the reference; the default norm='none' is the reference's plain head",
    ),
    head_only=True,  # its cells train on cached frozen features (peft_core/features.py)
)
