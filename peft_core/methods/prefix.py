"""Prefix tuning (Li & Liang, 2021): learnable keys and values prepended in every attention layer.

Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang,
ACL 2021, arXiv 2101.00190). V-PEFT Bench reports it on FGVC only (0.36M),
with no code in its repository; its FGVC Prefix-Tuning and U-Tuning rows
come from the U-Tuning paper (Jiang et al., arXiv 2303.00690).

In every block's attention, ``length`` learnable key vectors and as many
value vectors are concatenated in front of the keys and values the frozen
``attn.qkv`` computes from the tokens (after timm's optional ``k_norm``
sees them with the other keys); the queries are the tokens' own, so the
sequence length, the pooling and the head are unchanged. The prefixes are
free parameters (trunc-normal, std 0.02): Li & Liang's training-time MLP
re-parameterisation is a device for stabilising language-model training
and leaves the trained model a set of key/value vectors, which is what is
trained here directly (our choice). Not identity at initialisation: the
queries attend to the prefixes from the first step.

Count on ViT-B/16: ``12 * 2 * length * 768 = 18,432 length``; length 10:
184,320. V-PEFT Bench's FGVC table gives 0.36M: 184,320 plus the mean FGVC
head (769 * 1173 / 5 = 180,407, weight + bias over CUB, NABirds, Flowers,
Dogs, Cars) is 364,727, 0.36M, so we read the table's number as counting the
head (as its U-Tuning source's other rows appear to) and match it at
length 10, head included (tested). Without the head, length 20 (368,640)
would give 0.37M, not 0.36M.

Not mergeable: extra keys and values change every attention's softmax, which
no edit of the frozen weights reproduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import trunc_normal_
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import transformer_blocks


class PrefixHP(HParams):
    length: int = Field(10, ge=1, description="number of prefix key/value vectors per attention layer")


class PrefixAttention(nn.Module):
    """timm's ``Attention`` forward with ``prefix_k`` / ``prefix_v`` prepended to the keys and values."""

    def __init__(self, base: nn.Module, length: int):
        super().__init__()
        for attr in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"):
            if not hasattr(base, attr):
                raise TypeError(f"{type(base).__name__} is not a timm Attention (no .{attr})")
        self.base = base
        kw = {"device": base.qkv.weight.device, "dtype": base.qkv.weight.dtype}
        width = base.num_heads * base.head_dim
        self.prefix_k = nn.Parameter(torch.empty(length, width, **kw))
        self.prefix_v = nn.Parameter(torch.empty(length, width, **kw))
        trunc_normal_(self.prefix_k, std=0.02)
        trunc_normal_(self.prefix_v, std=0.02)

    def _heads(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        b = self.base
        return t.reshape(1, -1, b.num_heads, b.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("prefix tuning does not support attention masks")
        b = self.base
        B, N, _ = x.shape
        gate = b.gate(x).sigmoid() if getattr(b, "gate", None) is not None else None
        q, k, v = b.qkv(x).reshape(B, N, 3, b.num_heads, b.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([self._heads(self.prefix_k, B), k], dim=2)
        v = torch.cat([self._heads(self.prefix_v, B), v], dim=2)
        q, k = b.q_norm(q), b.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=b.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = b.norm(x) if hasattr(b, "norm") else x
        if gate is not None:
            x = x * gate
        return b.proj_drop(b.proj(x))


def apply(model: nn.Module, hp: PrefixHP) -> nn.Module:
    freeze_all(model)
    for block in transformer_blocks(model):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.Module):
            raise TypeError(f"{type(block).__name__} has no attn sub-module")
        block.attn = PrefixAttention(attn, hp.length)
    return model


METHOD = register_method("prefix", PrefixHP, apply, merge=None)
