"""BOFT (Liu et al., 2024) through Hugging Face peft (``BOFTConfig``): butterfly orthogonal fine-tuning.

Here with one butterfly factor: a block-diagonal orthogonal matrix (``d_in
/ b`` blocks of ``b x b``, each the Cayley transform of a skew-symmetric
matrix; peft stores all ``b^2`` entries of each block) rotates each targeted
frozen weight, and a trainable per-output scale ``s`` follows:
``(R W^T)^T * s``. Identity at init (``R`` = I, ``s`` = 1). Default target
``qkv`` (the fused ``attn.qkv``; one rotation shared by q, k and v);
``q``/``k``/``v`` split it first. Mergeable through peft's ``merge_and_unload``.

Why one factor: peft runs more than one butterfly factor only through a CUDA
extension it compiles at run time, and when that fails (no ninja or nvcc,
or a CPU) it silently falls back to one factor. A cell's identity must say
what ran, so ``boft_n_butterfly_factor`` is fixed to 1 and peft's fallback
warnings are silenced.
"""

from __future__ import annotations

import warnings

from pydantic import Field
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftBOFTHP(hf.TargetsHP):
    block_size: int = Field(4, ge=2, description="size b of each orthogonal block (must divide d_in)")
    dropout: float = Field(0.0, ge=0, lt=1, description="multiplicative dropout of whole blocks (peft's boft_dropout)")


def apply(model: nn.Module, hp: PeftBOFTHP) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(Failed to load the CUDA extension|Setting boft_n_butterfly)")
        return hf.inject(model, hp, lambda peft, paths: peft.BOFTConfig(
            boft_block_size=hp.block_size, boft_block_num=0, boft_n_butterfly_factor=1,
            boft_dropout=hp.dropout, target_modules=paths))  # fmt: skip


METHOD = register_method("peft_boft", PeftBOFTHP, apply, hf.merge)
