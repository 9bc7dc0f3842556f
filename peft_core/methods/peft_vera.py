"""VeRA (Kopiczko et al., 2024) through Hugging Face peft (``VeraConfig``).

``W + diag(b) B diag(d) A`` beside each targeted frozen linear, with ``A``
(``r x d_in``) and ``B`` (``d_out x r``) frozen random matrices shared by
all layers (drawn from ``prng_key`` on the CPU, rebuilt identically on
reload, so not saved: peft's ``save_projection=False``) and only
the vectors ``d`` (``r``, starting at ``d_initial``) and ``b`` (``d_out``,
starting at zero: the model is unchanged at init) trained. Default target
``qkv`` (the fused ``attn.qkv``); ``q``/``k``/``v`` split it first.
ViT-B/16, fused qkv: 12 * (r + 2,304). Mergeable through peft's
``merge_and_unload``.
"""

from __future__ import annotations

import warnings

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftVeRAHP(hf.TargetsHP):
    rank: int = Field(256, ge=1, description="rank r of the shared frozen random matrices")
    d_initial: float = Field(0.1, gt=0, description="initial value of the trainable vector d")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (peft's vera_dropout)")
    prng_key: int = Field(0, ge=0, description="seed of the shared random matrices A and B")


def apply(model: nn.Module, hp: PeftVeRAHP) -> nn.Module:
    with warnings.catch_warnings():  # peft advises saving A and B; ours are rebuilt from prng_key on the CPU
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        return hf.inject(model, hp, lambda peft, paths: peft.VeraConfig(
            r=hp.rank, d_initial=hp.d_initial, vera_dropout=hp.dropout, projection_prng_key=hp.prng_key,
            save_projection=False, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_vera", PeftVeRAHP, apply, hf.merge)
