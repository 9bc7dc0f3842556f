"""ARC (Dong et al., NeurIPS 2023): linear adapters re-composed from projections shared by all layers.

"Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing"
(Dong, Yan, Lin, Wang; NeurIPS 2023, arXiv 2310.06234); official repository
DavidYanAnDe/ARC (``Model/ARC_ViT.py``: ``ARC_adapter``, ``Encoder.forward``,
``Transformer.__init__``; ``Model/Model_Config.py``; ``vtab_ARC_train.py``).

One down-projection ``D`` (d x r) per position is shared by every block, and
its transpose is the up-projection. Block ``l`` re-composes its own adapter
with a learnable rescaling vector ``c_l`` (r values, a diagonal) and a bias
``b_l`` (d values), applied to the *input* of a sub-layer, right after the
block's LayerNorm: ``h -> h + dropout(h D diag(c_l)) D^T + b_l``, then the
attention (and, for ``tuning_mode: ARC``, the MLP) reads the adapted ``h``.
The residual stream itself is not touched. Official init: ``D``
Xavier-uniform; attention ``c_l`` zero (so the attention adapters start as the
identity); MLP ``c_l`` Xavier-uniform on its (1, r) shape; ``b_l`` zero. So
``ARC_att`` is the identity at init and ``ARC`` is **not** (its MLP adapters
start random, as in the official code). Defaults from the official code:
``adapter_dim`` r = 50, adapter dropout 0.1 (``--adapt_drop``),
``tuning_mode`` ARC.

Count on ViT-B/16 (d = 768, 12 blocks, r = 50): ``ARC``: ``2 d r + 24 (r + d)``
= 76,800 + 19,632 = **96,432**; ``ARC_att``: ``d r + 12 (r + d)`` = 38,400 +
9,816 = **48,216**. The official ``count_parameters`` counts the head too; with
the mean VTAB-1k head (769 * 940 / 19 = 38,045): 134,477 = 0.13M for ARC,
matching the paper's 0.13M, and 86,261 = 0.09M for ARC_att, where the figure
quoted for the paper is 0.08M (a 0.01M gap we could not trace: the paper's
table text was not retrievable here).

**Mergeable**: the adapter is linear (dropout is off at eval), so
``qkv(h (I + M) + b)`` with ``M = D diag(c_l) D^T`` folds into the sub-layer's
first linear: ``W <- W (I + M)^T``, ``bias <- bias + W b``. ``merge`` does this
for ``attn.qkv`` and ``mlp.fc1`` and returns a plain timm model.

Deviations from the official code (``METHOD.deviations``, docs/deviations.md): none in
the function; the official ``Encoder`` is rebuilt with timm's blocks (fused
``attn.qkv`` instead of separate query/key/value linears, the same function).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ._adapter import embed_dim, factory_kwargs, vit_blocks
from ._common import freeze_all
from ._registry import HParams, register_method


class ARCHP(HParams):
    bottleneck: int = Field(50, ge=1, description="r, width of the shared projections (official `adapter_dim`: 50)")
    tuning_mode: Literal["ARC", "ARC_att"] = Field(
        "ARC", description="'ARC': adapters before attention and MLP; 'ARC_att': before attention only (official names)"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after the down-projection (official `--adapt_drop`: 0.1)")


class SharedProjections(nn.Module):
    """The down-projections shared by every block (their transposes are the up-projections)."""

    def __init__(self, dim: int, hp: ARCHP, **kw):
        super().__init__()
        self.attn = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, hp.bottleneck, **kw)))
        if hp.tuning_mode == "ARC":
            self.mlp = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, hp.bottleneck, **kw)))


class ARCInput(nn.Module):
    """``base(h + dropout(h D diag(rescale)) D^T + bias)``: a re-composed adapter on a sub-layer's input.

    ``D`` lives in the model-level :class:`SharedProjections`; this wrapper holds
    only a reference to it (not registered, so it is stored and counted once).
    """

    def __init__(self, base: nn.Module, shared: SharedProjections, position: str, dropout: float):
        super().__init__()
        down = getattr(shared, position)
        dim, r = down.shape
        kw = {"device": down.device, "dtype": down.dtype}
        self.base = base
        self.position = position
        self._shared = (shared,)  # a tuple: not a registered sub-module
        self.dropout = nn.Dropout(dropout)
        self.rescale = nn.Parameter(torch.zeros(1, r, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw))
        if position == "mlp":
            nn.init.xavier_uniform_(self.rescale)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self._shared[0], self.position)

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        down = self.down
        return h + self.dropout(h @ (down * self.rescale)) @ down.t() + self.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(self.adapt(x), *args, **kwargs)

    def delta(self) -> torch.Tensor:
        """``M = D diag(rescale) D^T``: the adapter is ``h -> h (I + M) + bias``."""
        down = self.down
        return (down * self.rescale) @ down.t()


_FIRST_LINEAR = {"attn": "qkv", "mlp": "fc1"}  # the linear that reads a timm sub-layer's input


def apply(model: nn.Module, hp: ARCHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    blocks = vit_blocks(model)
    if hasattr(model, "arc"):
        raise ValueError(f"{type(model).__name__} already has an `arc` module")
    shared = SharedProjections(dim, hp, **factory_kwargs(blocks[0]))
    model.arc = shared
    positions = ("attn", "mlp") if hp.tuning_mode == "ARC" else ("attn",)
    for block in blocks:
        for part in positions:
            setattr(block, part, ARCInput(getattr(block, part), shared, part, hp.dropout))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its sub-layer's first linear; remove the wrappers and the shared projections."""
    for block in vit_blocks(model):
        for part, linear_name in _FIRST_LINEAR.items():
            wrapper = getattr(block, part)
            if not isinstance(wrapper, ARCInput):
                continue
            linear = getattr(wrapper.base, linear_name, None)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"arc merge: {part} has no nn.Linear `{linear_name}` reading its input")
            m = wrapper.delta().to(linear.weight.dtype)
            if linear.bias is None:  # a plain timm model has no place for the adapter's bias
                raise TypeError(f"arc merge: {part}.{linear_name} has no bias to absorb the adapter bias")
            w = linear.weight.clone()
            linear.bias += w @ wrapper.bias.to(w.dtype)
            linear.weight += w @ m.t()
            setattr(block, part, wrapper.base)
    if hasattr(model, "arc"):
        del model.arc
    return model


METHOD = register_method("arc", ARCHP, apply, merge)
