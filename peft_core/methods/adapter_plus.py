"""Adapter+ (Steitz & Roth, CVPR 2024): a post-block bottleneck adapter with channel-wise scaling.

"Adapters Strike Back" (Steitz & Roth, CVPR 2024, arXiv 2406.06820); official
repository visinf/adapter_plus (``adapter_plus/vit_adapter.py``: ``Adapter``
and ``AdapterBlock.forward_post``; ``conf/adapter/adapter_plus.yaml`` on top of
``conf/adapter/base_adapter.yaml``).

In every block, after both residual additions (the paper's *Post-Adapter*
position: sequential, no parallel branch), the stream ``x`` becomes
``x + s ⊙ DropPath(up(GELU(down(x))))``: no LayerNorm inside the adapter
(``norm_layer: false``), a learnable per-channel scale ``s`` (``scaling:
channel``, initialised to ones), biases on both projections, the paper's
Houlsby initialisation (both weights truncated normal, std 0.01 cut at ±2 std,
biases zero; ``init: houlsby``), stochastic depth 0.1 on the adapter output and
no dropout (``drop_path: 0.1``, ``dropout: 0``), bottleneck ``r = 8``
(``dim: 8``). The adapter reads the block's output, so it sits outside the
block's layer-scale and drop-path, as in the official ``forward_post``.

**Not identity at init**: the Houlsby init draws both projections (small, not
zero), as the official code does. ``init: lora`` (the official alternative:
Kaiming-uniform down, zero up) starts as the identity.

Count on ViT-B/16 (12 blocks, d = 768): ``12 (2 d r + r + 2 d) = 18,444 r +
18,432``; r = 8 gives **165,984**, r = 1 36,876, r = 32 608,640. The paper's
``# params`` counts the classifier too (its ``adaptermodel.py`` sums every
``requires_grad`` tensor, the head included, and ``get_results.ipynb`` averages
over the 19 VTAB-1k tasks): 165,984 + the mean VTAB-1k head (769 * 940 / 19 =
38,045) = 204,029 = **0.20M**, the figure quoted for Adapter+ at r = 8 on VTAB
(the paper's table text itself was not retrievable here; the authors' counting
code was). The paper tunes r per task over {1, 2, 4, 8, 16, 32}
(``conf/experiment/vtab/adapter_plus_dim1-32.yaml``); that config's
per-task choices average, with the head, to 0.27M on VTAB-1k (0.16M for
``adapter_plus_dim1-8.yaml``), computed here from the configs.

Not mergeable: the GELU between the projections makes the adapter a
nonlinear function of the features, so it can not be folded into the frozen
linear weights.

No deviations from the official adapter: its stochastic depth is its own
field (``drop_path``), independent of the backbone's (the cell's
``drop_path``), as in the official configuration (both 0.1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from timm.layers import DropPath
from torch import nn

from ._adapter import embed_dim, factory_kwargs
from ._common import freeze_all
from ._registry import HParams, register_method
from ._stream import StreamBlock, stream_blocks


class AdapterPlusHP(HParams):
    bottleneck: int = Field(8, ge=1, description="r, hidden width of the adapter (official `dim`: 8; the paper tunes 1..32)")
    init: Literal["houlsby", "lora"] = Field(
        "houlsby",
        description="'houlsby': both weights trunc-normal std 0.01 (±2 std), biases 0, not identity at init "
        "(official default); 'lora': Kaiming-uniform down, zero up, identity at init",
    )
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth on the adapter output (official `drop_path`: 0.1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the bottleneck activation (official `dropout`: 0)")


class PostAdapter(nn.Module):
    """``x + scale ⊙ drop_path(up(dropout(gelu(down(x)))))``, ``scale`` one learnable value per channel."""

    def __init__(self, dim: int, hp: AdapterPlusHP, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, hp.bottleneck, **kw)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(hp.dropout)
        self.up = nn.Linear(hp.bottleneck, dim, **kw)
        self.drop_path = DropPath(hp.drop_path) if hp.drop_path > 0 else nn.Identity()
        self.scale = nn.Parameter(torch.ones(dim, **kw))
        with torch.no_grad():
            if hp.init == "houlsby":
                std = 0.01  # the paper's value (official comment: Houlsby's code uses 0.001)
                for lin in (self.down, self.up):
                    nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
                    nn.init.zeros_(lin.bias)
            else:  # lora: nn.Linear's default down-projection, zero up-projection
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(dim)
                nn.init.uniform_(self.down.bias, -bound, bound)
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.up(self.dropout(self.act(self.down(x))))) * self.scale


def apply(model: nn.Module, hp: AdapterPlusHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    blocks = stream_blocks(model, "adapter_plus")
    for i, block in enumerate(blocks):
        blocks[i] = StreamBlock(block, None, PostAdapter(dim, hp, **factory_kwargs(block)))
    return model


METHOD = register_method("adapter_plus", AdapterPlusHP, apply, merge=None)
