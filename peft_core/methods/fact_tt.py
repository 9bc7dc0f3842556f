"""FacT-TT (Jie & Deng, 2023): tensor-train factorised weight increments shared across layers.

Every block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` gets
``dW = s * V M_l U`` with ``U`` (r x d) and ``V`` (d x r) shared by all layers
and a free per-layer core ``M_l`` (q, k, v, proj: r x r each; fc1: 4r x r;
fc2: r x 4r, acting slice-wise on the 4 d-wide chunks). On ViT-B/16 that is
``2 * 768 r + 12 * 12 r^2 = 1536 r + 144 r^2`` parameters. ``V`` starts at zero
(identity at init). Mergeable: each ``dW`` is folded into its timm linear.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew U, V and every core (trunc-normal std 0.02, zero bias), so V was not zero; here they start at the intended init (cell init='reference' reproduces it)
* q, k and v share one dropout draw over the fused qkv core output (reference: one draw each; same distribution)
"""

from __future__ import annotations

from torch import nn

from ._fact import FacTHP, TensorTrainFactors, apply_fact, merge_fact
from ._registry import register_method


class FacTTTHP(FacTHP):
    """FacT-TT hyper-parameters (reference grid: rank {8, 16, 32} x scale {0.01 .. 100})."""


def apply(model: nn.Module, hp: FacTTTHP) -> nn.Module:
    return apply_fact(model, hp, TensorTrainFactors)


def merge(model: nn.Module) -> nn.Module:
    return merge_fact(model)


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew U, V and every core (trunc-normal std 0.02, zero bias), so V was not zero; here they start at the intended init (cell init='reference' reproduces it)",
    'q, k and v share one dropout draw over the fused qkv core output (reference: one draw each; same distribution)',
)

METHOD = register_method("fact_tt", FacTTTHP, apply, merge, deviations=DEVIATIONS)
