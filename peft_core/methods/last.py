"""LAST (Tang et al., 2024): a side network of low-rank self-attention modules beside a frozen ViT.

Low-rank Attention Side-Tuning for Parameter-Efficient Fine-Tuning (Tang,
Fu, Zhu, Wu; arXiv 2402.04009). V-PEFT Bench lists LAST in its VTAB-1k and
FGVC tables, but its ``vision_transformer_LAST.py`` (and
``run_vit_LAST.sh``) is a copy of its VPT-shallow / adapter files with no
LAST code, and we found no code of the authors; this follows the paper.

One Low-rank Self-Attention (LSA) module per block: ``X' = LN(X)``,
``Q, K, V = X' A_Q, X' A_K, X' A_V`` (``d -> r`` each), multi-head
attention in the ``r``-dimensional space, then ``W_O`` (``r -> d``) back to
the token width. The backbone's outputs are frozen (nothing back-propagates
through a block) and the side state ``s`` starts at zero:
``s_i = s_{i-1} + LSA_i(x_{i-1} + s_{i-1})``, with ``x_{i-1}`` the frozen
input of block ``i``; the head reads ``x_L + s_L`` (through the backbone's
final norm and pooling). ``W_O`` starts at zero, so the model is unchanged
at initialisation.

Choices where the paper leaves details open (our reading, not its code):
the LSA's LayerNorm has no learnable affine, the four projections have no
bias, ``A_*`` are Kaiming-uniform (``nn.Linear``'s default) and ``heads``
heads split the ``r`` dimensions; the paper's "bias correction"
(``u_m - sum z_i``) is realised by keeping the side state as a residual on
the frozen stream, so the head sees the backbone's last output plus the
task-specific side state.

Count on ViT-B/16: ``12 * 4 * 768 * r = 36,864 r``. V-PEFT Bench gives
0.66M for LAST (VTAB-1k and FGVC alike, so the head is not counted): r = 18
gives 663,552, 0.66M, and is our default (tested; r = 16 would be 0.59M).

Not mergeable: the side network's attention is a nonlinear function of the
tokens and exists beside, not inside, the frozen weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._side import SideNetwork, install, like, side_geometry


class LASTHP(HParams):
    rank: int = Field(18, ge=1, description="width r of the low-rank Q/K/V space (18 matches V-PEFT Bench's 0.66M)")
    heads: int = Field(1, ge=1, description="attention heads splitting the r dimensions (must divide rank)")
    scale: float = Field(1.0, gt=0, description="multiplier of each LSA output added to the side state")

    @model_validator(mode="after")
    def _heads_divide_rank(self) -> "LASTHP":
        if self.rank % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide rank {self.rank}")
        return self


class LowRankAttentionSide(SideNetwork):
    """``s += scale * W_O MHA(LN(x + s) A_Q, LN(x + s) A_K, LN(x + s) A_V)`` beside every block."""

    def __init__(self, depth: int, dim: int, hp: LASTHP, kw: dict):
        super().__init__()
        self.heads = hp.heads
        self.scale = hp.scale
        self.qkv = nn.Parameter(torch.empty(depth, 3 * hp.rank, dim, **kw))
        self.out = nn.Parameter(torch.zeros(depth, dim, hp.rank, **kw))
        for i in range(depth):
            for part in self.qkv[i].detach().chunk(3):
                nn.init.kaiming_uniform_(part, a=math.sqrt(5))

    def lsa(self, i: int, u: torch.Tensor) -> torch.Tensor:
        b, n, d = u.shape
        h = self.heads
        q, k, v = (F.layer_norm(u, (d,)) @ self.qkv[i].T).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, h, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.scale * (o @ self.out[i].T)

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(x)
        for i, block in enumerate(blocks):
            s = s + self.lsa(i, x + s)
            with torch.no_grad():  # the backbone is a frozen feature extractor: no graph through it
                x = block(x)
        return x + s

    def extra_repr(self) -> str:
        return f"rank={self.out.shape[-1]}, heads={self.heads}, scale={self.scale}"


def apply(model: nn.Module, hp: LASTHP) -> nn.Module:
    freeze_all(model)
    blocks, dim, _ = side_geometry(model)
    return install(model, blocks, LowRankAttentionSide(len(blocks), dim, hp, like(model)))


METHOD = register_method("last", LASTHP, apply, merge=None)
