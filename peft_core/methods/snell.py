"""SNELL (Shen et al., NeurIPS 2024): kernelised LoRA whose merged update is sparsified by competition.

"Expanding Sparse Tuning for Low Memory Usage"; official code
github:ssfgunner/SNELL (``model/vision_transformer_timm.py``: ``SNELL``,
``KLoRA``, ``MixK``, ``TuningModule``, ``*SNELLParallel``), commit e9d5185,
run as its ``scripts/vtab/snell32`` (``--tuning_model=snell``). Beside every
``attn.q/k/v``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (timm's fused
``attn.qkv`` as three separate weights, each with its own factors and
threshold) sits a learnable update ``ΔW`` merged from two low-rank matrices
``A`` (in x r) and ``B`` (out x r) by a nonlinear kernel instead of ``B Aᵀ``:
the ``r`` columns are split into ``H = 2`` groups of ``r/2`` and

    ΔW[o, i] = c Σ_h (-1)^h ||A_h[i] - B_h[o]||_p      (c = 0.1, p = 2),

the paper's "piecewise linear kernel" (Appendix B, Table A6, P = 2). The paper
calls its weights alpha_p learnable; the code fixes them at +-c
(``shared_coeff_fc``, ``requires_grad=False``), and so do we.
``kernel='mixk'`` adds ``α softmax(ΔW / γ) + β`` (three learnable scalars per
weight; the ``MixK`` kernel of SNELLA). Competition-based sparsification then
keeps the entries of ``ΔW`` whose magnitude exceeds its ``sparsity`` quantile
(``torch.quantile`` over the whole weight, recomputed every forward) and zeroes
the rest; the reference multiplies the kept entries by their own detached
magnitude (``ΔW * threshold(|ΔW|.detach())``, ``mask='reference'``);
``mask='binary'`` keeps them as they are. ``sparsity = 0`` is the reference's
plain ``KLoRA`` (no threshold, no magnitude factor). The output is
``base(x) + drop_path(dropout(x) ΔWᵀ)``, dropout (0.1) on the inputs of the
q/k/v, fc1 and fc2 updates but not of proj, as the reference.

Trainable: ``r (in + out)`` per adapted weight, plus the class token (the
reference's ``ft_cls_token``). ViT-B/16: 12 x (4 x 1536 + 2 x 3840) r + 768
= 165,888 r + 768: r = 8 is 1,327,872; r = 16 2,654,976; r = 32 5,309,184.
The paper reports no count (Appendix E.1 argues for omitting it); its Table 1
is SNELL-8/16/32 on ViT-B/16, the sparsity ratio tuned per task.

``A`` and ``B`` are Kaiming-uniform (a = sqrt(5)) as the reference: ``ΔW`` is
not zero at init, so the model is *not* the backbone at init. Mergeable:
``W += sparsify(ΔW)`` (an eval-mode merge: dropout and drop-path off).

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* default sparsity 0.4, the median of the 19 per-task init_thres of the released VTAB-1k scripts (0 to 0.995); the reference's train.py default is 0 (plain kernelised LoRA)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.layers import DropPath
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks

Target = Literal["qkv", "proj", "fc1", "fc2"]


class SNELLHP(HParams):
    """SNELL hyper-parameters (reference grid: low_rank_dim {8, 16, 32}, init_thres per task)."""

    rank: int = Field(8, ge=1, description="low-rank dimension r of A and B (reference `low_rank_dim`: 8, 16, 32)")
    sparsity: float = Field(
        0.4,
        ge=0,
        lt=1,
        description="fraction of each merged update zeroed, by magnitude (reference `init_thres`, per task 0 to 0.995)",
    )
    kernel: Literal["distance", "mixk"] = Field(
        "distance",
        description="'distance': c Σ_h (-1)^h ||A_h - B_h||_p (SNELL); 'mixk': + α softmax(·/γ) + β (SNELLA's MixK)",
    )
    num_kernels: int = Field(2, ge=1, description="groups H the r columns are split into (reference `num_Hs`: 2)")
    norm_p: float = Field(2.0, gt=0, description="p of the distance (reference `norm_p`: 2)")
    coeff: float = Field(0.1, gt=0, description="c, the weight of each group's distance (reference `SCALE_FACTOR_fc`)")
    mask: Literal["reference", "binary"] = Field(
        "reference",
        description="'reference': kept entries times their detached magnitude, as the code; 'binary': kept as they are",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the update's input (reference: 0.1)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="drop-path on each update's output (reference: 0.1)")
    tune_cls_token: bool = Field(True, description="also train the class token (reference `ft_cls_token`: yes)")
    targets: tuple[Target, ...] = Field(
        ("qkv", "proj", "fc1", "fc2"), min_length=1, description="linears with an update (reference: all)"
    )

    @model_validator(mode="after")
    def _check(self) -> SNELLHP:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicates in {list(self.targets)}")
        if self.rank % self.num_kernels:
            raise ValueError(f"rank: {self.rank} is not a multiple of num_kernels {self.num_kernels}")
        return self


class SNELLLinear(nn.Module):
    """``base(x) + [drop_path(dropout(x) sparsify(ΔW_k)ᵀ)]_k`` over ``chunks`` row blocks of ``base``."""

    def __init__(self, base: nn.Linear, chunks: int, hp: SNELLHP, input_dropout: bool):
        super().__init__()
        if base.out_features % chunks:
            raise ValueError(f"snell: {chunks} row blocks do not divide {base.out_features} outputs")
        self.base, self.hp = base, hp
        h, q = hp.num_kernels, hp.rank // hp.num_kernels
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.in_factors = nn.Parameter(torch.empty(chunks, h, base.in_features, q, **kw))
        self.out_factors = nn.Parameter(torch.empty(chunks, h, base.out_features // chunks, q, **kw))
        for k in range(chunks):  # the reference's init, one (H, n, r/H) tensor per weight
            nn.init.kaiming_uniform_(self.in_factors.data[k], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.out_factors.data[k], a=math.sqrt(5))
        signs = torch.tensor([(-1.0) ** g for g in range(h)], **kw)
        self.register_buffer("coeff", hp.coeff * signs.view(1, h, 1, 1), persistent=False)
        if hp.kernel == "mixk":
            self.alpha = nn.Parameter(torch.ones(chunks, 1, 1, **kw))
            self.gamma = nn.Parameter(torch.ones(chunks, 1, 1, **kw))
            self.beta = nn.Parameter(torch.zeros(chunks, 1, 1, **kw))
        self.dropout = nn.Dropout(hp.dropout if input_dropout else 0.0)
        self.drop_paths = nn.ModuleList(DropPath(hp.drop_path) if hp.drop_path else nn.Identity() for _ in range(chunks))

    def kernel_update(self) -> torch.Tensor:
        """The merged, not yet sparsified updates: (chunks, out/chunks, in)."""
        dist = torch.cdist(self.out_factors, self.in_factors, p=self.hp.norm_p)  # (chunks, H, out/chunks, in)
        delta = (self.coeff * dist).sum(1)
        if self.hp.kernel == "mixk":  # the reference's softmax runs over the output index of its (in, out) matrix
            delta = delta + self.alpha * F.softmax(delta / self.gamma, dim=1) + self.beta
        return delta

    def delta_weight(self) -> torch.Tensor:
        """The sparsified updates, one per row block: (chunks, out/chunks, in)."""
        delta = self.kernel_update()
        if self.hp.sparsity == 0:
            return delta
        mag = delta.detach().abs()
        thres = torch.quantile(mag.flatten(1).float(), self.hp.sparsity, dim=1).to(mag.dtype).view(-1, 1, 1)
        keep = mag > thres
        return delta * (mag * keep if self.hp.mask == "reference" else keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        updates = [dp(F.linear(xd, w)) for dp, w in zip(self.drop_paths, self.delta_weight())]
        return self.base(x) + torch.cat(updates, dim=-1)


def apply(model: nn.Module, hp: SNELLHP) -> nn.Module:
    freeze_all(model)
    transformer_blocks(model)
    if hp.tune_cls_token:
        cls = getattr(model, "cls_token", None)
        if not isinstance(cls, nn.Parameter):
            raise TypeError(f"snell: {type(model).__name__} has no cls_token to tune (set tune_cls_token=False)")
        cls.requires_grad_(True)
    for target in hp.targets:
        for path, lin in resolve_targets(model, [BLOCK_LINEARS[target]], nn.Linear):
            model.set_submodule(path, SNELLLinear(lin, 3 if target == "qkv" else 1, hp, input_dropout=target != "proj"))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every sparsified update into its frozen linear (the class token stays a timm tensor)."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, SNELLLinear)]:
        base = mod.base
        base.weight += mod.delta_weight().flatten(0, 1).to(base.weight.dtype)
        model.set_submodule(path, base)
    return model


DEVIATIONS = (
    "default sparsity 0.4, the median of the 19 per-task init_thres of the released VTAB-1k scripts (0 to 0.995); the reference's train.py default is 0 (plain kernelised LoRA)",
)

METHOD = register_method("snell", SNELLHP, apply, merge, deviations=DEVIATIONS)
