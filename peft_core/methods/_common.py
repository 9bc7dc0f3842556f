"""Helpers shared by the method modules and the engine.

Parameters are counted in exactly one place (:func:`count_trainable`), so a
method's reported size can never drift from what the optimiser trains.
"""

from __future__ import annotations

from torch import nn


def classifier(model: nn.Module) -> nn.Module:
    """The classification head of a timm model (``get_classifier()``)."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no classification head module")
    return head


def head_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in classifier(model).parameters()}


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module) -> None:
    for p in classifier(model).parameters():
        p.requires_grad_(True)


def count_trainable(model: nn.Module, exclude_head: bool = True) -> int:
    """Number of trainable parameter elements, excluding the head by default."""
    skip = head_param_ids(model) if exclude_head else set()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_head(model: nn.Module) -> int:
    return sum(p.numel() for p in classifier(model).parameters())


def count_backbone(model: nn.Module) -> int:
    """All parameters of the model that are not in the head, trainable or not."""
    skip = head_param_ids(model)
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def trainable_names(model: nn.Module, exclude_head: bool = True) -> list[str]:
    skip = head_param_ids(model) if exclude_head else set()
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
