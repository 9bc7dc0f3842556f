"""SPT's sensitivity-aware allocation (He et al., ICCV 2023), shared by ``spt_lora`` and ``spt_adapter``.

Sensitivity Aware Visual Parameter-Efficient Fine-Tuning (He, Chen, Liu,
Cai, Zhuang; ICCV 2023, arXiv 2303.08566); source repository ziplab/SPT
(``engine.py``, ``get_sensitivity``; ``train_spt.py``).

**Prestep (data-dependent, cached, on the cell's training split only).**
The sensitivity of every backbone parameter is its squared gradient of the
cross-entropy loss (through the new head), summed over the first
``sensitivity_batches`` batches of the training split (the authors' 16). The
*units* are the weight matrices q, k, v (the thirds of timm's fused
``attn.qkv``), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block and the
vectors (their biases and the LayerNorm weights and biases); the patch
embedding, position embedding and class token are never candidates (the
class token always trains). For a budget ``tau`` the ``tau`` most sensitive
values are taken; a matrix holding at least ``structured / alpha`` of them
(``structured`` = the size of a rank-``rank`` LoRA or adapter on it) is tuned
*structurally* (that module), else its selected values are tuned
*unstructured* (a sparse delta); a vector holding at least ``len / beta`` of
them is tuned whole, else sparsely. ``tau`` is swept over ``sweep_step`` x 1 ... 79
(the authors' 0.02M ... 1.58M) and the allocation whose total (with the class token) is
closest to ``budget`` is kept (ties: the larger tau, as the authors' ``<=``).

Structured modules: LoRA ``B A`` (``A`` Kaiming, ``B`` zero) added to the
matrix's output; adapter ``up(GELU(down(W x + b)))`` added after it (down
with bias, up with bias and zero-initialised), as the authors'
``get_structured_param_num`` counts them (``in r + r out`` and ``out r + r out
+ r + out``). Everything starts at zero, so the model is unchanged at init.
Mergeable for LoRA (and the sparse deltas); not for the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams, Prestep
from ._targets import transformer_blocks

FROZEN, STRUCTURED, SPARSE = 0, 1, 2
_MATRICES = ("attn.proj", "mlp.fc1", "mlp.fc2")
_VECTORS = ("norm1", "norm2")


class SPTHP(HParams):
    budget: float = Field(0.4, gt=0, description="trainable parameters to allocate, M, head excluded (the authors' param_req)")
    rank: int = Field(8, ge=1, description="rank of the structured LoRA / adapter (the authors' low_rank_dim: 8)")
    alpha: float = Field(10.0, gt=0, description="a matrix is tuned structurally when it holds >= structured/alpha selected values")
    beta: float = Field(5.0, gt=0, description="a vector is tuned whole when it holds >= len/beta selected values")
    sensitivity_batches: int = Field(16, ge=1, description="training batches whose squared gradients are summed")
    sweep_step: float = Field(0.02, gt=0, description="step of the tau sweep, M (the authors': 0.02, 79 steps)")


@dataclass(frozen=True)
class Unit:
    """One candidate: rows ``[start, stop)`` of a module's ``weight`` (a matrix) or of a vector parameter."""

    name: str  # e.g. blocks.3.attn.q, blocks.3.attn.qkv.bias.k, blocks.3.norm1.weight
    module: str
    param: str  # weight | bias
    start: int
    stop: int
    matrix: bool


def units(model: nn.Module) -> list[Unit]:
    """The candidates in model order (q, k, v are the thirds of a fused qkv)."""
    blocks = transformer_blocks(model)
    out: list[Unit] = []
    for i, block in enumerate(blocks):
        qkv = block.attn.qkv
        d = qkv.out_features // 3
        for j, part in enumerate("qkv"):
            out.append(Unit(f"blocks.{i}.attn.{part}", f"blocks.{i}.attn.qkv", "weight", j * d, (j + 1) * d, True))
        for path in _MATRICES:
            mod = block.get_submodule(path)
            out.append(Unit(f"blocks.{i}.{path}", f"blocks.{i}.{path}", "weight", 0, mod.out_features, True))
        if qkv.bias is not None:
            for j, part in enumerate("qkv"):
                out.append(Unit(f"blocks.{i}.attn.qkv.bias.{part}", f"blocks.{i}.attn.qkv", "bias", j * d, (j + 1) * d, False))
        for path in _MATRICES:
            mod = block.get_submodule(path)
            if mod.bias is not None:
                out.append(Unit(f"blocks.{i}.{path}.bias", f"blocks.{i}.{path}", "bias", 0, mod.out_features, False))
        for path in _VECTORS:
            norm = block.get_submodule(path)
            for p in ("weight", "bias"):
                if getattr(norm, p, None) is not None:
                    n = getattr(norm, p).shape[0]
                    out.append(Unit(f"blocks.{i}.{path}.{p}", f"blocks.{i}.{path}", p, 0, n, False))
    return out


