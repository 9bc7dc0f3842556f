"""GLoRA (Chavan et al., 2023) through Hugging Face peft (``GloraConfig``; peft 0.21 has it).

Generalised LoRA: ``W' = W + W * A + B`` and ``b' = b + b * D + E + W C`` on
each targeted frozen linear, each of ``A``, ``B`` (``lora``: rank ``r``
factors; ``vector``; ``constant``; ``none``), ``C`` (``lora``, ``vector``,
``none``) and ``D``, ``E`` (``vector``, ``constant``, ``none``) one fixed
parameterisation (peft's; the paper searches one per layer, which is not
done here). Zero at init (identity). Default target ``qkv`` (the fused
``attn.qkv``); ``q``/``k``/``v`` split it first. Mergeable through peft's
``merge_and_unload``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftGLoRAHP(hf.TargetsHP):
    rank: int = Field(8, ge=1, description="rank r of the 'lora' parameterisations")
    a_b: Literal["lora", "vector", "constant", "none"] = Field("lora", description="A and B (peft's config_A_B)")
    c: Literal["lora", "vector", "none"] = Field("lora", description="C, the weight-to-bias path (config_C)")
    d_e: Literal["vector", "constant", "none"] = Field("constant", description="D and E, on the bias (config_D_E)")


def apply(model: nn.Module, hp: PeftGLoRAHP) -> nn.Module:
    def build(peft, paths):
        if not hasattr(peft, "GloraConfig"):
            raise hf.InputError(f"peft_glora: peft {peft.__version__} has no GLoRA tuner (peft 0.21 has)")
        return peft.GloraConfig(r=hp.rank, config_A_B=hp.a_b, config_C=hp.c, config_D_E=hp.d_e, target_modules=paths)

    return hf.inject(model, hp, build)


METHOD = register_method("peft_glora", PeftGLoRAHP, apply, hf.merge)
