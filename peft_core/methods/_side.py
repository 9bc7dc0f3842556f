"""Side networks beside a frozen ViT: the machinery DTL, LAST and LST share.

The methods never edit timm's blocks. They swap ``model.blocks`` for a
:class:`SideBlocks`: an ``nn.Sequential`` holding the very same block
modules under the very same keys (``blocks.0``, ``blocks.1``, ...) plus one
extra child, ``blocks.side``, the method's trainable side network. Indexing,
iteration and ``len`` see the transformer blocks only, so
``transformer_blocks()``, timm's ``blocks[:n]`` and state-dict keys of the
backbone are unchanged. ``forward`` hands the blocks and the token sequence
to the side network, which runs the loop: it reads each block's input and
output and returns the tokens that go on to ``model.norm`` and the head.

timm's ``forward_features`` calls ``self.blocks(x)`` after ``patch_embed``,
``_pos_embed``, ``patch_drop`` and ``norm_pre``, so the side network sees
exactly what the first block sees (prefix tokens included). Only that
standard path runs the side network: gradient checkpointing
(``checkpoint_seq``) and ``forward_intermediates`` run the plain blocks, so
apply refuses a model with gradient checkpointing on.
"""

from __future__ import annotations

import torch
from torch import nn

from ._targets import transformer_blocks


class SideNetwork(nn.Module):
    """Base of a method's side network: ``forward(blocks, x)`` runs the frozen blocks and itself."""

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class SideBlocks(nn.Sequential):
    """The model's transformer blocks, unchanged and under the same keys, plus ``side``."""

    runs_side = True  # a model whose blocks already run a side network gets no second one

    def __init__(self, blocks: list[nn.Module], side: SideNetwork):
        super().__init__(*blocks)
        self.depth = len(blocks)
        self.side = side  # registered last, after "0" .. "depth-1"

    def __len__(self) -> int:
        return self.depth

    def __iter__(self):
        return (self._modules[str(i)] for i in range(self.depth))

    def __getitem__(self, idx):
        blocks = list(self)
        if isinstance(idx, slice):
            return nn.Sequential(*blocks[idx])
        return blocks[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.side(list(self), x)


def side_geometry(model: nn.Module) -> tuple[list[nn.Module], int, int]:
    """``(blocks, embed_dim, num_heads)`` of a timm ViT; refuses anything else."""
    blocks = transformer_blocks(model)
    if getattr(blocks, "runs_side", False) or getattr(blocks, "adds_tokens", False):
        raise ValueError(f"{type(model).__name__}.blocks is already wrapped ({type(blocks).__name__})")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("a side network does not survive timm's gradient checkpointing; switch it off")
    dim = getattr(model, "embed_dim", None)
    if not isinstance(dim, int) or not len(blocks):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (no embed_dim or no blocks)")
    attn = getattr(blocks[0], "attn", None)
    heads = getattr(attn, "num_heads", None)
    if not isinstance(heads, int):
        raise TypeError(f"{type(blocks[0]).__name__} has no attn.num_heads")
    return list(blocks), dim, heads


def install(model: nn.Module, blocks: list[nn.Module], side: SideNetwork) -> nn.Module:
    model.blocks = SideBlocks(blocks, side)
    return model


def like(model: nn.Module) -> dict:
    """Device and dtype of the backbone, for the side network's tensors."""
    p = next(transformer_blocks(model).parameters())
    return {"device": p.device, "dtype": p.dtype}
