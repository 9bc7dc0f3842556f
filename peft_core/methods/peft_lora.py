"""LoRA through Hugging Face peft (``LoraConfig``): a cross-check of our own ``lora``.

``W + s * B A`` beside each targeted frozen linear, ``B`` zero at init (model
unchanged). Default target ``qkv``: one LoRA on timm's fused ``attn.qkv``,
whose ``A`` is shared by q, k and v, which is exactly our ``lora`` with
targets q, k, v (same 36,864 r parameters on ViT-B/16; same logits at equal
weights, tested); ``q``/``k``/``v`` split the fused linear first, one LoRA
each. peft's ``lora_alpha`` is set to ``s * r``. Mergeable through peft's
``merge_and_unload`` (fused qkv restored afterwards).
"""

from __future__ import annotations

from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftLoRAHP(hf.LoraFamilyHP):
    """LoRA's rank, scale, dropout and targets (see the module doc)."""


def apply(model: nn.Module, hp: PeftLoRAHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.LoraConfig(**hp.lora_kwargs(paths)))


METHOD = register_method("peft_lora", PeftLoRAHP, apply, hf.merge)
