"""SCT (Zhao et al., IJCV 2023): tune a K x K linear on each block's K most salient channels.

SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient
Channels (Zhao, Wang, Zhao, Luo, Wang, Shou; arXiv 2309.08513, IJCV 2023);
source repository zhaohengyuan1/SCT (``train_model_sct.py``,
``getSalientChannels``), also V-PEFT Bench's
``ImageClassification/models/vision_transformer_sct.py``.

**Prestep (data-dependent, cached, on the cell's training split only).** The
frozen pre-trained backbone reads the training images; at every block the
residual stream after the attention branch (the input of ``norm2``; patch
tokens only) gives, for each class ``c`` present, the L2 norm per channel
over all of that class's tokens, ``||F_c[:, :, j]||_2``; the *class-aware*
salience of channel ``j`` is the mean of those norms over the classes; the
``K`` largest are that block's salient channels (ties: lower channel index
first, so exactly ``K`` are always chosen; the reference's ``> threshold``
picks fewer under ties).

**Tuning.** Each block gets ``x[..., idx] += W x[..., idx] + b`` on the
stream right after the attention residual (the reference's ``sct_attn``
mode), ``W`` ``K x K`` trunc-normal(0.02) and ``b`` zero as in the reference
(so SCT is *not* the identity at initialisation; ``init="zero"`` makes it
so). Count on ViT-B/16 (12 blocks): ``12 (K^2 + K)``; K = 96 (V-PEFT Bench's
setting) gives 111,744 = 0.11M, V-PEFT Bench's params column for SCT
(tested). Not mergeable (the channel update sits on the residual stream).

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* only the sct_attn position (the reference's default; its sct_mlp and sct_qkv variants are not built)
* exactly K channels per block (ties broken by channel index) instead of the reference's > threshold
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._prestep_data import salience_after_attention
from ._registry import HParams, Prestep, register_method
from ._targets import transformer_blocks

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class SCTHP(HParams):
    channels: int = Field(96, ge=1, description="K, salient channels tuned per block (V-PEFT Bench: 96)")
    init: Literal["trunc_normal", "zero"] = Field(
        "trunc_normal", description="init of the K x K weight: the reference's trunc-normal(0.02), or zero (identity)"
    )


class ChannelLinear(nn.Module):
    """``x[..., idx] += W x[..., idx] + b`` on a fixed set of channels (out of place)."""

    def __init__(self, index: torch.Tensor, like: torch.Tensor, init: str):
        super().__init__()
        k = index.numel()
        self.register_buffer("index", index.to(device=like.device, dtype=torch.long).clone())
        self.linear = nn.Linear(k, k, device=like.device, dtype=like.dtype)
        if init == "zero":
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_add(-1, self.index, self.linear(x.index_select(-1, self.index)))


class SCTBlock(nn.Module):
    """A timm ViT block with :class:`ChannelLinear` after its attention residual.

    The original block's children are adopted under their own names, so module
    paths (``blocks.3.attn.qkv``) and the loaded pre-trained weights stay as they were.
    """

    def __init__(self, block: nn.Module, sct: ChannelLinear):
        super().__init__()
        missing = [n for n in _BLOCK_PARTS if not hasattr(block, n)]
        if missing:
            raise ValueError(f"sct: {type(block).__name__} is not a timm ViT block (no {', '.join(missing)})")
        for name, child in block.named_children():
            self.add_module(name, child)
        self.sct = sct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.sct(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _state_key(i: int) -> str:
    return f"blocks.{i}.channels"


def compute(model: nn.Module, hp: SCTHP, data) -> dict[str, torch.Tensor]:
    """The K most salient channels of each block, from the training images."""
    out = {}
    for i, score in enumerate(salience_after_attention(model, data)):
        if hp.channels > score.numel():
            raise ValueError(f"channels {hp.channels} > the backbone's width {score.numel()}")
        order = torch.sort(-score, stable=True).indices[: hp.channels]
        out[_state_key(i)] = torch.sort(order).values
    return out


def placeholder(model: nn.Module, hp: SCTHP) -> dict[str, torch.Tensor]:
    """The first K channels of every block (same shapes and count as a real selection)."""
    return {_state_key(i): torch.arange(hp.channels) for i in range(len(transformer_blocks(model)))}


def prestep_key(hp: SCTHP) -> dict:
    return {"channels": hp.channels}


def apply(model: nn.Module, hp: SCTHP, state: dict | None = None) -> nn.Module:
    freeze_all(model)
    blocks = transformer_blocks(model)
    state = placeholder(model, hp) if state is None else state
    width = blocks[0].norm2.normalized_shape[0] if hasattr(blocks[0], "norm2") else None
    if width is not None and hp.channels > width:
        raise ValueError(f"channels {hp.channels} > the backbone's width {width}")
    for i, block in enumerate(blocks):
        index = state.get(_state_key(i))
        if index is None or index.numel() != hp.channels:
            raise ValueError(f"sct: prestep result has no {hp.channels} channels for block {i}")
        like = next(block.parameters())
        blocks[i] = SCTBlock(block, ChannelLinear(index, like, hp.init))
    return model


DEVIATIONS = (
    "only the sct_attn position (the reference's default; its sct_mlp and sct_qkv variants are not built)",
    "exactly K channels per block (ties broken by channel index) instead of the reference's > threshold",
)

METHOD = register_method(
    "sct",
    SCTHP,
    apply,
    None,
    deviations=DEVIATIONS,
    prestep=Prestep(compute=compute, key=prestep_key, placeholder=placeholder),
)
