"""Pfeiffer adapter (Pfeiffer et al., 2021): a bottleneck adapter after each block's MLP.

Every block's MLP output ``h`` becomes ``h + s * up(dropout(relu(down(h))))``,
inside the residual branch, before the block's layer-scale ``ls2`` and
drop-path (the reference study's ``ft_mlp_mode: sequential_after``). On
ViT-B/16 it trains ``12 * (2 * 768 b + b + 768) = 18,444 b + 9,216``
parameters. ``init`` picks the reference's zero / random (xavier) / LoRA-style
variants (its ``zero_adapter``, ``rand_p_adapter``, ``lora_p_adapter``).

Not mergeable: the ReLU between the down- and up-projection makes the update
a nonlinear function of the features, so it can not be folded into the
frozen linear weights.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero and all inits started alike; here they start at the intended init (cell init='reference' reproduces it)
* init='zero': up-projection zero, down Kaiming-uniform (the reference's code zeroes down.weight and up.bias, leaving up.weight random)
* the block's layer-scale and drop-path act once on sub-layer + adapter (reference: a second time around the adapter, with a second drop-path mask)
"""

from __future__ import annotations

from torch import nn

from ._adapter import (
    Init,
    add_sequential_adapters,
    bottleneck_field,
    dropout_field,
    init_field,
    scaler_field,
)
from ._common import freeze_all
from ._registry import HParams, register_method


class AdapterHP(HParams):
    bottleneck: int = bottleneck_field(8)
    init: Init = init_field("lora_xavier")
    scaler: float = scaler_field(1.0)
    dropout: float = dropout_field()


def apply(model: nn.Module, hp: AdapterHP) -> nn.Module:
    freeze_all(model)
    return add_sequential_adapters(model, hp, ("mlp",))


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero and all inits started alike; here they start at the intended init (cell init='reference' reproduces it)",
    "init='zero': up-projection zero, down Kaiming-uniform (the reference's code zeroes down.weight and up.bias, leaving up.weight random)",
    "the block's layer-scale and drop-path act once on sub-layer + adapter (reference: a second time around the adapter, with a second drop-path mask)",
)

METHOD = register_method("adapter", AdapterHP, apply, merge=None, deviations=DEVIATIONS)
