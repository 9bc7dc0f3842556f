"""FourierFT (Gao et al., 2024) through Hugging Face peft (``FourierFTConfig``).

Each targeted frozen linear gets ``n`` trainable spectral coefficients at
fixed random frequencies (drawn from ``loc_seed``); the update is
``scaling`` times the real part of their inverse 2-D DFT, a dense
``d_out x d_in`` matrix: ``n`` parameters per linear. ``init='normal'``
(peft's and the paper's default) draws the coefficients from N(0, 1), so the
model is *not* unchanged at init; ``init='zero'`` starts at zero (identity).
Default target ``qkv`` (the fused ``attn.qkv``); ``q``/``k``/``v`` split it
first. Mergeable through peft's ``merge_and_unload``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftFourierFTHP(hf.TargetsHP):
    n_frequency: int = Field(1000, ge=1, description="trainable spectral coefficients per linear (<= d_in * d_out)")
    scaling: float = Field(150.0, gt=0, description="scale of the inverse DFT (peft: 300 for ViT classification)")
    init: Literal["normal", "zero"] = Field("normal", description="coefficients at init: N(0, 1) (peft's default) or zero")
    loc_seed: int = Field(777, ge=0, description="seed of the random frequency locations (peft's random_loc_seed)")


def apply(model: nn.Module, hp: PeftFourierFTHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.FourierFTConfig(
        n_frequency=hp.n_frequency, scaling=hp.scaling, init_weights=hp.init == "zero",
        random_loc_seed=hp.loc_seed, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_fourierft", PeftFourierFTHP, apply, hf.merge)
