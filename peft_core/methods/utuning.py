"""U-Tuning (Jiang et al., 2023): parallel U-tuners beside the frozen attention and MLP of every block.

Rethinking Efficient Tuning Methods from a Unified Perspective (Jiang, Mao,
Huang, Zhang, Zhang, Zhang; arXiv 2303.00690). No official code was found;
V-PEFT Bench (arXiv 2402.02242) lists U-Tuning in its FGVC table only
(0.36M, a row copied from the U-Tuning paper) and ships no code for it, so
this follows the paper.

The paper writes every tuning method as ``x' = OP(x) + U(x)``: a frozen
operation ``OP`` and a *parallel* U-tuner ``U`` that reads the same input.
Two instantiations, in every block (ours: the paper's MHA and FFN tuners):

* beside the frozen multi-head attention, the prefix-form tuner: ``l``
  learnable keys and values per layer. ``Attn(x; [P_k; K], [P_v; V])`` equals
  ``(1 - lam(x)) Attn(x; K, V) + lam(x) softmax(x W_q P_k^T) P_v``, the frozen
  attention plus a parallel tuner (He et al. 2022, eq. 7, the derivation the
  paper builds on); it is computed in the concatenated form
  (:class:`~peft_core.methods.prefix.PrefixAttention`), which is the same
  function;
* beside the frozen MLP, the adapter-form tuner:
  ``mlp(u) + s * up(dropout(relu(down(u))))`` with ``u`` the MLP's input (after
  ``norm2``); ``down`` Kaiming-uniform, ``up`` zero (identity at init).

Choices where the paper is silent or was not recovered (ours): the tuner
sizes. The defaults ``prefix_length = 5``, ``bottleneck = 4`` are the small
sizes whose count, with the FGVC head added as in the table's Prefix row,
rounds to the published 0.36M (below); ``scale = 1``, no dropout, ReLU.
Either tuner can be switched off (size 0); with ``prefix_length = 0`` the
model is unchanged at initialisation. The prefixes are trunc-normal (std
0.02) free parameters, as in our ``prefix`` method.

Count on ViT-B/16 (d = 768, 12 blocks): prefixes ``12 * 2 * l * 768``,
adapters ``12 * (768 r + r + r 768 + 768)`` (the latter only when r > 0):
``18,432 l + 18,444 r + 9,216``; l = 5, r = 4: 175,152. V-PEFT Bench's FGVC
table says 0.36M, as for Prefix tuning, whose 0.36M is its length-10 prefixes
(184,320) plus the mean FGVC head (180,407); the same head convention gives
175,152 + 180,407 = 355,559, 0.36M (tested at that setting). The match is by
construction of our defaults, not a check of the paper's configuration, so
the published accuracies are not mapped to this method.

Not mergeable: the prefix tuner changes every attention's softmax, and the
adapter tuner is nonlinear.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from ._adapter import BottleneckAdapter, ParallelAdapter, embed_dim, factory_kwargs, vit_blocks
from ._common import freeze_all
from ._registry import HParams, register_method
from .prefix import PrefixAttention


class UTuningHP(HParams):
    prefix_length: int = Field(5, ge=0, description="prefix keys/values per attention (MHA U-tuner; 0 = none; our default)")
    bottleneck: int = Field(4, ge=0, description="hidden width of the adapter beside each MLP (FFN U-tuner; 0 = none; our default)")
    scale: float = Field(1.0, gt=0, description="multiplier s of the adapter tuner's output")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter tuner's hidden activation")

    @model_validator(mode="after")
    def _one_tuner(self) -> "UTuningHP":
        if self.prefix_length == 0 and self.bottleneck == 0:
            raise ValueError("prefix_length and bottleneck are both 0: U-Tuning needs at least one tuner")
        return self


def apply(model: nn.Module, hp: UTuningHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    for block in vit_blocks(model):
        if hp.prefix_length:
            block.attn = PrefixAttention(block.attn, hp.prefix_length)
        if hp.bottleneck:
            tuner = BottleneckAdapter(dim, hp.bottleneck, "lora_kaiming", hp.scale, hp.dropout, **factory_kwargs(block.mlp))
            block.mlp = ParallelAdapter(block.mlp, tuner)
    return model


METHOD = register_method("utuning", UTuningHP, apply, merge=None)
