"""Bottleneck adapter, its initialisations and the block wrappers adapter methods share.

Private helper of ``adapter``, ``houlsby``, ``adaptformer`` and ``convpass``;
it registers nothing. A wrapper replaces ``block.attn`` or ``block.mlp`` of a
timm ViT block, so whatever the adapter adds lands *inside* the residual
branch, before the block's layer-scale (``ls1``/``ls2``) and drop-path, as in
the reference study; the block's own ``forward`` is never patched. The
wrapped sub-layer and its adapter therefore pass the block's layer-scale and
drop-path exactly once, with one drop-path mask: the reference applies them a
second time around a sequential adapter and draws a separate mask for a
parallel one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ._targets import transformer_blocks

# Initialisation schemes of the down/up projections, with the reference
# study's names (its ``model/utils.py::init_weight``):
#   xavier        both weights Xavier-uniform, biases N(0, 1e-6): NOT identity at init
#   lora_xavier   down Xavier-uniform, down bias 0, up weight and bias 0
#   lora_kaiming  down Kaiming-uniform (a=sqrt 5), down bias 0, up weight and bias 0
#   zero          the reference's name for "adds nothing at init"; as run there it
#                 zeroes down.weight and up.bias (each twice) and leaves up.weight
#                 random, so its output is a nonzero constant. Here the whole
#                 up-projection is 0; the down-projection keeps nn.Linear's default
#                 weight (Kaiming-uniform, a=sqrt 5) with a zero bias, i.e. the same
#                 tensors as lora_kaiming. A fully zero adapter, the literal intent,
#                 would never learn: ReLU(0) = 0 blocks every weight gradient.
Init = Literal["zero", "xavier", "lora_xavier", "lora_kaiming"]
IDENTITY_INITS: frozenset[str] = frozenset({"zero", "lora_xavier", "lora_kaiming"})

# Field factories, so the four methods document their shared knobs identically.


def bottleneck_field(default: int) -> object:
    return Field(
        default, ge=1, description="hidden width of the down/up bottleneck (reference: adapter_bottleneck)"
    )


def scaler_field(default: float) -> object:
    return Field(
        default, gt=0, description="fixed multiplier of the adapter output (reference: adapter_scaler)"
    )


def init_field(default: str) -> object:
    return Field(
        default,
        description=(
            "initialisation of the projections: 'xavier' (both random, not identity at init), "
            "'lora_xavier' / 'lora_kaiming' (random down, zero up), "
            "'zero' (zero up, Kaiming down, as lora_kaiming); "
            "all but 'xavier' leave the model exactly unchanged at init"
        ),
    )


def dropout_field(default: float = 0.1) -> object:
    return Field(default, ge=0, lt=1, description="dropout on the bottleneck activation (reference: 0.1)")


@torch.no_grad()
def init_projections(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """Initialise a down/up pair; every scheme but ``xavier`` zeroes the up-projection."""
    if init == "xavier":
        nn.init.xavier_uniform_(down.weight)
        nn.init.xavier_uniform_(up.weight)
        nn.init.normal_(down.bias, std=1e-6)
        nn.init.normal_(up.bias, std=1e-6)
        return
    if init not in IDENTITY_INITS:
        raise ValueError(f"unknown adapter init {init!r}")
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    if init == "lora_xavier":
        nn.init.xavier_uniform_(down.weight)
    else:  # lora_kaiming, zero: a random down-projection keeps every unit learnable
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(down.bias)


class BottleneckAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))``, the adapter of Houlsby/Pfeiffer/AdaptFormer."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        init: str,
        scale: float,
        dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        init_projections(self.down, self.up, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class SequentialAdapter(nn.Module):
    """``h + adapter(h)`` with ``h = base(x)``: an adapter after a sub-layer (Houlsby/Pfeiffer)."""

    def __init__(self, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base(x, *args, **kwargs)
        return h + self.adapter(h)


class ParallelAdapter(nn.Module):
    """``base(x) + adapter(x)``: a bypass beside a sub-layer, reading the same input."""

    def __init__(self, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(x, *args, **kwargs) + self.adapter(x)


class PreNormParallelAdapter(nn.Module):
    """``base(norm(x)) + adapter(x)``: a bypass that reads the stream *before* the block's norm.

    Holds the block's (frozen) norm, which the block replaces by ``nn.Identity``.
    """

    def __init__(self, norm: nn.Module, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.norm = norm
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.norm(x)) + self.adapter(x)


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT, each checked to have ``attn``, ``mlp`` and norms."""
    blocks = list(transformer_blocks(model))
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no transformer blocks")
    for i, block in enumerate(blocks):
        for part in ("norm1", "attn", "norm2", "mlp"):
            if not isinstance(getattr(block, part, None), nn.Module):
                raise TypeError(f"blocks.{i} ({type(block).__name__}) has no `{part}` sub-module")
    return blocks


def embed_dim(model: nn.Module) -> int:
    vit_blocks(model)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(model).__name__} has no integer embed_dim")
    return dim


def factory_kwargs(module: nn.Module) -> dict:
    """Device and dtype of a module's first parameter, for new tensors placed beside it."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def add_sequential_adapters(model: nn.Module, hp, parts: tuple[str, ...]) -> nn.Module:
    """Wrap ``block.<part>`` of every block with a sequential bottleneck adapter.

    ``hp`` carries ``bottleneck``, ``init``, ``scaler`` and ``dropout``; the
    Pfeiffer adapter uses ``("mlp",)``, Houlsby ``("attn", "mlp")``.
    """
    dim = embed_dim(model)
    for block in vit_blocks(model):
        for part in parts:
            base = getattr(block, part)
            adapter = BottleneckAdapter(dim, hp.bottleneck, hp.init, hp.scaler, hp.dropout, **factory_kwargs(base))
            setattr(block, part, SequentialAdapter(base, adapter))
    return model
