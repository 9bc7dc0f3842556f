"""Houlsby adapter (Houlsby et al., 2019): bottleneck adapters after attention and after the MLP.

In every block, the attention output ``a`` becomes ``a + s * A1(a)`` and the
MLP output ``h`` becomes ``h + s * A2(h)``, each inside its residual branch,
before the block's layer-scale (``ls1``/``ls2``) and drop-path (the reference
study's ``rand_h_adapter``: ``sequential_after`` on both sub-layers), with
``A(x) = up(dropout(relu(down(x))))``. On ViT-B/16 it trains
``24 * (2 * 768 b + b + 768) = 36,888 b + 18,432`` parameters.

Not mergeable: the ReLU between the down- and up-projection makes the update
a nonlinear function of the features, so it can not be folded into the
frozen linear weights.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projections were not zero and all inits started alike; here they start at the intended init (cell init='reference' reproduces it)
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


class HoulsbyHP(HParams):
    bottleneck: int = bottleneck_field(8)
    init: Init = init_field("xavier")
    scaler: float = scaler_field(1.0)
    dropout: float = dropout_field()


def apply(model: nn.Module, hp: HoulsbyHP) -> nn.Module:
    freeze_all(model)
    return add_sequential_adapters(model, hp, ("attn", "mlp"))


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projections were not zero and all inits started alike; here they start at the intended init (cell init='reference' reproduces it)",
    "init='zero': up-projection zero, down Kaiming-uniform (the reference's code zeroes down.weight and up.bias, leaving up.weight random)",
    "the block's layer-scale and drop-path act once on sub-layer + adapter (reference: a second time around the adapter, with a second drop-path mask)",
)

METHOD = register_method("houlsby", HoulsbyHP, apply, merge=None, deviations=DEVIATIONS)
