"""RepAdapter (Luo et al., 2023): a linear group-wise adapter before attn.qkv / mlp.fc1, re-parameterised away.

As in the reference study (``ft_*_mode: sequential_before``), the adapter
``x + s * (B dropout(A x + a) + b)`` transforms the normalised token
features just before they enter the attention (whose only consumer of them in
a timm ViT is the fused ``attn.qkv`` linear) and/or the MLP (``mlp.fc1``).
``A`` is a dense ``d -> k`` projection, ``B`` a group-wise ``k -> d``
projection (``groups`` blocks of ``k/g -> d/g``; the reference's grouped 1x1
Conv1d). ``A`` is Xavier-initialised, ``B`` and both biases start at zero, so
the model is unchanged at initialisation. On ViT-B/16 with both targets and
``groups=2``: ``24 * (768 k + k + 384 k + 768) = 24 * (1153 k + 768)``.

The adapter is affine, so it is merged exactly into the following linear:
``W' = W (I + s B A)``, ``b' = b + s W (B a + b_B)``. If that linear has no
bias (some CLIP/DINOv2 variants), the adapter is built without biases too, so
the merged model keeps exactly the timm parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks

Target = Literal["attn", "mlp"]
_PATTERNS = {"attn": BLOCK_LINEARS["qkv"], "mlp": BLOCK_LINEARS["fc1"]}


class RepAdapterHP(HParams):
    """RepAdapter hyper-parameters (reference grid: bottleneck {8, 16, 32} x scale {0.1 .. 10})."""

    bottleneck: int = Field(
        8,
        ge=1,
        description="hidden width k of the adapter (reference `repadapter_bottleneck`)",
    )
    scale: float = Field(
        1.0,
        gt=0,
        description="multiplier s of the adapter branch (reference `repadapter_scaler`)",
    )
    groups: int = Field(
        2,
        ge=1,
        description="groups of the up-projection B; must divide k and d (reference `repadapter_group`)",
    )
    dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout between A and B (reference: fixed 0.1)"
    )
    targets: tuple[Target, ...] = Field(
        ("attn", "mlp"),
        min_length=1,
        description="where adapters go: 'attn' = before attn.qkv, 'mlp' = before mlp.fc1 (reference: both)",
    )

    @model_validator(mode="after")
    def _check(self) -> RepAdapterHP:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicates in {list(self.targets)}")
        if self.bottleneck % self.groups:
            raise ValueError(
                f"groups: {self.groups} does not divide bottleneck {self.bottleneck}"
            )
        return self


class RepAdapter(nn.Module):
    """``y = x + s * (B dropout(A x + a) + b)`` with a group-wise ``B``."""

    def __init__(self, dim: int, hp: RepAdapterHP, bias: bool, like: torch.Tensor):
        super().__init__()
        g, k = hp.groups, hp.bottleneck
        if dim % g:
            raise ValueError(f"RepAdapter: groups={g} does not divide the width {dim}")
        kw = {"device": like.device, "dtype": like.dtype}
        self.scale, self.groups = hp.scale, g
        self.down = nn.Linear(dim, k, bias=bias, **kw)
        nn.init.xavier_uniform_(
            self.down.weight
        )  # reference default init 'lora_xavier'
        self.up_weight = nn.Parameter(
            torch.zeros(g, dim // g, k // g, **kw)
        )  # group g: k/g -> d/g
        self.up_bias = nn.Parameter(torch.zeros(dim, **kw)) if bias else None
        if bias:
            nn.init.zeros_(self.down.bias)
        self.dropout = nn.Dropout(hp.dropout)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.einsum(
            "...gi,goi->...go", h.unflatten(-1, (self.groups, -1)), self.up_weight
        ).flatten(-2)
        return out if self.up_bias is None else out + self.up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(self.dropout(self.down(x)))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(s B A, s (B a + b))``: the adapter is ``x -> x + (s B A) x + s (B a + b)``."""
        up = torch.block_diag(*self.up_weight)  # dense (d, k)
        matrix = self.scale * up @ self.down.weight
        offset = (
            None
            if self.up_bias is None
            else self.scale * (up @ self.down.bias + self.up_bias)
        )
        return matrix, offset


class RepAdapterLinear(nn.Module):
    """``base(adapter(x))``: a frozen timm linear fed through a RepAdapter."""

    def __init__(self, base: nn.Linear, adapter: RepAdapter):
        super().__init__()
        self.adapter = adapter
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.adapter(x))

    @torch.no_grad()
    def reparameterise(self) -> nn.Linear:
        """The base linear with the adapter folded in: ``W (I + M)``, ``b + W c``."""
        base = self.base
        matrix, offset = self.adapter.affine()
        weight = base.weight
        if base.bias is not None and offset is not None:
            base.bias += F.linear(offset.to(weight.dtype), weight)
        base.weight += weight @ matrix.to(weight.dtype)
        return base


def apply(model: nn.Module, hp: RepAdapterHP) -> nn.Module:
    freeze_all(model)
    transformer_blocks(model)
    for target in hp.targets:
        for path, lin in resolve_targets(model, [_PATTERNS[target]], nn.Linear):
            if (
                target == "attn"
                and getattr(model.get_submodule(path.rsplit(".", 1)[0]), "gate", None)
                is not None
            ):
                raise ValueError(
                    f"RepAdapter: {path}'s attention is gated; its input is not only fed to qkv"
                )
            adapter = RepAdapter(
                lin.in_features, hp, bias=lin.bias is not None, like=lin.weight
            )
            model.set_submodule(path, RepAdapterLinear(lin, adapter))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Structural re-parameterisation: fold every adapter into the linear it feeds."""
    for path, mod in [
        (p, m) for p, m in model.named_modules() if isinstance(m, RepAdapterLinear)
    ]:
        model.set_submodule(path, mod.reparameterise())
    return model


METHOD = register_method("repadapter", RepAdapterHP, apply, merge)