def _rows(model: nn.Module, u: Unit) -> torch.Tensor:
    return getattr(model.get_submodule(u.module), u.param)[u.start : u.stop]


def structured_cost(u: Unit, shape: torch.Size, kind: str, rank: int) -> int:
    out_dim, in_dim = shape[0], shape[1]
    return in_dim * rank + rank * out_dim if kind == "lora" else 2 * out_dim * rank + rank + out_dim


def allocate(model: nn.Module, scores: list[torch.Tensor], hp: SPTHP, kind: str) -> dict[str, torch.Tensor]:
    """The authors' sweep over tau: per unit a mode and, for sparse units, the flat indices chosen."""
    us = units(model)
    flat = torch.cat([s.flatten() for s in scores])
    sizes = [s.numel() for s in scores]
    order = torch.sort(-flat, stable=True).indices
    cls = int(model.cls_token.numel()) if getattr(model, "cls_token", None) is not None else 0
    best, best_gap = None, math.inf
    for step in range(1, 80):
        tau = min(math.ceil(step * hp.sweep_step * 1e6), flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:tau]] = True
        state, total = {}, cls
        for u, sel, s in zip(us, chosen.split(sizes), scores):
            n = int(sel.sum())
            if u.matrix and n >= structured_cost(u, s.shape, kind, hp.rank) / hp.alpha:
                state[f"{u.name}.mode"], total = torch.tensor(STRUCTURED), total + structured_cost(u, s.shape, kind, hp.rank)
            elif not u.matrix and n >= s.numel() / hp.beta:
                state[f"{u.name}.mode"], total = torch.tensor(STRUCTURED), total + s.numel()
            elif n:
                state[f"{u.name}.mode"], total = torch.tensor(SPARSE), total + n
                state[f"{u.name}.index"] = torch.nonzero(sel).flatten()
        gap = abs(total - hp.budget * 1e6)
        if gap <= best_gap:
            best, best_gap = state, gap
    return best


def sensitivity(model: nn.Module, hp: SPTHP, data) -> list[torch.Tensor]:
    """Squared gradients of the loss per unit, summed over the first batches (eval mode, deterministic)."""
    us = units(model)
    params = {id(getattr(model.get_submodule(u.module), u.param)): getattr(model.get_submodule(u.module), u.param) for u in us}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    model.eval()
    for b, (x, y) in enumerate(data.batches()):
        if b >= hp.sensitivity_batches:
            break
        for p in params.values():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        for k, p in params.items():
            sums[k] += p.grad.double() ** 2
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return [sums[id(getattr(model.get_submodule(u.module), u.param))][u.start : u.stop].float().cpu() for u in us]


def placeholder(model: nn.Module, hp: SPTHP, kind: str) -> dict[str, torch.Tensor]:
    """Data-free stand-in: structured modules on matrices in model order while they fit the budget."""
    state, total = {}, int(model.cls_token.numel()) if getattr(model, "cls_token", None) is not None else 0
    for u in units(model):
        if u.matrix:
            cost = structured_cost(u, _rows(model, u).shape, kind, hp.rank)
            if total + cost <= hp.budget * 1e6:
                state[f"{u.name}.mode"], total = torch.tensor(STRUCTURED), total + cost
    return state


