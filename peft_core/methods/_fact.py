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
* Tucker (``fact_tk``): every ``r x r`` slice core comes from one shared
  ``r x r x r`` core ``C`` and a factor ``P`` with one column per slice
  (``r x 12 L``): ``S_m[i, j] = sum_k C[i, j, k] P[k, m]``. How the slices
  fill ``M`` is the FacT authors' layout (``layout="authors"``, see
  :class:`TuckerFactors`), or our earlier one-slice-per-chunk variant
  (``layout="per_slice"``).

``V`` starts at zero, so the model is unchanged at initialisation; dropout acts
on the core's output, as in the reference study. All factors live on one
module attached to the model as ``model.fact``; the wrapped linears only hold a
plain reference to it, so parameters are never shared between two models and
appear once in ``state_dict``. Merging folds each ``dW`` into its timm linear
and removes ``model.fact``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams
from ._targets import transformer_blocks

#: Linears of each timm ViT block that receive an increment, in slice order
#: (the authors' TK factor ``P`` is laid out q, k, v, proj, fc1 x4, fc2 x4 per block).
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
    """The shared projections ``U``, ``V`` and the per-layer cores (subclasses).

    ``shapes[l]`` is layer ``l``'s ``(b, a)`` (output, input width in units of
    ``dim``) and ``kinds[l]`` which block linear it is (one of ``FACT_TARGETS``).
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        scale: float,
        shapes: list[tuple[int, int]],
        like: torch.Tensor,
        kinds: list[str] | None = None,
    ):
        super().__init__()
        self.dim, self.rank, self.scale = dim, rank, scale
        self.shapes = list(shapes)  # per layer: (b, a) = (out, in) in units of dim
        self.kinds = list(kinds) if kinds is not None else [""] * len(self.shapes)
        if len(self.kinds) != len(self.shapes):
            raise ValueError(f"FacT: {len(self.kinds)} kinds for {len(self.shapes)} layers")
        kw = {"device": like.device, "dtype": like.dtype}
        # reference FacTu: nn.Linear(dim, r) default init; FacTv: zero-initialised
        self.u = nn.Parameter(torch.empty(rank, dim, **kw))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))

    def core(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s core ``M``, shape ``(b r, a r)``, applied as ``M (U x)``."""
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
    """FacT-TT: a free ``(b r) x (a r)`` core per layer (12 r^2 per standard block).

    The same function as the authors' code: their q, k, v, proj cores are
    ``nn.Linear(r, r)`` (our qkv core stacks the three weights), fc1's
    ``nn.Linear(r, 4r)`` output is split into four r-wide chunks, each mapped
    by ``V``, and fc2's ``nn.Linear(4r, r)`` reads the four chunks' ``U x_j``
    concatenated.
    """

    def __init__(self, dim, rank, scale, shapes, like, kinds=None):
        super().__init__(dim, rank, scale, shapes, like, kinds)
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


TuckerLayout = Literal["authors", "per_slice"]


class TuckerFactors(FacTFactors):
    """FacT-TK: one ``r x r x r`` core ``c`` and a slice factor ``p`` (r x slices).

    Slice ``m`` of a layer (its column of ``p``) is ``S_m = c x_3 p[:, m]``,
    ``S_m[i, j] = sum_k c[i, j, k] p[k, m]``. ``p``'s columns run per block
    q, k, v, proj, fc1 (``R`` = mlp ratio columns), fc2 (``R`` columns).

    ``layout="authors"`` is the FacT authors' code (``FacT.forward``, TK mode),
    with ``h = U x`` a row vector of the rank space:

    * q, k, v, proj: ``h @ S_m``, i.e. the core block is ``S_m^T``;
    * fc1: the ``R`` slices stacked as ``T[i, j, m] = S_m[i, j]`` and read as
      one ``r x R r`` matrix ``T1[i, j R + m]``; ``h @ T1`` (width ``R r``) is
      cut into ``R`` consecutive r-wide chunks, each mapped by ``V``. So every
      chunk mixes all ``R`` slices (chunk ``c``, row ``t``: slice
      ``(c r + t) mod R``, column ``(c r + t) div R``);
    * fc2: the same ``r x R r`` matrix ``T2`` of its own slices, transposed:
      the hidden vector's ``R`` d-wide chunks are each mapped by ``U``,
      concatenated (width ``R r``) and multiplied by ``T2^T``.

    ``layout="per_slice"`` is our earlier variant (not the authors'): the
    ``d x d`` chunk ``(j, i)`` of every increment is ``V S_m U`` with the
    single slice ``m = j a + i`` of that chunk (so q, k, v, proj use ``S_m``
    where the authors use ``S_m^T``, a mere re-parameterisation of ``C``).
    Same parameters and count, a different function for fc1 / fc2.
    """

    def __init__(self, dim, rank, scale, shapes, like, kinds=None, layout: TuckerLayout = "authors"):
        super().__init__(dim, rank, scale, shapes, like, kinds)
        if layout not in ("authors", "per_slice"):
            raise ValueError(f"FacT-TK: unknown layout {layout!r}")
        self.layout = layout
        if layout == "authors":
            for kind, (b, a) in zip(self.kinds, self.shapes):
                ok = (b == 1) if kind == "mlp.fc2" else (a == 1)
                if kind not in FACT_TARGETS or not ok:
                    raise ValueError(
                        f"FacT-TK authors' layout: no rule for a {kind or '?'} linear of shape {b}d x {a}d"
                    )
        kw = {"device": like.device, "dtype": like.dtype}
        self.offsets = []
        n = 0
        for b, a in self.shapes:
            self.offsets.append(n)
            n += a * b
        self.c = nn.Parameter(torch.empty(rank, rank, rank, **kw))
        self.p = nn.Parameter(torch.empty(rank, n, **kw))
        # the authors' FacTc, FacTp: xavier_uniform_
        nn.init.xavier_uniform_(self.c)
        nn.init.xavier_uniform_(self.p)

    def slices(self, layer: int) -> torch.Tensor:
        """``S[i, j, m]`` for the layer's slices ``m`` (the authors' ``FacTc @ FacTp[:, cols]``)."""
        b, a = self.shapes[layer]
        off = self.offsets[layer]
        return torch.einsum("ijk,km->ijm", self.c, self.p[:, off : off + a * b])

    def core(self, layer: int) -> torch.Tensor:
        b, a = self.shapes[layer]
        r = self.rank
        s = self.slices(layer)  # (r, r, a b)
        if self.layout == "per_slice":
            # chunk (j, i) <- slice j a + i, applied untransposed
            return s.permute(2, 0, 1).reshape(b, a, r, r).permute(0, 2, 1, 3).reshape(b * r, a * r)
        kind = self.kinds[layer]
        if kind == "mlp.fc1":
            return s.reshape(r, r * b).T  # (b r, r): row f = column f of T1
        if kind == "mlp.fc2":
            return s.reshape(r, r * a)  # (r, a r): T2
        return s.permute(2, 1, 0).reshape(b * r, r)  # q, k, v, proj: S_m^T stacked


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
    model: nn.Module, hp: FacTHP, factors_cls: type[FacTFactors], **factor_kwargs
) -> nn.Module:
    """Freeze ``model``, attach ``model.fact`` and wrap every block's four linears.

    ``factor_kwargs`` go to ``factors_cls`` (e.g. FacT-TK's ``layout``).
    """
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
    kinds = [path.split(".", 2)[2] for path, _ in targets]
    factors = factors_cls(
        dim, hp.rank, hp.scale, shapes, like=targets[0][1].weight, kinds=kinds, **factor_kwargs
    )
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
