"""FacT machinery shared by ``fact_tt`` and ``fact_tk`` (Jie & Deng, 2023).

FacT views the increments of every transformer linear as slices of one tensor
and factorises that tensor with factors shared across layers. Each linear of a
block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) has input
``a * d`` and output ``b * d`` for the embedding width ``d`` (on a standard
ViT: qkv ``a=1, b=3``; proj ``1, 1``; fc1 ``1, 4``; fc2 ``4, 1``), i.e. it is a
``b x a`` grid of ``d x d`` slices, 12 per block. Its increment is

    dW = s * blockdiag_b(V) @ M @ blockdiag_a(U)

with ``U`` (r x d) and ``V`` (d x r) shared by every slice of every layer, and a
per-layer core ``M`` of shape ``(b r) x (a r)``:

* tensor-train (``fact_tt``): ``M`` is a free per-layer parameter
  (``12 r^2`` per block);
* Tucker (``fact_tk``): slice ``m`` of ``M`` is ``C x_3 P[:, m]`` for one shared
  ``r x r x r`` core ``C`` and a factor ``P`` with one column per slice
  (``r x 12 L``).

``V`` starts at zero, so the model is unchanged at initialisation; dropout acts
on the core's output, as in the reference study. All factors live on one
module attached to the model as ``model.fact``; the wrapped linears only hold a
plain reference to it, so parameters are never shared between two models and
appear once in ``state_dict``. Merging folds each ``dW`` into its timm linear
and removes ``model.fact``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams
from ._targets import transformer_blocks

#: Linears of each timm ViT block that receive an increment, in slice order
#: (the reference's TK factor ``P`` is laid out q, k, v, proj, fc1 x4, fc2 x4).
FACT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ATTR = "fact"


class FacTHP(HParams):
    """Hyper-parameters common to both FacT factorisations."""

    rank: int = Field(
        8, ge=1, description="FacT rank r (reference `fact_dim`, default 8)"
    )
    scale: float = Field(
        1.0,
        gt=0,
        description="multiplier s of every increment (reference `fact_scaler`, default 1)",
    )
    dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="dropout on the rank-r core output (reference: fixed 0.1)",
    )


class FacTFactors(nn.Module):
    """The shared projections ``U``, ``V`` and the per-layer cores (subclasses)."""

    def __init__(
        self,
        dim: int,
        rank: int,
        scale: float,
        shapes: list[tuple[int, int]],
        like: torch.Tensor,
    ):
        super().__init__()
        self.dim, self.rank, self.scale = dim, rank, scale
        self.shapes = list(shapes)  # per layer: (b, a) = (out, in) in units of dim
        kw = {"device": like.device, "dtype": like.dtype}
        # reference FacTu: nn.Linear(dim, r) default init; FacTv: zero-initialised
        self.u = nn.Parameter(torch.empty(rank, dim, **kw))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))

    def core(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s core ``M``, shape ``(b r, a r)``."""
        raise NotImplementedError

    def delta(self, layer: int, x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
        """``dW x`` (with dropout on the core output) for inputs ``x`` of width ``a d``."""
        b, a = self.shapes[layer]
        h = F.linear(x.unflatten(-1, (a, self.dim)), self.u).flatten(-2)  # (..., a r)
        h = dropout(F.linear(h, self.core(layer)))  # (..., b r)
        return (
            F.linear(h.unflatten(-1, (b, self.rank)), self.v).flatten(-2) * self.scale
        )

    def delta_weight(self, layer: int) -> torch.Tensor:
        """The increment ``dW`` of layer ``layer`` as a dense ``(b d, a d)`` matrix."""
        b, a = self.shapes[layer]
        r, d = self.rank, self.dim
        m = self.core(layer).reshape(b, r, a, r)
        return self.scale * torch.einsum("cp,jpiq,qn->jcin", self.v, m, self.u).reshape(
            b * d, a * d
        )


class TensorTrainFactors(FacTFactors):
    """FacT-TT: a free ``(b r) x (a r)`` core per layer (12 r^2 per standard block)."""

    def __init__(self, dim, rank, scale, shapes, like):
        super().__init__(dim, rank, scale, shapes, like)
        self.cores = nn.ParameterList()
        for b, a in self.shapes:
            core = nn.Parameter(
                torch.empty(b * rank, a * rank, device=like.device, dtype=like.dtype)
            )
            # the reference's per-layer nn.Linear(a r, b r) default initialisation
            nn.init.kaiming_uniform_(core, a=math.sqrt(5))
            self.cores.append(core)

    def core(self, layer: int) -> torch.Tensor:
        return self.cores[layer]


class TuckerFactors(FacTFactors):
    """FacT-TK: one ``r x r x r`` core ``c`` and a slice factor ``p`` (r x slices)."""

    def __init__(self, dim, rank, scale, shapes, like):
        super().__init__(dim, rank, scale, shapes, like)
        kw = {"device": like.device, "dtype": like.dtype}
        self.offsets = []
        n = 0
        for b, a in self.shapes:
            self.offsets.append(n)
            n += a * b
        self.c = nn.Parameter(
            torch.empty(rank, rank, rank, **kw)
        )  # (out rank, in rank, slice rank)
        self.p = nn.Parameter(torch.empty(rank, n, **kw))
        nn.init.xavier_uniform_(self.c)
        nn.init.xavier_uniform_(self.p)

    def core(self, layer: int) -> torch.Tensor:
        b, a = self.shapes[layer]
        r, off = self.rank, self.offsets[layer]
        slices = torch.einsum(
            "pqk,ks->spq", self.c, self.p[:, off : off + a * b]
        )  # (b a, r, r), row-major (j, i)
        return slices.reshape(b, a, r, r).permute(0, 2, 1, 3).reshape(b * r, a * r)


class FacTLinear(nn.Module):
    """``base(x) + dW x``: a frozen timm linear plus its FacT increment."""

    def __init__(
        self, base: nn.Linear, factors: FacTFactors, layer: int, dropout: float
    ):
        super().__init__()
        self.base = base
        # A plain attribute, not a submodule: the factors are owned by the model
        # (``model.fact``) and must not be registered once per wrapped linear.
        object.__setattr__(self, "factors", factors)
        self.layer = layer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.factors.delta(self.layer, x, self.dropout)


def _slice_shape(path: str, lin: nn.Linear, dim: int) -> tuple[int, int]:
    if lin.in_features % dim or lin.out_features % dim:
        raise ValueError(
            f"FacT: {path} is {lin.in_features} -> {lin.out_features}, not a multiple of the width {dim}"
        )
    return lin.out_features // dim, lin.in_features // dim


def apply_fact(
    model: nn.Module, hp: FacTHP, factors_cls: type[FacTFactors]
) -> nn.Module:
    """Freeze ``model``, attach ``model.fact`` and wrap every block's four linears."""
    freeze_all(model)
    if hasattr(model, ATTR):
        raise ValueError(
            f"FacT: {type(model).__name__} already has an attribute {ATTR!r}"
        )
    blocks = transformer_blocks(model)
    dim = getattr(model, "embed_dim", None) or blocks[0].attn.qkv.in_features
    targets: list[tuple[str, nn.Linear]] = []
    for i, block in enumerate(blocks):
        for name in FACT_TARGETS:
            lin = block.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise TypeError(
                    f"FacT: blocks.{i}.{name} is a {type(lin).__name__}, not an nn.Linear"
                )
            targets.append((f"blocks.{i}.{name}", lin))
    shapes = [_slice_shape(path, lin, dim) for path, lin in targets]
    factors = factors_cls(dim, hp.rank, hp.scale, shapes, like=targets[0][1].weight)
    model.add_module(ATTR, factors)
    for layer, (path, lin) in enumerate(targets):
        model.set_submodule(path, FacTLinear(lin, factors, layer, hp.dropout))
    return model


@torch.no_grad()
def merge_fact(model: nn.Module) -> nn.Module:
    """Fold every increment into its timm linear; remove the wrappers and ``model.fact``."""
    for path, mod in [
        (p, m) for p, m in model.named_modules() if isinstance(m, FacTLinear)
    ]:
        base = mod.base
        base.weight += mod.factors.delta_weight(mod.layer).to(base.weight.dtype)
        model.set_submodule(path, base)
    if isinstance(getattr(model, ATTR, None), FacTFactors):
        delattr(model, ATTR)
    return model
