"""LoRA (Hu et al., 2022): a low-rank update ``W + s * B A`` beside frozen linears.

Targets are named by role: ``q``, ``k``, ``v`` are row slices of timm's fused
``attn.qkv`` linear and share one down-projection ``A`` (as the reference
study does), so q/k/v on ViT-B/16 cost ``12 * (768 r + 3 * 768 r) = 36,864 r``
parameters; ``o`` is ``attn.proj``, ``fc1``/``fc2`` the MLP linears.
``B`` starts at zero, so the model is unchanged at initialisation.
Mergeable: ``W[rows] += s * B A``, leaving a plain timm model.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew A and B (trunc-normal std 0.02, zero bias), so B was not zero; here they start at the intended init (cell init='reference' reproduces it)
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks

Target = Literal["q", "k", "v", "o", "fc1", "fc2"]
_QKV = ("q", "k", "v")
_PLAIN = {"o": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class LoRAHP(HParams):
    rank: int = Field(8, ge=1, description="rank r of the update B A")
    alpha: float | None = Field(
        None, gt=0, description="if set, scaling = alpha / rank; otherwise `scaling` is used"
    )
    scaling: float = Field(1.0, gt=0, description="multiplier s of B A (reference study: 1)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input branch")
    targets: tuple[Target, ...] = Field(_QKV, min_length=1, description="which linears get LoRA")

    @model_validator(mode="after")
    def _unique_targets(self) -> "LoRAHP":
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicates in {list(self.targets)}")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scaling


class LoRALinear(nn.Module):
    """``base(x) + s * B A dropout(x)``, the update added to the ``rows`` outputs only."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, rows: torch.Tensor | None):
        super().__init__()
        self.base = base
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        n_out = base.out_features if rows is None else int(rows.numel())
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=device, dtype=dtype))
        self.register_buffer("rows", rows, persistent=False)
        self.update = nn.Identity()  # the update branch's output, a hook point (PACE's noise; no parameters)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.update(F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale)
        if self.rows is None:
            return out + delta
        return out.index_add(-1, self.rows, delta)


def _qkv_rows(dim: int, roles: list[str], device: torch.device) -> torch.Tensor | None:
    if len(roles) == 3:
        return None
    idx = [torch.arange(_QKV.index(r) * dim, (_QKV.index(r) + 1) * dim) for r in roles]
    return torch.cat(idx).to(device)


def apply(model: nn.Module, hp: LoRAHP) -> nn.Module:
    freeze_all(model)
    transformer_blocks(model)
    roles = [t for t in _QKV if t in hp.targets]
    if roles:
        for path, lin in resolve_targets(model, [BLOCK_LINEARS["qkv"]], nn.Linear):
            rows = _qkv_rows(lin.out_features // 3, roles, lin.weight.device)
            model.set_submodule(path, LoRALinear(lin, hp.rank, hp.scale, hp.dropout, rows))
    for target in (t for t in hp.targets if t in _PLAIN):
        pattern = r"blocks\.\d+\." + re.escape(_PLAIN[target])
        for path, lin in resolve_targets(model, [pattern], nn.Linear):
            model.set_submodule(path, LoRALinear(lin, hp.rank, hp.scale, hp.dropout, None))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base linear and remove the wrappers."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]:
        base = mod.base
        delta = mod.delta_weight().to(base.weight.dtype)
        if mod.rows is None:
            base.weight += delta
        else:
            base.weight.index_add_(0, mod.rows, delta)
        model.set_submodule(path, base)
    return model


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew A and B (trunc-normal std 0.02, zero bias), so B was not zero; here they start at the intended init (cell init='reference' reproduces it)",
)

METHOD = register_method("lora", LoRAHP, apply, merge, deviations=DEVIATIONS)
