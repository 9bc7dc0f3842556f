"""DoRA (Liu et al., 2024) through Hugging Face peft (``LoraConfig(use_dora=True)``).

The weight is split into a magnitude (one trainable scale per output row,
starting at the row norms of ``W``) and a direction updated by LoRA:
``m * (W + s B A) / ||W + s B A||_row``. ``B`` starts at zero, so the model
is unchanged at init. Targets as ``peft_lora``: ``qkv`` is one DoRA on timm's
fused ``attn.qkv`` (row norms are per output feature, so fusing changes only
the shared ``A``); ``q``/``k``/``v`` split it first. Mergeable through peft's
``merge_and_unload``. ViT-B/16, fused qkv: 12 * (3,072 r + 2,304) =
36,864 r + 27,648.
"""

from __future__ import annotations

from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftDoRAHP(hf.LoraFamilyHP):
    """DoRA's rank, scale, dropout and targets (see the module doc)."""


def apply(model: nn.Module, hp: PeftDoRAHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.LoraConfig(use_dora=True, **hp.lora_kwargs(paths)))


METHOD = register_method("peft_dora", PeftDoRAHP, apply, hf.merge)
