"""Selective tuning: train whole transformer blocks, or chosen module types in them.

``blocks`` picks blocks by index into ``model.blocks`` (python style: ``-1``
is the last block, so ``(-3, -2, -1)`` is ``(9, 10, 11)`` on ViT-B/16);
``modules`` picks what trains inside each chosen block, by module path and
type, never by a substring of parameter names:

- ``all``: every parameter of the block (norms, attention, MLP, layer-scale);
- ``attn`` / ``mlp``: the whole ``attn`` / ``mlp`` module (``qkv`` + ``proj``,
  ``fc1`` + ``fc2`` in a timm ViT; the reference study's ``*_type: full``);
- ``qkv``, ``proj``, ``fc1``, ``fc2``: that one linear (weight and bias);
- ``norm``: the block's ``norm1`` and ``norm2`` LayerNorms.

The reference study's ``--block_index`` / ``--attention_index`` /
``--mlp_index`` with ``--attention_type`` / ``--mlp_type`` map to
``blocks`` x ``modules`` (one index list for all chosen types). Unlike the
reference, block 1 is only block 1 (its substring match also unfroze
blocks 10 and 11). Mergeable trivially: only native timm tensors change.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* block i selects block i only (the reference's substring match on '1' also unfreezes blocks 10 and 11)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from ..errors import InputError
from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import transformer_blocks

Part = Literal["all", "attn", "qkv", "proj", "mlp", "fc1", "fc2", "norm"]
# module paths inside a block, and the type each must have
_PARTS: dict[str, tuple[tuple[str, type[nn.Module]], ...]] = {
    "all": (("", nn.Module),),
    "attn": (("attn", nn.Module),),
    "qkv": (("attn.qkv", nn.Linear),),
    "proj": (("attn.proj", nn.Linear),),
    "mlp": (("mlp", nn.Module),),
    "fc1": (("mlp.fc1", nn.Linear),),
    "fc2": (("mlp.fc2", nn.Linear),),
    "norm": (("norm1", nn.LayerNorm), ("norm2", nn.LayerNorm)),
}


class SelectiveHP(HParams):
    """Which blocks train (``blocks``) and what inside each of them (``modules``)."""

    blocks: tuple[int, ...] = Field(
        (-1,),
        min_length=1,
        description="indices of the transformer blocks to tune; negative counts from the end "
        "(-1 = last block); out of range for the backbone is an error",
    )
    modules: tuple[Part, ...] = Field(
        ("all",),
        min_length=1,
        description="what trains in each chosen block: all | attn | qkv | proj | mlp | fc1 | fc2 | norm "
        "(attn = qkv + proj, mlp = fc1 + fc2, norm = norm1 + norm2)",
    )

    @field_validator("blocks", "modules")
    @classmethod
    def _unique(cls, v: tuple) -> tuple:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {list(v)}")
        return v

    @field_validator("modules")
    @classmethod
    def _all_alone(cls, v: tuple) -> tuple:
        if "all" in v and len(v) > 1:
            raise ValueError(f"'all' already covers {[m for m in v if m != 'all']}; give it alone")
        return v


def _block_indices(hp: SelectiveHP, depth: int) -> list[int]:
    chosen: dict[int, int] = {}
    for i in hp.blocks:
        if not -depth <= i < depth:
            raise InputError(f"selective.blocks: index {i} out of range for a {depth}-block model")
        k = i % depth
        if k in chosen:
            raise InputError(f"selective.blocks: {chosen[k]} and {i} both name block {k} of a {depth}-block model")
        chosen[k] = i
    return sorted(chosen)


def apply(model: nn.Module, hp: SelectiveHP) -> nn.Module:
    freeze_all(model)
    blocks = transformer_blocks(model)
    for k in _block_indices(hp, len(blocks)):
        for part in hp.modules:
            for path, kind in _PARTS[part]:
                try:
                    module = blocks[k].get_submodule(path)
                except AttributeError:
                    module = None
                if not isinstance(module, kind):
                    raise TypeError(f"selective: blocks.{k}.{path} is not an {kind.__name__} in {type(model).__name__}")
                for p in module.parameters():
                    p.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    return model


DEVIATIONS = (
    "block i selects block i only (the reference's substring match on '1' also unfreezes blocks 10 and 11)",
)

METHOD = register_method("selective", SelectiveHP, apply, merge, deviations=DEVIATIONS)
