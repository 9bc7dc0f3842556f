"""FacT-TK (Jie & Deng, 2023): Tucker-factorised weight increments shared across layers.

All ``12 L`` d x d slices of the blocks' ``attn.qkv`` (3), ``attn.proj`` (1),
``mlp.fc1`` (4) and ``mlp.fc2`` (4) increments form one tensor factorised as
``s * C x_1 V x_2 U x_3 P``: slice ``m`` is ``s * V (C x_3 P[:, m]) U`` with a
shared core ``C`` (r x r x r), shared ``U`` (r x d), ``V`` (d x r) and
``P`` (r x 12 L). On ViT-B/16 that is ``1536 r + 144 r + r^3`` parameters.
``V`` starts at zero (identity at init). Mergeable: each layer's increment is
folded into its timm linear.
"""

from __future__ import annotations

from torch import nn

from ._fact import FacTHP, TuckerFactors, apply_fact, merge_fact
from ._registry import register_method


class FacTTKHP(FacTHP):
    """FacT-TK hyper-parameters (reference grid: rank {16, 32, 64} x scale {0.01 .. 100})."""


def apply(model: nn.Module, hp: FacTTKHP) -> nn.Module:
    return apply_fact(model, hp, TuckerFactors)


def merge(model: nn.Module) -> nn.Module:
    return merge_fact(model)


METHOD = register_method("fact_tk", FacTTKHP, apply, merge)
