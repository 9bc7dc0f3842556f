"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of pre-trained and fine-tuned models.

For a mergeable method the fine-tuned cell is first merged into a plain timm
model; then every backbone tensor is interpolated,
``theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned``,
which for a PEFT method is the pre-trained weights plus ``alpha`` times the
merged delta. The classification head has no pre-trained counterpart for a
new task unless one is given (e.g. a CLIP zero-shot head): without it the
fine-tuned head is kept at every alpha, so ``alpha = 0`` is the pre-trained
backbone read out by the fine-tuned head and ``alpha = 1`` the fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import backbones
from .cells import CellSpec
from .data import load_split
from .errors import InputError
from .merge import load_cell_model
from .methods import get_method
from .methods._common import classifier
from .train import evaluate


def interpolate(
    pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * pretrained + alpha * finetuned`` where both have a tensor; finetuned elsewhere."""
    out = {}
    for key, tuned in finetuned.items():
        base = pretrained.get(key)
        out[key] = tuned if base is None else torch.lerp(base.to(tuned.dtype), tuned, alpha)
    return out


def head_keys(model: torch.nn.Module) -> set[str]:
    head = classifier(model)
    prefix = next(name for name, mod in model.named_modules() if mod is head)
    return {f"{prefix}.{k}" for k in head.state_dict()}


@torch.no_grad()
def wise_models(
    spec: CellSpec,
    model: torch.nn.Module,
    alphas: list[float],
    checkpoint: str | Path | None = None,
    zero_shot_head: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[float, torch.nn.Module]]:
    """The plain timm model at each alpha (one model, reloaded in place: use it before the next one)."""
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise InputError(f"alphas: each must be within [0, 1] (got {alphas})")
    method = get_method(spec.method)
    if not method.mergeable:
        raise InputError(f"{spec.method}: WiSE-FT needs a mergeable method (weights to interpolate)")
    tuned = {k: v.detach().clone() for k, v in method.merge(model).state_dict().items()}
    plain = backbones.build(
        spec.backbone.model, checkpoint or spec.backbone.checkpoint, spec.num_classes, 0.0, spec.backbone.kwargs
    )
    pretrained = {k: v.detach().clone() for k, v in plain.state_dict().items() if k not in head_keys(plain)}
    pretrained.update(zero_shot_head or {})
    for alpha in alphas:
        plain.load_state_dict(interpolate(pretrained, tuned, alpha), strict=True)
        yield alpha, plain.eval()


@torch.no_grad()
def wise_curve(
    cell_dir: str | Path,
    eval_data: dict[str, str | Path],
    alphas: list[float],
    checkpoint: str | Path | None = None,
    zero_shot_head: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy on each named eval split at each alpha (rows of a tidy table)."""
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise InputError(f"alphas: each must be within [0, 1] (got {alphas})")
    spec, model = load_cell_model(Path(cell_dir), checkpoint)
    if not get_method(spec.method).mergeable:
        raise InputError(f"{spec.method}: WiSE-FT needs a mergeable method (weights to interpolate)")
    splits = {name: load_split(path) for name, path in eval_data.items()}
    rows = []
    for alpha, plain in wise_models(spec, model, alphas, checkpoint, zero_shot_head):
        for name, split in splits.items():
            pred = evaluate(plain, spec, split.images).argmax(1)
            rows.append(
                {"cell": spec.cell_id, "dataset": spec.dataset, "method": spec.method, "alpha": alpha,
                 "split": name, "accuracy": float((pred == split.labels).float().mean())}
            )  # fmt: skip
    return rows