class Branch(nn.Module):
    """LoRA (``B A x``) or adapter (``up(GELU(down(h)))``) for rows ``[start, stop)`` of a linear's output."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, rank: int, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.kind = kind
        self.down = nn.Linear(in_dim if kind == "lora" else out_dim, rank, bias=kind == "adapter", **kw)
        self.up = nn.Linear(rank, out_dim, bias=kind == "adapter", **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if kind == "adapter":
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) if self.kind == "lora" else self.up(F.gelu(self.down(h)))


class SPTModule(nn.Module):
    """A frozen Linear or LayerNorm with sparse deltas on its weight/bias and structured branches on row blocks."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()
        self.spans: dict[str, tuple[int, int]] = {}

    def add_delta(self, param: str, index: torch.Tensor) -> None:
        ref = getattr(self.base, param)
        idx = index.to(device=ref.device, dtype=torch.long)
        if hasattr(self, f"{param}_index"):  # several units of one tensor (q, k, v biases)
            idx = torch.cat([getattr(self, f"{param}_index"), idx])
            del self._buffers[f"{param}_index"], self._parameters[f"{param}_delta"]
        self.register_buffer(f"{param}_index", idx)
        self.register_parameter(f"{param}_delta", nn.Parameter(torch.zeros(idx.numel(), device=ref.device, dtype=ref.dtype)))

    def effective(self, param: str) -> torch.Tensor | None:
        t = getattr(self.base, param, None)
        if t is None or not hasattr(self, f"{param}_index"):
            return t
        return t.flatten().index_add(0, getattr(self, f"{param}_index"), getattr(self, f"{param}_delta")).view_as(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.LayerNorm):
            return F.layer_norm(x, b.normalized_shape, self.effective("weight"), self.effective("bias"), b.eps)
        h = F.linear(x, self.effective("weight"), self.effective("bias"))
        if not self.branches:
            return h
        parts = []
        for name, branch in self.branches.items():
            start, stop = self.spans[name]
            pad = torch.zeros(*h.shape[:-1], h.shape[-1], device=h.device, dtype=h.dtype)
            pad[..., start:stop] = branch(x, h[..., start:stop])
            parts.append(pad)
        return h + sum(parts)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base module with the deltas (and LoRA branches) folded in."""
        b = self.base
        for param in ("weight", "bias"):
            if getattr(b, param, None) is not None and hasattr(self, f"{param}_index"):
                getattr(b, param).copy_(self.effective(param))
        for name, branch in self.branches.items():
            if branch.kind != "lora":
                raise ValueError("spt: adapter branches do not merge")
            start, stop = self.spans[name]
            b.weight[start:stop] += branch.up.weight @ branch.down.weight
        return b


def build(model: nn.Module, hp: SPTHP, state: dict[str, torch.Tensor], kind: str) -> nn.Module:
    freeze_all(model)
    if getattr(model, "cls_token", None) is not None:
        model.cls_token.requires_grad_(True)  # the authors tune it fully
    wrapped: dict[str, SPTModule] = {}
    for u in units(model):
        mode = int(state.get(f"{u.name}.mode", torch.tensor(FROZEN)))
        if mode == FROZEN:
            continue
        if u.module not in wrapped:
            wrapped[u.module] = SPTModule(model.get_submodule(u.module))
        mod = wrapped[u.module]
        ref = getattr(mod.base, u.param)
        if u.matrix and mode == STRUCTURED:
            key = u.name.rsplit(".", 1)[-1]
            mod.branches[key] = Branch(kind, ref.shape[1], u.stop - u.start, hp.rank, ref)
            mod.spans[key] = (u.start, u.stop)
        else:
            width = ref[0].numel() if ref.ndim > 1 else 1
            if mode == STRUCTURED:  # a whole vector
                local = torch.arange(u.stop - u.start)
            else:
                local = state[f"{u.name}.index"].long()
            mod.add_delta(u.param, local + u.start * width)
    for path, mod in wrapped.items():
        model.set_submodule(path, mod)
    return model


def merge(model: nn.Module) -> nn.Module:
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, SPTModule)]:
        model.set_submodule(path, mod.merged())
    return model


DEVIATIONS = (
    "sensitivities are taken in eval mode (no dropout or drop-path), so the allocation is deterministic",
    "q, k and v are the thirds of timm's fused attn.qkv (the authors split the checkpoint into three linears); same units, same counts",
)


def prestep(kind: str) -> Prestep:
    """SPT's data-dependent step for one structured kind: sensitivities on the training split -> allocation."""
    return Prestep(
        compute=lambda model, hp, data: allocate(model, sensitivity(model, hp, data), hp, kind),
        key=lambda hp: hp.model_dump(mode="json"),
        placeholder=lambda model, hp: placeholder(model, hp, kind),
    )
