"""VPT-deep (Jia et al., 2022): a fresh set of learnable prompt tokens before every block.

Before block ``i`` the outputs of block ``i-1``'s prompts are replaced by
block ``i``'s own ``num_prompts`` prompts, placed right after the prefix
tokens (cls and, for DINOv2, the register tokens); the last block's prompt
outputs are removed before the final norm, so timm's pooling (token or
average) never sees them. ``layers`` restricts the prompts to the last
``layers`` blocks (the reference study's ``vpt_layer``). Init is VPT's
uniform ``+-sqrt(6 / (3 * patch_area + dim))``, with dropout (0.1 in the
reference study) on the prompt embeddings while training. ViT-B/16 cost:
``12 * num_prompts * 768`` parameters.

Not mergeable: extra tokens change every block's attention, which no weight
edit of the plain backbone reproduces.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._prompts import PromptedBlocks, new_tokens, vit_geometry
from ._registry import HParams, register_method


class VPTDeepHP(HParams):
    num_prompts: int = Field(
        10, ge=1, description="number of prompt tokens per prompted block (reference: vpt_num)"
    )
    dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="dropout on the prompt embeddings while training (reference: vpt_dropout)",
    )
    layers: int | None = Field(
        None,
        ge=1,
        description="prompt only the last `layers` blocks (reference: vpt_layer); None prompts every block",
    )


def apply(model: nn.Module, hp: VPTDeepHP) -> nn.Module:
    freeze_all(model)
    blocks, _, num_prefix = vit_geometry(model)
    depth = len(blocks)
    layers = depth if hp.layers is None else hp.layers
    if layers > depth:
        raise ValueError(f"layers: {layers} exceeds the {depth} blocks of {type(model).__name__}")
    prompts = new_tokens(model, sets=layers, count=hp.num_prompts)
    model.blocks = PromptedBlocks(blocks, num_prefix, hp.dropout, prompts, first=depth - layers)
    return model


METHOD = register_method("vpt_deep", VPTDeepHP, apply, merge=None)
