"""Convpass (Jie & Deng, 2022): convolutional bypasses beside each block's attention and MLP.

Each bypass reads the same normalised input as its sub-layer and adds
``s * up(dropout(g(conv3x3(g(down(x))))))`` to its output (``g`` QuickGELU),
before the block's layer-scale and drop-path (the reference study's
``parallel`` mode with ``ln: after`` on both sub-layers). The patch tokens are
laid out on the model's patch grid for the 3x3 convolution; each prefix token
(class token and any register tokens, ``model.num_prefix_tokens`` of them)
is convolved as a 1x1 image, i.e. sees only the kernel's centre tap, as the
reference does for its single class token. The up-projection starts at zero
(the reference's ``lora_xavier`` default), so the model is unchanged at init;
the convolution starts at the identity or Xavier-uniform. On ViT-B/16 it
trains ``24 * (768 b + b + 9 b^2 + b + 768 b + 768)`` parameters.

Not mergeable: the QuickGELU nonlinearities around the convolution make the
bypass a nonlinear function of the tokens, so it can not be folded into the
frozen linear weights.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero; the 3x3 conv keeps its init; here they start at the intended init (cell init='reference' reproduces it)
* one drop-path mask for the sub-layer and its parallel bypass (reference: a separate mask for each branch)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._adapter import (
    ParallelAdapter,
    embed_dim,
    factory_kwargs,
    init_projections,
    vit_blocks,
)
from ._common import freeze_all
from ._registry import HParams, register_method


class ConvpassHP(HParams):
    bottleneck: int = Field(
        8, ge=1, description="channels of the bottleneck and its 3x3 conv (reference: convpass_bottleneck)"
    )
    scaler: float = Field(
        10.0, gt=0, description="fixed multiplier of the bypass output (reference: convpass_scaler)"
    )
    conv_init: Literal["identity", "xavier"] = Field(
        "identity",
        description="3x3 conv weight at init: 'identity' (centre tap = I, rest 0) or 'xavier' "
        "(reference: convpass_xavier_init False / True); its bias starts at 0",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the up-projection (reference: 0.1)")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """Down-project, 3x3 conv over the patch grid, up-project; prefix tokens use the centre tap."""

    def __init__(
        self,
        dim: int,
        hp: ConvpassHP,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        b = hp.bottleneck
        self.scale = hp.scaler
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.down = nn.Linear(dim, b, device=device, dtype=dtype)
        self.conv = nn.Conv2d(b, b, 3, padding=1, device=device, dtype=dtype)
        self.dropout = nn.Dropout(hp.dropout)
        self.up = nn.Linear(b, dim, device=device, dtype=dtype)
        init_projections(self.down, self.up, "lora_xavier")
        with torch.no_grad():
            if hp.conv_init == "xavier":
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                nn.init.zeros_(self.conv.weight)
                self.conv.weight[:, :, 1, 1].copy_(torch.eye(b, device=device, dtype=dtype))
            nn.init.zeros_(self.conv.bias)

    def _grid(self, n_patches: int) -> tuple[int, int]:
        if n_patches == self.grid[0] * self.grid[1]:
            return self.grid
        side = math.isqrt(n_patches)
        if side * side == n_patches:
            return side, side
        raise ValueError(f"convpass: {n_patches} patch tokens do not fit the {self.grid} patch grid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_batch, n_tok, _ = x.shape
        p = self.num_prefix_tokens
        h = quick_gelu(self.down(x))
        prefix, patches = h[:, :p], h[:, p:]
        height, width = self._grid(n_tok - p)
        patches = patches.transpose(1, 2).reshape(n_batch, -1, height, width)
        patches = self.conv(patches).flatten(2).transpose(1, 2)
        # a 3x3 conv (padding 1) on a 1x1 image is its centre tap
        prefix = F.linear(prefix, self.conv.weight[:, :, 1, 1], self.conv.bias)
        h = quick_gelu(torch.cat([prefix, patches], dim=1))
        return self.up(self.dropout(h)) * self.scale


def apply(model: nn.Module, hp: ConvpassHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise TypeError(f"{type(model).__name__} has no patch_embed.grid_size")
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    for block in vit_blocks(model):
        for part in ("attn", "mlp"):
            base = getattr(block, part)
            bypass = ConvBypass(dim, hp, grid, n_prefix, **factory_kwargs(base))
            setattr(block, part, ParallelAdapter(base, bypass))
    return model


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero; the 3x3 conv keeps its init; here they start at the intended init (cell init='reference' reproduces it)",
    'one drop-path mask for the sub-layer and its parallel bypass (reference: a separate mask for each branch)',
)

METHOD = register_method("convpass", ConvpassHP, apply, merge=None, deviations=DEVIATIONS)
