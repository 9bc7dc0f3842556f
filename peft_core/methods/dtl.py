"""DTL (Fu et al., AAAI 2024): a compact rank-r side network whose output re-enters the later blocks.

DTL: Disentangled Transfer Learning for Visual Recognition (Fu, Zhu, Wu;
arXiv 2312.07856); source repository heekhero/DTL
(``models/vision_transformer.py``, ``train_scripts/vit/vtab/*/train_dtl.sh``).
V-PEFT Bench lists DTL in its VTAB-1k table, but its
``vision_transformer_dtl.py`` is a copy of its VPT-shallow file, so the
authors' repository is the reference here.

The Compact Side Network (CSN) is one low-rank map ``B_i A_i`` (``A_i``:
``d -> r``, Kaiming-uniform; ``B_i``: ``r -> d``, zero; no biases) per block.
It reads each block's input ``x_{i-1}`` and accumulates
``h_i = h_{i-1} + B_i A_i x_{i-1}``; from block ``add_from`` on, each
block's output gets ``swish_beta(h_i) = h_i * sigmoid(beta * h_i)`` added:
``x_i = block_i(x_{i-1}) + swish_beta(h_i)``. Before block ``add_from`` the
backbone is untouched, so no gradient runs through those blocks (the
"disentangling"). ``B`` starts at zero, so the model is unchanged at
initialisation. The authors' ViT VTAB-1k runs all use r = 2, beta = 100,
CSN on blocks 0-11 and adding after blocks 6-11 (``add_from=None`` picks the
second half of the blocks: 6 of 12). DTL+ (the depth-wise 3x3 fusion conv,
``fusion_size > 0``) is not included: the ViT VTAB-1k scripts run with
``fusion_size 0``.

Count on ViT-B/16: ``12 * 2 * 768 * r = 18,432 r``; r = 2: 36,864, the 0.04M
of V-PEFT Bench's VTAB-1k table (tested at r = 2, head excluded).

Not mergeable: the swish of the accumulated side state is nonlinear and
reaches several blocks, so no weight edit of the plain backbone reproduces it.

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* the head reads the backbone's own pooling (cls token for ViT-B/16); the authors' ViT averages the patch tokens before the final norm
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._side import SideNetwork, install, like, side_geometry


class DTLHP(HParams):
    rank: int = Field(2, ge=1, description="rank r of each block's map B A (authors' `--r`; 2 in all ViT runs)")
    beta: float = Field(100.0, gt=0, description="beta of the swish on the side state (authors' `--beta`)")
    add_from: int | None = Field(
        None,
        ge=0,
        description="first block whose output gets the side state (authors' `--add_after_blocks 6-11`); None = depth // 2",
    )


class CompactSideNetwork(SideNetwork):
    """``h += B_i A_i x`` before every block; ``x += swish(h)`` after blocks ``first`` onwards."""

    def __init__(self, depth: int, dim: int, hp: DTLHP, first: int, kw: dict):
        super().__init__()
        self.beta = hp.beta
        self.first = first
        self.a = nn.Parameter(torch.empty(depth, hp.rank, dim, **kw))
        self.b = nn.Parameter(torch.zeros(depth, dim, hp.rank, **kw))
        for a in self.a:  # each A_i as nn.Linear's default weight (the authors' LoRALinear)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        h = None
        for i, block in enumerate(blocks):
            step = (x @ self.a[i].T) @ self.b[i].T
            h = step if h is None else h + step
            x = block(x)
            if i >= self.first:
                x = x + h * torch.sigmoid(self.beta * h)
        return x

    def extra_repr(self) -> str:
        return f"rank={self.a.shape[1]}, beta={self.beta}, first={self.first}"


def apply(model: nn.Module, hp: DTLHP) -> nn.Module:
    freeze_all(model)
    blocks, dim, _ = side_geometry(model)
    depth = len(blocks)
    first = depth // 2 if hp.add_from is None else hp.add_from
    if first >= depth:
        raise ValueError(f"add_from: {first} is not a block of {type(model).__name__} ({depth} blocks)")
    return install(model, blocks, CompactSideNetwork(depth, dim, hp, first, like(model)))


DEVIATIONS = (
    "the head reads the backbone's own pooling (cls token for ViT-B/16); the authors' ViT averages the patch tokens before the final norm",
)

METHOD = register_method("dtl", DTLHP, apply, merge=None, deviations=DEVIATIONS)
