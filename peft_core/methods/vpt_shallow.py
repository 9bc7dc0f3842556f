"""VPT-shallow (Jia et al., 2022): learnable prompt tokens enter once, before block 0.

``num_prompts`` tokens are inserted right after the prefix tokens (cls and,
for DINOv2, the register tokens) before the first block, travel through every
block with the other tokens and are removed after the last one, so the final
norm and timm's pooling (token or average) never see them. Init is VPT's
uniform ``+-sqrt(6 / (3 * patch_area + dim))``; dropout (0.1 in the reference
study) is applied to the prompt embeddings while training. ViT-B/16 cost:
``num_prompts * 768`` parameters.

Unlike the reference study's code, which drops the prompts after block 0,
the prompts here stay in the sequence up to the last block (VPT's definition).

Not mergeable: extra tokens change every block's attention, which no weight
edit of the plain backbone reproduces.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* the prompts travel through every block (reference drops them after block 0)
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._prompts import PromptedBlocks, new_tokens, vit_geometry
from ._registry import HParams, register_method


class VPTShallowHP(HParams):
    num_prompts: int = Field(
        10, ge=1, description="number of prompt tokens inserted before block 0 (reference: vpt_num)"
    )
    dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="dropout on the prompt embeddings while training (reference: vpt_dropout)",
    )


def apply(model: nn.Module, hp: VPTShallowHP) -> nn.Module:
    freeze_all(model)
    blocks, _, num_prefix = vit_geometry(model)
    prompts = new_tokens(model, sets=1, count=hp.num_prompts)
    model.blocks = PromptedBlocks(blocks, num_prefix, hp.dropout, prompts, first=0)
    return model


DEVIATIONS = (
    'the prompts travel through every block (reference drops them after block 0)',
)

METHOD = register_method("vpt_shallow", VPTShallowHP, apply, merge=None, deviations=DEVIATIONS)
