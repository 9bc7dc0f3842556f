"""NOAH's three tuners per block, with a *current* size each (the supernet samples sizes; a subnet fixes them).

Per block ``i``: ``p_i`` deep prompt tokens (VPT-deep: they replace block
``i-1``'s prompt outputs), a rank-``r_i`` LoRA on the fused ``attn.qkv``
(``W + (A[:, :r] B[:r])^T``, one pair over q, k and v as in NOAH's
``qkv_super``) and an adapter of width ``a_i`` on the MLP output
(``z + up(QuickGELU(down(z)))``, NOAH's ``AdapterSuper``). Each tensor is
allocated at the block's largest size and used through its first ``size``
rows, so a supernet shares weights between subnets (AutoFormer's weight
entanglement) and a retrained subnet allocated at its own sizes has exactly
its own parameters. A size of 0 switches the tuner off in that block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._prompts import TokenBlocks, prompt_init_range

#: columns of a subnet tensor (``depth x 3``)
PROMPT, LORA, ADAPTER = 0, 1, 2


class NoahQKV(nn.Module):
    """A frozen ``attn.qkv`` plus a LoRA pair of which the first ``rank`` columns/rows are used."""

    def __init__(self, base: nn.Linear, max_rank: int):
        super().__init__()
        self.base = base
        self.rank = max_rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(base.in_features, max_rank, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(max_rank, base.out_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a.T, a=math.sqrt(5))  # NOAH's init (B zero: identity at init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rank == 0:
            return out
        return out + (x @ self.lora_a[:, : self.rank]) @ self.lora_b[: self.rank]


class NoahMLP(nn.Module):
    """The frozen MLP followed by an adapter whose first ``width`` hidden units are used."""

    def __init__(self, base: nn.Module, dim: int, max_width: int, like: torch.Tensor):
        super().__init__()
        self.base = base
        self.width = max_width
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, max_width, **kw)
        self.up = nn.Linear(max_width, dim, **kw)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.normal_(self.down.bias, std=1e-6)
        nn.init.zeros_(self.up.weight)  # NOAH: xavier (see noah.py's deviations)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        if self.width == 0:
            return z
        a = self.width
        h = F.linear(z, self.down.weight[:a], self.down.bias[:a])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as NOAH
        return z + F.linear(h, self.up.weight[:, :a], self.up.bias)


class NoahBlocks(TokenBlocks):
    """The blocks with per-block deep prompts ``prompt_<i>`` (first ``prompts[i]`` tokens used)."""

    def __init__(self, blocks, num_prefix_tokens: int, model: nn.Module, max_prompts: list[int]):
        super().__init__(blocks, num_prefix_tokens, dropout=0.0)
        ref = next(self.parameters())
        bound = prompt_init_range(model)
        for i, n in enumerate(max_prompts):
            if n > 0:
                t = torch.empty(n, model.embed_dim, device=ref.device, dtype=ref.dtype)
                self.register_parameter(f"prompt_{i}", nn.Parameter(nn.init.uniform_(t, -bound, bound)))
        self.prompts = list(max_prompts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        carried = 0
        for i, block in enumerate(self):
            if carried:
                x = self.remove(x, carried)
                carried = 0
            n = self.prompts[i]
            if n:
                x = self.insert(x, getattr(self, f"prompt_{i}")[:n])
                carried = n
            x = block(x)
        return self.remove(x, carried) if carried else x


def build(model: nn.Module, sizes: torch.Tensor) -> None:
    """Put NOAH's tuners into ``model`` allocated at ``sizes`` (``depth x 3``: prompts, LoRA rank, adapter width)."""
    from ._prompts import vit_geometry

    blocks, dim, prefix = vit_geometry(model)
    if tuple(sizes.shape) != (len(blocks), 3):
        raise ValueError(f"noah: a subnet needs {len(blocks)} x 3 sizes, got {tuple(sizes.shape)}")
    for i, block in enumerate(blocks):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or not hasattr(block, "mlp"):
            raise ValueError(f"noah: block {i} has no attn.qkv Linear or no mlp")
        if int(sizes[i, LORA]):  # a size of 0 allocates nothing (no empty parameters)
            block.attn.qkv = NoahQKV(qkv, int(sizes[i, LORA]))
        if int(sizes[i, ADAPTER]):
            block.mlp = NoahMLP(block.mlp, dim, int(sizes[i, ADAPTER]), qkv.weight)
    model.blocks = NoahBlocks(list(blocks), prefix, model, [int(n) for n in sizes[:, PROMPT]])


def set_sizes(model: nn.Module, sizes: torch.Tensor) -> None:
    """Use the first ``sizes`` of every tuner (within what was allocated): a subnet of the supernet."""
    blocks = model.blocks
    for i, block in enumerate(blocks):
        p, r, a = (int(v) for v in sizes[i])
        qkv, mlp = block.attn.qkv, block.mlp
        have = (getattr(blocks, f"prompt_{i}").shape[0] if hasattr(blocks, f"prompt_{i}") else 0,
                qkv.lora_a.shape[1] if isinstance(qkv, NoahQKV) else 0,
                mlp.down.out_features if isinstance(mlp, NoahMLP) else 0)  # fmt: skip
        if p > have[0] or r > have[1] or a > have[2]:
            raise ValueError(f"noah: block {i} sizes {(p, r, a)} exceed the allocated {have}")
        blocks.prompts[i] = p
        if isinstance(qkv, NoahQKV):
            qkv.rank = r
        if isinstance(mlp, NoahMLP):
            mlp.width = a


def subnet_params(sizes: torch.Tensor, dim: int, qkv_out: int) -> int:
    """Trainable parameters of a subnet (head excluded), in closed form.

    Per block: ``p d`` prompt values, ``r (d + qkv_out)`` LoRA, and for an
    adapter of width ``a > 0``: ``a d + a`` (down) ``+ d a + d`` (up).
    """
    p, r, a = (sizes[:, k].long() for k in (PROMPT, LORA, ADAPTER))
    adapter = torch.where(a > 0, 2 * a * dim + a + dim, torch.zeros_like(a))
    return int((p * dim + r * (dim + qkv_out) + adapter).sum())
