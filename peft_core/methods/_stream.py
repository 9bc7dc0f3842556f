"""A timm ViT block with modules on its residual stream: the helper Adapter+ and Mona share.

Private helper of ``adapter_plus`` and ``mona``; it registers nothing. Where
``adapter`` / ``houlsby`` wrap ``block.attn`` or ``block.mlp`` (so the adapter
sits inside the residual branch), these methods act on the residual stream
itself, after a branch has been added back: ``x = x + branch(x); x = m(x)``.
No sub-module sees that sum, so :class:`StreamBlock` replaces the block. It
adopts the original block's children under their own names, so module paths
(``blocks.3.attn.qkv``) and the loaded pre-trained tensors stay as they were;
the new modules are two extra children, ``after_attn`` and ``after_mlp``.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ._targets import transformer_blocks


class StreamBlock(nn.Module):
    """``x = x + attn-branch(x); x = after_attn(x); x = x + mlp-branch(x); x = after_mlp(x)``.

    Either module may be ``None`` (the stream passes unchanged); each maps the
    stream to the new stream (it adds its own residual).
    """

    def __init__(self, block: nn.Module, after_attn: nn.Module | None, after_mlp: nn.Module | None):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.after_attn = after_attn
        self.after_mlp = after_mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            a = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        else:
            a = self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(a))
        if self.after_attn is not None:
            x = self.after_attn(x)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.after_mlp is not None:
            x = self.after_mlp(x)
        return x


def stream_blocks(model: nn.Module, method: str) -> nn.Sequential:
    """The model's blocks, each checked to be timm's pre-norm ``Block`` (whose forward StreamBlock repeats)."""
    blocks = transformer_blocks(model)
    if not len(blocks):
        raise TypeError(f"{type(model).__name__} has no transformer blocks")
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:  # ResPostBlock, ParallelScalingBlock, a wrapped block: other residual orders
            raise TypeError(f"{method}: blocks.{i} is a {type(blk).__name__}; it rewires timm's pre-norm Block only")
    return blocks


def patch_grid(model: nn.Module) -> tuple[tuple[int, int], int]:
    """``(patch grid, number of prefix tokens)`` of a timm ViT (class and register tokens come first)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise TypeError(f"{type(model).__name__} has no patch_embed.grid_size")
    return (int(grid[0]), int(grid[1])), int(getattr(model, "num_prefix_tokens", 1))


def grid_for(n_patches: int, grid: tuple[int, int], method: str) -> tuple[int, int]:
    """The model's grid, or a square one for another input size; anything else raises."""
    if n_patches == grid[0] * grid[1]:
        return grid
    side = math.isqrt(n_patches)
    if side * side == n_patches:
        return side, side
    raise ValueError(f"{method}: {n_patches} patch tokens do not fit the {grid} patch grid")
