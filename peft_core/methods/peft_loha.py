"""LoHa (Hyeon-Woo et al., 2022; LyCORIS) through Hugging Face peft (``LoHaConfig``).

A Hadamard product of two low-rank matrices beside each targeted frozen
linear: ``W + (alpha / r) * (W1a W1b) * (W2a W2b)``, ``2 r (d_in + d_out)``
parameters per linear; peft zeroes one factor at init, so the model is
unchanged. Default target ``qkv`` (one LoHa on timm's fused ``attn.qkv``);
``q``/``k``/``v`` split it first. Mergeable through peft's ``merge_and_unload``.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftLoHaHP(hf.TargetsHP):
    rank: int = Field(8, ge=1, description="rank r of each of the two factors")
    alpha: float | None = Field(None, gt=0, description="scale alpha / r; None: alpha = r (scale 1)")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the update's rows (peft's rank_dropout)")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of skipping the update in a step")


def apply(model: nn.Module, hp: PeftLoHaHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.LoHaConfig(
        r=hp.rank, alpha=hp.alpha or hp.rank, rank_dropout=hp.rank_dropout,
        module_dropout=hp.module_dropout, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_loha", PeftLoHaHP, apply, hf.merge)
