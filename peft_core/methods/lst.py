"""LST (Sung et al., NeurIPS 2022): a narrow transformer side network fed by gated "ladder" connections.

LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning
(Sung, Cho, Bansal; arXiv 2206.06522; code ylsung/Ladder-Side-Tuning is for
T5/CLIP text models). V-PEFT Bench reports it on VTAB-1k (2.38M) without code;
this follows the paper, transposed to a timm ViT.

The side network is a copy of the backbone's block structure at width
``w = d / reduction`` (timm ``Block``: pre-norm attention with the
backbone's number of heads and an MLP of ratio 4, qkv bias). A linear
down-sampler ``d -> w`` maps the backbone's tokens into it at every rung:
``h_0 = down_0(x_0)`` (the first block's input), then after each frozen
block ``i`` (output ``x_i``) the side block ``i`` reads a gated mix,
``h_i = side_i(mu_i down_i(x_i) + (1 - mu_i) h_{i-1})`` with
``mu_i = sigmoid(alpha_i / T)``, ``alpha_i`` starting at 0 and ``T = 0.1``
(the paper's values). The last side state is up-sampled (``w -> d``) and
replaces the token features that go to the backbone's final norm, pooling
and head. No gradient runs through the backbone (its blocks run without a
graph), which is LST's memory saving.

Choices where the paper is specific to T5 or leaves details open (ours):
side blocks start from timm's random ``nn.Linear`` init rather than the
paper's magnitude-pruned copy of the backbone weights; the up-sampler is an
``nn.Linear`` with bias; prefix tokens (cls, registers) travel through the
side network like patch tokens. Not identity at initialisation: the head
reads the side network from the first step.

Count on ViT-B/16 (d = 768, 12 blocks, w = 96 at the paper's reduction 8):
down-samplers ``13 (768 w + w)``, side blocks ``12 (12 w^2 + 13 w)``, gates
12, up-sampler ``w 768 + 768``: 959,712 + 1,342,080 + 12 + 74,496 =
2,376,300, the 2.38M of V-PEFT Bench's VTAB-1k table (tested, head excluded).

Not mergeable: a separate network beside the backbone.
"""

from __future__ import annotations

import torch
from pydantic import Field
from timm.models.vision_transformer import Block
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._side import SideNetwork, install, like, side_geometry


class LSTHP(HParams):
    reduction: int = Field(8, ge=1, description="side width = embed_dim / reduction (paper: 8)")
    temperature: float = Field(0.1, gt=0, description="T of the ladder gates sigmoid(alpha / T) (paper: 0.1)")


class LadderSide(SideNetwork):
    """Down-samplers, gates, narrow timm blocks and the up-sampler of LST."""

    def __init__(self, depth: int, dim: int, heads: int, hp: LSTHP, kw: dict):
        super().__init__()
        width = dim // hp.reduction
        if dim % hp.reduction or width % heads:
            raise ValueError(
                f"reduction: {hp.reduction} gives side width {dim}/{hp.reduction}, "
                f"which must be an integer divisible by the {heads} heads"
            )
        self.temperature = hp.temperature
        self.downs = nn.ModuleList(nn.Linear(dim, width, **kw) for _ in range(depth + 1))
        self.side_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True).to(**kw) for _ in range(depth)
        )
        self.gates = nn.Parameter(torch.zeros(depth, **kw))
        self.up = nn.Linear(width, dim, **kw)

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        h = self.downs[0](x)
        mu = torch.sigmoid(self.gates / self.temperature)
        for i, block in enumerate(blocks):
            with torch.no_grad():  # the backbone is frozen and never back-propagated through
                x = block(x)
            h = self.side_blocks[i](mu[i] * self.downs[i + 1](x) + (1 - mu[i]) * h)
        return self.up(h)


def apply(model: nn.Module, hp: LSTHP) -> nn.Module:
    freeze_all(model)
    blocks, dim, heads = side_geometry(model)
    return install(model, blocks, LadderSide(len(blocks), dim, heads, hp, like(model)))


METHOD = register_method("lst", LSTHP, apply, merge=None)
