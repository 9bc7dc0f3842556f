"""Mona (Yin et al., CVPR 2025): multi-cognitive visual adapters after attention and after the MLP.

"5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual
Recognition Tasks" (Yin, Hu, et al., CVPR 2025, arXiv 2408.08345); official
repository Leiyi-Hu/mona
(``Swin-Transformer-Classification/mmcls/models/backbones/swin_transformer_mona.py``:
``Mona``, ``MonaOp``, ``SwinTransformerBlock.forward``).

In every block the residual stream passes a Mona layer twice: after the
attention residual and after the MLP residual (the official
``my_module_1`` / ``my_module_2``). One Mona layer maps the stream ``x`` to
``x + up(dropout(GELU(op(down(s1 ⊙ LN(x) + s2 ⊙ x)))))``: a trainable
LayerNorm scaled per channel by ``s1`` (``gamma``, init 1e-6) beside the raw
input scaled by ``s2`` (``gammax``, init 1); ``down`` d -> 64, ``up`` 64 -> d
(the official width is a constant 64 for every stage, field ``bottleneck``);
``op`` on the patch grid: ``z = (dw3x3(h) + dw5x5(h) + dw7x7(h)) / 3 + h``,
then ``z + conv1x1(z)`` (depthwise convolutions, padding k // 2, a full 1x1
projector); dropout 0.1.

**ViT adaptation (ours; Mona was built for Swin, whose tokens are all patches).**
The patch tokens are laid out on the model's patch grid for ``op``; each
prefix token (class token, register tokens: ``model.num_prefix_tokens``) goes
through ``op`` as a 1x1 image, so each depthwise filter reduces to its centre
tap (as Convpass here treats them) and the 1x1 projector applies as usual; no
filter mixes prefix and patch tokens. Not the alternative of letting prefix
tokens skip ``op`` (its identity path): with a class-token head, the last
block's filters would then get exactly zero gradient (after the last
attention nothing carries patch tokens to the class token), a dead tensor the
contract test catches. The Swin block's window attention is the ViT's global
attention here; everything else is as above.

**Initialisation as in the official code, so not the identity at init**: the
official backbone's ``init_weights`` applies trunc-normal(std 0.02), bias 0, to
every ``nn.Linear``, Mona's projections included; the convolutions keep
PyTorch's default (Kaiming-uniform) init; LayerNorm weight 1, bias 0. With a
random up-projection a Mona layer changes the stream from the start (by little:
``s1`` = 1e-6). ``init: zero`` (ours) zeroes the up-projection instead, which
makes the model the identity at init.

Count on ViT-B/16 (d = 768, m = bottleneck): one layer has ``2 d m + d + m``
(projections) + ``83 m + 3 m`` (depthwise 3/5/7) + ``m^2 + m`` (1x1) + ``2 d``
(LayerNorm) + ``2 d`` (s1, s2) = ``2 d m + m^2 + 88 m + 5 d``; 24 layers
(2 per block): m = 64 gives 24 * 111,872 = **2,684,928** (2.68M, 3.1% of the
backbone). The paper reports Mona on Swin only (no ViT-B/16 figure to compare).

Not mergeable: the GELU and the LayerNorm make the adapter a nonlinear
function of the features, so it can not be folded into the frozen linear weights.

Deviations from the official code (``METHOD.deviations``, docs/deviations.md):

* applied to a ViT (official: Swin): patch tokens on the patch grid for the depthwise convolutions; each prefix (class, register) token passes them as a 1x1 image (centre taps only), never mixed with patch tokens
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._adapter import embed_dim, factory_kwargs
from ._common import freeze_all
from ._registry import HParams, register_method
from ._stream import StreamBlock, grid_for, patch_grid, stream_blocks

KERNELS = (3, 5, 7)  # the official MonaOp's depthwise filters


class MonaHP(HParams):
    bottleneck: int = Field(64, ge=1, description="width of the down-projection and the filters (official: 64, fixed)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after the GELU (official: 0.1)")
    init: Literal["official", "zero"] = Field(
        "official",
        description="'official': projections trunc-normal std 0.02, zero biases, convs PyTorch default (not identity "
        "at init); 'zero': the up-projection zero as well (identity at init)",
    )


class MonaOp(nn.Module):
    """``z = mean(dw3x3, dw5x5, dw7x7)(h) + h``, then ``z + conv1x1(z)``, on ``(B, m, H, W)``."""

    def __init__(self, channels: int, **kw):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, **kw) for k in KERNELS
        )
        self.projector = nn.Conv2d(channels, channels, 1, **kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = sum(conv(h) for conv in self.convs) / len(self.convs) + h
        return z + self.projector(z)

    def tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The same op on tokens ``(..., m)`` taken as 1x1 images: each filter reduces to its centre tap."""
        taps = [conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] for conv in self.convs]
        z = sum(h * w + conv.bias for w, conv in zip(taps, self.convs)) / len(self.convs) + h
        return z + F.linear(z, self.projector.weight[:, :, 0, 0], self.projector.bias)


class Mona(nn.Module):
    """One Mona layer on the residual stream: ``x + up(dropout(gelu(op(down(s1 ⊙ LN(x) + s2 ⊙ x)))))``."""

    def __init__(self, dim: int, hp: MonaHP, grid: tuple[int, int], num_prefix_tokens: int, **kw):
        super().__init__()
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim, **kw)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6, **kw))  # s1, scales the normalised input
        self.gammax = nn.Parameter(torch.ones(dim, **kw))  # s2, scales the raw input
        self.down = nn.Linear(dim, hp.bottleneck, **kw)
        self.op = MonaOp(hp.bottleneck, **kw)
        self.dropout = nn.Dropout(hp.dropout)
        self.up = nn.Linear(hp.bottleneck, dim, **kw)
        with torch.no_grad():
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            if hp.init == "zero":
                nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_batch, n_tok, _ = x.shape
        p = self.num_prefix_tokens
        h = self.down(self.norm(x) * self.gamma + x * self.gammax)
        height, width = grid_for(n_tok - p, self.grid, "mona")
        patches = h[:, p:].transpose(1, 2).reshape(n_batch, -1, height, width)
        patches = self.op(patches).flatten(2).transpose(1, 2)
        h = torch.cat([self.op.tokens(h[:, :p]), patches], dim=1)  # prefix tokens: 1x1 images
        return x + self.up(self.dropout(F.gelu(h)))


def apply(model: nn.Module, hp: MonaHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    grid, n_prefix = patch_grid(model)
    blocks = stream_blocks(model, "mona")
    for i, block in enumerate(blocks):
        kw = factory_kwargs(block)
        blocks[i] = StreamBlock(block, Mona(dim, hp, grid, n_prefix, **kw), Mona(dim, hp, grid, n_prefix, **kw))
    return model


DEVIATIONS = (
    "applied to a ViT (official: Swin): patch tokens on the patch grid for the depthwise convolutions; each prefix (class, register) token passes them as a 1x1 image (centre taps only), never mixed with patch tokens",
)

METHOD = register_method("mona", MonaHP, apply, merge=None, deviations=DEVIATIONS)
