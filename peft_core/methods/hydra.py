"""Hydra (Kim et al., 2024): a parallel and a sequential low-rank branch on attn.proj and mlp.fc2.

Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning
(Kim, Lee, Ahn, Kim; arXiv 2309.06922, Neural Networks 2024); source
repository extremebird/Hydra (``vtab1k/hydra.py``, method ``hydra_both``).
V-PEFT Bench (arXiv 2402.02242) lists Hydra in its VTAB-1k table but its
``vision_transformer_hydra.py`` is a copy of its SCT file with no Hydra
code, so the authors' repository is the reference here.

Each frozen linear ``W`` (``attn.proj`` and ``mlp.fc2`` of every block)
becomes ``y = W x + b + s * P(x) + s * S(W x + b)``: the *parallel* branch
``P = B_p A_p`` reads the linear's input (like LoRA), the *sequential*
branch ``S = B_s A_s`` reads its output (a linear adapter after it). Each
branch is ``up(dropout(down(x)))`` with biases; ``down`` Xavier-uniform,
``up`` zero, so the model is unchanged at initialisation. Rank ``r`` (the
authors' ``dim``) is 2 in every VTAB-1k run of theirs.

Count on ViT-B/16 (d = 768, MLP 3072, 12 blocks): per block
``P_fc2 = 3072 r + r + r 768 + 768``, ``S_fc2 = P_proj = S_proj = 1536 r + r + 768``:
``12 * (8448 r + 4 r + 3072) = 101,424 r + 36,864``; r = 2: 239,712.
V-PEFT Bench's params column says 0.28M for Hydra (copied from the Hydra
repository's VTAB table, whose linear-probe row is 0.04M, i.e. it counts the
head): 239,712 plus the mean VTAB-1k head (769 * 940 / 19 = 38,044) is
277,756, 0.28M. The match is tested at that setting (r = 2, head included).

Mergeable: both branches are affine, so
``W' = W + s (B_p A_p + B_s A_s W)``, ``b' = b + s (B_p a_p + b_p + B_s (A_s b + a_s) + b_s)``
(``a``/``b`` the down/up biases), leaving a plain timm model.

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* merge folds the attention branches into attn.proj's own weights (the authors' set_hydraWeight re-parameterises attn.proj from mlp.fc2's weights)
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks

_PATTERNS = (BLOCK_LINEARS["proj"], BLOCK_LINEARS["fc2"])


class HydraHP(HParams):
    rank: int = Field(2, ge=1, description="rank r of each branch (authors' `dim`; 2 in all their VTAB-1k runs)")
    scale: float = Field(1.0, gt=0, description="multiplier s of both branches (authors' `scale`, tuned per data set)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout between down and up of each branch (authors' `dropout`)")


class LowRankBranch(nn.Module):
    """``up(dropout(down(x)))``: Xavier-uniform down, zero up, zero biases (if any)."""

    def __init__(self, d_in: int, d_out: int, rank: int, dropout: float, like: torch.Tensor, bias: bool):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype, "bias": bias}
        self.down = nn.Linear(d_in, rank, **kw)
        self.up = nn.Linear(rank, d_out, **kw)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.down(x)))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``branch(x) = M x + c`` (eval mode)."""
        m = self.up.weight @ self.down.weight
        if self.up.bias is None:
            return m, torch.zeros(m.shape[0], device=m.device, dtype=m.dtype)
        return m, self.up.weight @ self.down.bias + self.up.bias


class HydraLinear(nn.Module):
    """``base(x) + s * parallel(x) + s * sequential(base(x))``.

    A base linear without bias gets bias-free branches, so the merge needs no new tensor.
    """

    def __init__(self, base: nn.Linear, hp: HydraHP):
        super().__init__()
        self.base = base
        self.scale = hp.scale
        bias = base.bias is not None
        d_in, d_out, like = base.in_features, base.out_features, base.weight
        self.parallel = LowRankBranch(d_in, d_out, hp.rank, hp.dropout, like, bias)
        self.sequential = LowRankBranch(d_out, d_out, hp.rank, hp.dropout, like, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.scale * (self.parallel(x) + self.sequential(h))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with both branches folded in (the base object, edited in place)."""
        base = self.base
        w = base.weight.float()
        b = base.bias.float() if base.bias is not None else None
        mp, cp = (t.float() for t in self.parallel.affine())
        ms, cs = (t.float() for t in self.sequential.affine())
        new_w = w + self.scale * (mp + ms @ w)
        shift = self.scale * (cp + cs + (ms @ b if b is not None else 0.0))
        base.weight.copy_(new_w.to(base.weight.dtype))
        if b is not None:  # without a base bias the branches have none, so the shift is zero
            base.bias.copy_((b + shift).to(base.bias.dtype))
        return base


def apply(model: nn.Module, hp: HydraHP) -> nn.Module:
    freeze_all(model)
    transformer_blocks(model)
    for path, lin in resolve_targets(model, _PATTERNS, nn.Linear):
        model.set_submodule(path, HydraLinear(lin, hp))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every Hydra branch pair into its base linear and remove the wrappers."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, HydraLinear)]:
        model.set_submodule(path, mod.merged())
    return model


DEVIATIONS = (
    "merge folds the attention branches into attn.proj's own weights (the authors' set_hydraWeight re-parameterises attn.proj from mlp.fc2's weights)",
)

METHOD = register_method("hydra", HydraHP, apply, merge, deviations=DEVIATIONS)
