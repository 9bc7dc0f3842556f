"""SNF (Wang et al., CVPR 2023): each residual shortcut x becomes a small normalizing flow NF(x).

Adapting Shortcut With Normalizing Flow: An Efficient Tuning Framework for
Visual Recognition (Wang, Shi, Zhang, Li, Liu, Dai, Li, Xiong, Tian; CVPR
2023); source repository Wang-Yaoming/SNF (``snf.py``: ``set_snf``,
``forward_flow_block``; ``flow.py``: ``NormalizingFlow``). V-PEFT Bench
(arXiv 2402.02242) lists SNF in its VTAB-1k and FGVC tables (0.25M) and ships
no SNF code, so the authors' repository is the reference here.

Every block's two residual additions keep their frozen branch and replace the
identity shortcut by a flow:
``x = NF_1(x) + drop_path1(ls1(attn(norm1(x))))``, then
``x = NF_2(x) + drop_path2(ls2(mlp(norm2(x))))``. Each ``NF`` (the authors'
``NormalizingFlow``) is an element-wise affine map ``z = mu + exp(log_sigma) x``
(``mu``, ``log_sigma`` zero) followed by ``L`` planar flows
``z <- z + u tanh(w . z + b)`` (``w``, ``u`` in R^d, ``b`` scalar; all
uniform in [-0.01, 0.01], as in ``PlanarFlow.reset_parameters``). The
authors' ViT forward discards the flows' log-det-Jacobians, so they are not
computed here (same function). The planar flows start slightly away from the
identity (their random ``u``), as in the reference; with ``flow_length = 0``
the model is exactly unchanged at initialisation.

The flows run through the shared side-network machinery (``_side.py``): the
timm blocks stay where they are, under their own keys, and
``blocks.side`` holds the flows and runs each block's two residual lines
with the flow on the shortcut (timm's ``Block`` only, selected by type; its
forward is not patched).

Count on ViT-B/16 (d = 768, 12 blocks, 2 flows each):
``24 * (2 d + L (2 d + 1)) = 36,864 + 36,888 L``. ``L = 0`` gives 36,864, the
paper abstract's "0.036M"; the authors' ``set_snf`` default ``L = 16`` gives
627,072. V-PEFT Bench's 0.25M (the same in its VTAB-1k and FGVC tables, so
no head is counted) is met by no integer ``L`` (L = 5: 221,304, 0.22M;
L = 6: 258,192, 0.26M); it is presumably an average over per-data-set flow
lengths, which were not published. The default is the code's ``L = 16``; the
count is tested against the formula, not the table, and the published
accuracies are not mapped to this method.

Not mergeable: the planar flows are nonlinear.
"""

from __future__ import annotations

import torch
from pydantic import Field
from timm.models.vision_transformer import Block
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._side import SideNetwork, install, like, side_geometry


class SNFHP(HParams):
    flow_length: int = Field(16, ge=0, description="planar flows after the affine map in each shortcut flow (authors' `flow_length`, default 16)")


class ShortcutFlow(nn.Module):
    """``mu + exp(log_sigma) x`` then ``L`` planar flows ``z + u tanh(w . z + b)`` (the authors' NormalizingFlow)."""

    def __init__(self, dim: int, length: int, kw: dict):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim, **kw))
        self.log_sigma = nn.Parameter(torch.zeros(dim, **kw))
        self.w = nn.Parameter(torch.empty(length, dim, **kw).uniform_(-0.01, 0.01))
        self.u = nn.Parameter(torch.empty(length, dim, **kw).uniform_(-0.01, 0.01))
        self.b = nn.Parameter(torch.empty(length, **kw).uniform_(-0.01, 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mu + self.log_sigma.exp() * x
        for w, u, b in zip(self.w, self.u, self.b):
            z = z + u * torch.tanh(z @ w + b).unsqueeze(-1)
        return z


class ShortcutFlows(SideNetwork):
    """Two :class:`ShortcutFlow` per block, on the attention and the MLP shortcut."""

    def __init__(self, depth: int, dim: int, hp: SNFHP, kw: dict):
        super().__init__()
        self.attn_flows = nn.ModuleList(ShortcutFlow(dim, hp.flow_length, kw) for _ in range(depth))
        self.mlp_flows = nn.ModuleList(ShortcutFlow(dim, hp.flow_length, kw) for _ in range(depth))

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for blk, f1, f2 in zip(blocks, self.attn_flows, self.mlp_flows):
            x = f1(x) + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            x = f2(x) + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x


def apply(model: nn.Module, hp: SNFHP) -> nn.Module:
    freeze_all(model)
    blocks, dim, _ = side_geometry(model)
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:  # ResPostBlock, ParallelScalingBlock, ... order their residuals differently
            raise TypeError(f"blocks.{i} is a {type(blk).__name__}; SNF rewires timm's pre-norm Block only")
    return install(model, blocks, ShortcutFlows(len(blocks), dim, hp, like(model)))


METHOD = register_method("snf", SNFHP, apply, merge=None)
