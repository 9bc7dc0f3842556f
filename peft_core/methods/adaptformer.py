"""AdaptFormer (Chen et al., 2022): a scaled bottleneck adapter in parallel with each block's MLP.

Every block's MLP branch becomes ``mlp(norm2(x)) + s * up(dropout(relu(down(x))))``,
the adapter reading the residual stream ``x`` before ``norm2`` (the reference
study's ``ft_mlp_mode: parallel``, ``ft_mlp_ln: before``, as in AdaptFormer's
own code), the sum then passing the block's layer-scale ``ls2`` and
drop-path. To see the un-normalised stream the wrapper holds the frozen
``norm2`` itself and the block's ``norm2`` becomes ``nn.Identity``. Default
init ``lora_kaiming`` zeroes the up-projection, so the model is unchanged at
init. On ViT-B/16 it trains ``12 * (2 * 768 b + b + 768) = 18,444 b + 9,216``
parameters.

Not mergeable: the ReLU between the down- and up-projection makes the update
a nonlinear function of the features, so it can not be folded into the
frozen linear weights.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero; here they start at the intended init (cell init='reference' reproduces it)
* one drop-path mask for the MLP and its parallel adapter (reference: a separate mask for each branch)
"""

from __future__ import annotations

from torch import nn

from ._adapter import (
    BottleneckAdapter,
    Init,
    PreNormParallelAdapter,
    bottleneck_field,
    dropout_field,
    embed_dim,
    factory_kwargs,
    init_field,
    scaler_field,
    vit_blocks,
)
from ._common import freeze_all
from ._registry import HParams, register_method


class AdaptFormerHP(HParams):
    bottleneck: int = bottleneck_field(64)
    scaler: float = scaler_field(0.1)
    init: Init = init_field("lora_kaiming")
    dropout: float = dropout_field()


def apply(model: nn.Module, hp: AdaptFormerHP) -> nn.Module:
    freeze_all(model)
    dim = embed_dim(model)
    for block in vit_blocks(model):
        adapter = BottleneckAdapter(
            dim, hp.bottleneck, hp.init, hp.scaler, hp.dropout, **factory_kwargs(block.mlp)
        )
        block.mlp = PreNormParallelAdapter(block.norm2, block.mlp, adapter)
        block.norm2 = nn.Identity()
    return model


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew the down/up projections (trunc-normal std 0.02, zero bias), so the up-projection was not zero; here they start at the intended init (cell init='reference' reproduces it)",
    'one drop-path mask for the MLP and its parallel adapter (reference: a separate mask for each branch)',
)

METHOD = register_method("adaptformer", AdaptFormerHP, apply, merge=None, deviations=DEVIATIONS)
