"""Token-path machinery shared by the prompt methods (VPT-shallow, VPT-deep, VQT).

The methods never edit timm's blocks. They swap ``model.blocks`` for a
:class:`TokenBlocks`: an ``nn.Sequential`` that holds the very same block
modules under the very same keys (``blocks.0``, ``blocks.1``, ...), so state
dicts, ``transformer_blocks()`` and ``len(model.blocks)`` are unchanged, and
whose ``forward`` adds its learnable tokens around each block call. timm's
``forward_features`` calls ``self.blocks(x)`` after ``patch_embed``,
``_pos_embed``, ``patch_drop`` and ``norm_pre``, so extra tokens enter after
CLIP's pre-norm, exactly where the reference study inserts them, and they are
gone again before ``model.norm`` and the pooling.

Only the standard path (``model(x)``, ``forward_features``, ``forward_head``)
sees the tokens: gradient checkpointing (``checkpoint_seq`` iterates the
blocks itself) and ``forward_intermediates`` run the plain blocks, so apply
refuses a model that has gradient checkpointing switched on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._targets import transformer_blocks


def vit_geometry(model: nn.Module) -> tuple[nn.Sequential, int, int]:
    """``(blocks, embed_dim, num_prefix_tokens)`` of a timm ViT; refuses anything else."""
    blocks = transformer_blocks(model)
    if getattr(blocks, "adds_tokens", False):
        raise ValueError(f"{type(model).__name__} already carries prompt tokens ({type(blocks).__name__})")
    for attr in ("embed_dim", "num_prefix_tokens", "patch_embed"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (no .{attr})")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("prompt tokens do not survive timm's gradient checkpointing; switch it off")
    return blocks, int(model.embed_dim), int(model.num_prefix_tokens)


def prompt_init_range(model: nn.Module) -> float:
    """Half-width of VPT's uniform ("xavier") init: ``sqrt(6 / (3 * patch_area + dim))``.

    The fan-in of a flattened RGB patch plus the fan-out of the embedding, as
    in VPT (Jia et al., 2022) and the reference study's ``model/vpt.py``.
    """
    size = model.patch_embed.patch_size
    area = math.prod(size) if isinstance(size, (tuple, list)) else int(size) ** 2
    return math.sqrt(6.0 / float(3 * area + model.embed_dim))


def new_tokens(model: nn.Module, sets: int, count: int) -> nn.Parameter:
    """``sets`` groups of ``count`` learnable tokens, uniform in +-:func:`prompt_init_range`."""
    ref = next(transformer_blocks(model).parameters())
    tokens = torch.empty(sets, count, model.embed_dim, device=ref.device, dtype=ref.dtype)
    bound = prompt_init_range(model)
    nn.init.uniform_(tokens, -bound, bound)
    return nn.Parameter(tokens)


class TokenBlocks(nn.Sequential):
    """The model's transformer blocks, unchanged and under the same keys, plus extra tokens.

    Subclasses own their tokens as parameters (never as child modules: a
    ``Sequential`` runs every child) and define ``forward``.
    """

    adds_tokens = True  # a model whose blocks already add tokens gets no second set

    def __init__(self, blocks: Iterable[nn.Module], num_prefix_tokens: int, dropout: float):
        super().__init__(*blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.token_dropout = dropout

    def __getitem__(self, idx):
        # a slice of the blocks is plain blocks (timm's stop_early / pruning paths)
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def expand(self, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """One group of tokens for the whole batch, after (training-time) token dropout."""
        tokens = F.dropout(tokens, self.token_dropout, self.training)
        return tokens.unsqueeze(0).expand(batch, -1, -1)

    def insert(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[prefix, tokens, patches]``: the tokens go right after cls / register tokens."""
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], self.expand(tokens, x.shape[0]), x[:, p:]], dim=1)

    def remove(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """Drop the ``count`` tokens that :meth:`insert` placed after the prefix."""
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], x[:, p + count :]], dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, token_dropout={self.token_dropout}"


class PromptedBlocks(TokenBlocks):
    """VPT: ``prompts[k]`` enters before block ``first + k`` and travels on with the tokens.

    A later prompt set replaces the outputs of the previous one at the same
    positions (VPT-deep); with a single set at block 0 the prompts pass through
    every block (VPT-shallow). All prompts leave after the last block.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        num_prefix_tokens: int,
        dropout: float,
        prompts: nn.Parameter,
        first: int,
    ):
        super().__init__(blocks, num_prefix_tokens, dropout)
        if not 0 <= first < len(self) or first + prompts.shape[0] > len(self):
            raise ValueError(f"{prompts.shape[0]} prompt sets from block {first} exceed {len(self)} blocks")
        self.prompts = prompts
        self.first = first

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_prompts
        carrying = False
        for i, block in enumerate(self):
            k = i - self.first
            if 0 <= k < self.prompts.shape[0]:
                if carrying:
                    x = self.remove(x, n)
                x = self.insert(x, self.prompts[k])
                carrying = True
            x = block(x)
        return self.remove(x, n) if carrying else x

    def extra_repr(self) -> str:
        sets, n, _ = self.prompts.shape
        return f"{super().extra_repr()}, prompt_sets={sets}, num_prompts={n}, first={self.first}"
