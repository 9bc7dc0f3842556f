"""NOAH (Zhang et al., 2022): a per-block mix of prompts, LoRA and adapter, found by neural prompt search.

Neural Prompt Search (Zhang, Zhou, Liu; arXiv 2206.04673, TPAMI 2024);
source repository ZhangYuanhan-AI/NOAH (``model/supernet_transformer_prompt.py``,
``model/module/{qkv_super_prompt,adapter_super}.py``, ``supernet_train_prompt.py``,
``evolution.py``, the searched subnets in ``experiments/NOAH/subnet/VTAB/``).
V-PEFT Bench lists it in its VTAB-1k table (0.43M).

Every block ``i`` gets ``p_i`` deep prompt tokens, a rank-``r_i`` LoRA on the
fused ``attn.qkv`` and a width-``a_i`` adapter on the MLP output
(peft_core/methods/_noah_modules.py). The sizes are chosen per data set by
NOAH's search, a **prestep** read from the tuning splits only
(``reads="train+val"``): a supernet over all sizes trains on ``train800``, an
evolutionary search scores subnets on ``val200`` under ``param_limit``
(peft_core/methods/_noah_search.py); the searched subnet is then retrained
from scratch by the ordinary cells (the study's lr x wd grid, selection on
validation as for every method), and the final runs retrain the same subnet
on ``train800val200``.

Search space: each size from ``choices``; the default ``(1, 5, 10)`` is the
set of sizes NOAH's released VTAB-1k subnets use (its supernet yaml lists
``{5, 10, 50, 100}`` with depth choices, but the retrained subnets it ships
draw every size from ``{1, 5, 10}``).

Count on ViT-B/16 (d = 768, qkv 2304) of a subnet, head excluded:
``sum_i p_i d + r_i (d + 3d) + [a_i > 0] (2 a_i d + a_i + d)``. The largest
subnet of the default space (every size 10), the data-free placeholder, is
``12 (7,680 + 30,720 + 16,138) = 654,456``. NOAH's released CIFAR-100
subnet (``ViT-B_prompt_cifar100.yaml``, RETRAIN) counts 320,330 = 0.32M
(0.40M with its 100-class head) against V-PEFT Bench's 0.43M (a mean over
data sets of searched subnets; tested), so the column is not mapped: a
searched subnet's own count is in its prestep's ``.json`` and in every
cell's ``trainable_params``.

Not mergeable (prompt tokens). Not the identity at init (prompts join the
attention); LoRA's B and the adapter's up-projection start at zero.

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* no model-level prompt tokens before block 0 (NOAH's supernet also concatenates shared prompt tokens with their own position embedding before the blocks)
* the adapter's up-projection starts at zero (NOAH: xavier), so the adapter starts as the identity
* the supernet is trained with a cosine schedule at lr supernet_lr and no warm-up (NOAH's supernet_train_prompt.py: its timm scheduler and warm-up)
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ._common import freeze_all, unfreeze_head
from ._evolution import SearchHP
from ._noah_modules import build, subnet_params
from ._noah_search import search, train
from ._prompts import vit_geometry
from ._registry import Prestep, register_method


class NOAHHP(SearchHP):
    choices: tuple[int, ...] = Field((1, 5, 10), description="sizes each tuner of each block may take (0: off)")
    param_limit: float = Field(0.64, gt=0, description="largest subnet the search may choose, M parameters, head excluded")
    supernet_lr: float = Field(5e-4, gt=0, description="supernet AdamW learning rate (NOAH's default)")

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 0 for c in v) or max(v) == 0 or len(set(v)) != len(v):
            raise ValueError("choices: distinct sizes >= 0, at least one of them > 0")
        return tuple(sorted(v))


def _dims(model) -> tuple[int, int]:
    blocks, dim, _ = vit_geometry(model)
    return dim, blocks[0].attn.qkv.out_features


def placeholder(model, hp: NOAHHP) -> dict[str, torch.Tensor]:
    """The largest subnet of the space (an upper bound of any searched subnet's count)."""
    return {"subnet": torch.full((len(vit_geometry(model)[0]), 3), max(hp.choices), dtype=torch.long)}


def compute(model, hp: NOAHHP, data) -> dict[str, torch.Tensor]:
    """Supernet on the training split, evolutionary search on validation: the chosen subnet."""
    gen = torch.Generator().manual_seed(data.seed)
    dims = _dims(model)
    depth = len(vit_geometry(model)[0])
    freeze_all(model)
    build(model, placeholder(model, hp)["subnet"])
    unfreeze_head(model)
    train(model, hp, data, gen, depth)
    best, acc, scored = search(model, hp, data, gen, depth, dims)
    data.log(f"noah: chose {best.tolist()} ({subnet_params(best, *dims):,} params), val top-1 {acc:.4f}, {scored} scored")
    return {"subnet": best, "val_accuracy": torch.tensor([acc]), "scored": torch.tensor([scored])}


def prestep_key(hp: NOAHHP) -> dict:
    return hp.model_dump(mode="json")


def apply(model, hp: NOAHHP, state: dict | None = None):
    freeze_all(model)
    sizes = (state or placeholder(model, hp))["subnet"]
    if sizes.dtype not in (torch.int32, torch.int64) or (sizes < 0).any():
        raise ValueError("noah: the prestep's subnet must hold sizes >= 0")
    build(model, sizes.long())
    return model


DEVIATIONS = (
    "no model-level prompt tokens before block 0 (NOAH's supernet also concatenates shared prompt tokens with their own position embedding before the blocks)",
    "the adapter's up-projection starts at zero (NOAH: xavier), so the adapter starts as the identity",
    "the supernet is trained with a cosine schedule at lr supernet_lr and no warm-up (NOAH's supernet_train_prompt.py: its timm scheduler and warm-up)",
)

METHOD = register_method(
    "noah",
    NOAHHP,
    apply,
    None,
    deviations=DEVIATIONS,
    prestep=Prestep(compute=compute, key=prestep_key, placeholder=placeholder, reads="train+val"),
)
