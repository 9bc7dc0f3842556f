"""LoKr (Edalati et al., 2022; LyCORIS) through Hugging Face peft (``LoKrConfig``).

A Kronecker product beside each targeted frozen linear:
``W + (alpha / r) * W1 (x) W2``, where ``d_out = a * b`` and ``d_in = c * e``
are split by peft's ``factorization`` (factors near the square root), ``W1``
(``a x c``) is full and ``W2`` (``b x e``) is rank ``r`` (full when ``r`` is at
least half its larger side). peft zeroes ``W2``'s up factor at init, so the
model is unchanged. Default target ``qkv`` (one LoKr on timm's fused
``attn.qkv``); ``q``/``k``/``v`` split it first. Mergeable through peft's
``merge_and_unload``.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftLoKrHP(hf.TargetsHP):
    rank: int = Field(8, ge=1, description="rank r of the second Kronecker factor")
    alpha: float | None = Field(None, gt=0, description="scale alpha / r; None: alpha = r (scale 1)")
    decompose_both: bool = Field(False, description="also make the first factor low-rank")
    decompose_factor: int = Field(-1, ge=-1, description="split dimensions as (f, d / f); -1: near the square root")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the update's rows (peft's rank_dropout)")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of skipping the update in a step")


def apply(model: nn.Module, hp: PeftLoKrHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.LoKrConfig(
        r=hp.rank, alpha=hp.alpha or hp.rank, decompose_both=hp.decompose_both,
        decompose_factor=hp.decompose_factor, rank_dropout=hp.rank_dropout,
        module_dropout=hp.module_dropout, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_lokr", PeftLoKrHP, apply, hf.merge)
