"""OFT (Qiu et al., 2023) through Hugging Face peft (``OFTConfig``): orthogonal fine-tuning.

A block-diagonal orthogonal matrix ``R`` (``d_in / b`` blocks of ``b x b``,
each the Cayley transform of a skew-symmetric matrix, ``b (b - 1) / 2``
parameters per block) rotates the input of each targeted frozen linear:
``W R``. ``R`` starts at the identity, so the model is unchanged at init.
Default target ``qkv``: one rotation of the input shared by q, k and v on
timm's fused ``attn.qkv``; ``q``/``k``/``v`` split it first (three
rotations). Mergeable through peft's ``merge_and_unload``.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftOFTHP(hf.TargetsHP):
    block_size: int = Field(32, ge=2, description="size b of each orthogonal block (must divide d_in)")
    coft: bool = Field(False, description="constrained OFT: keep R within eps of the identity")
    eps: float = Field(6e-5, gt=0, description="COFT's bound (used only when coft)")
    block_share: bool = Field(False, description="one block shared by all blocks of a linear")
    cayley_neumann: bool = Field(True, description="Cayley transform by a Neumann series (peft's default) "
                                 "instead of an exact inverse")  # fmt: skip
    module_dropout: float = Field(0.0, ge=0, lt=1, description="multiplicative dropout of whole blocks (peft's)")


def apply(model: nn.Module, hp: PeftOFTHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.OFTConfig(
        r=0, oft_block_size=hp.block_size, coft=hp.coft, eps=hp.eps, block_share=hp.block_share,
        use_cayley_neumann=hp.cayley_neumann, module_dropout=hp.module_dropout, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_oft", PeftOFTHP, apply, hf.merge)
