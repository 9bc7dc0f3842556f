"""(IA)^3 (Liu et al., 2022) through Hugging Face peft (``IA3Config``): learned rescaling vectors.

Each targeted frozen linear's output is multiplied by a trainable vector
(``d_out`` parameters), except the ``feedforward`` ones, whose *input* is
(``d_in``): the paper's ``l_k``, ``l_v`` and ``l_ff`` are targets ``k``,
``v`` and ``fc2`` (its input is the MLP's inner activation), the default.
``k``/``v`` split timm's fused ``attn.qkv`` first; ``qkv`` scales all of
it (q too). Vectors start at 1: the model is unchanged at init. ViT-B/16 at
the default: 12 * (768 + 768 + 3,072) = 55,296. Mergeable through peft's
``merge_and_unload`` (rows, or columns for feed-forward targets, scaled).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from . import _hf_peft as hf
from ._registry import register_method


class PeftIA3HP(hf.TargetsHP):
    targets: tuple[hf.Role, ...] = Field(("k", "v", "fc2"), min_length=1, description=hf.TARGETS_DOC)
    feedforward: tuple[hf.Role, ...] = Field(
        ("fc2",), description="targets whose input, not output, is rescaled (peft's feedforward_modules)"
    )

    @model_validator(mode="after")
    def _feedforward_in_targets(self) -> "PeftIA3HP":
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"feedforward: {list(self.feedforward)} must be among targets {list(self.targets)}")
        return self


def apply(model: nn.Module, hp: PeftIA3HP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.IA3Config(
        target_modules=paths, feedforward_modules=hf.role_paths(paths, hp.feedforward)))  # fmt: skip


METHOD = register_method("peft_ia3", PeftIA3HP, apply, hf.merge)
