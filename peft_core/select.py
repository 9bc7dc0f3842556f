"""Model selection on validation accuracy only.

The selection reads tuning cells' ``metrics.json`` and refuses any whose
evaluated split is not the tuning-evaluation split: test numbers can not
influence what is chosen. Ties: fewer trainable parameters, then the order in
which the config lists the configurations. Diverged cells rank last.
"""

from __future__ import annotations

import math
from typing import Any

from .cells import CellSpec
from .errors import InputError


def _score(metrics: dict[str, Any]) -> float:
    acc = metrics.get("accuracy")
    return -math.inf if acc is None or metrics.get("status") != "ok" or math.isnan(acc) else acc


def select(candidates: list[tuple[CellSpec, dict[str, Any]]], eval_split: str) -> dict[str, Any]:
    """Pick one configuration from ``(spec, metrics)`` pairs given in listed order."""
    if not candidates:
        raise InputError("selection: no candidate cells")
    for spec, m in candidates:
        if m.get("eval_split") != eval_split or spec.eval_split != eval_split:
            raise InputError(
                f"selection: cell {spec.cell_id} was evaluated on {m.get('eval_split')!r}, "
                f"expected the validation split {eval_split!r}"
            )
    ranked = sorted(
        range(len(candidates)),
        key=lambda i: (-_score(candidates[i][1]), candidates[i][1]["trainable_params"], i),
    )
    best_spec, best = candidates[ranked[0]]
    return {
        "dataset": best_spec.dataset,
        "method": best_spec.method,
        "selected_on": eval_split,
        "chosen": best_spec.cell_id,
        "chosen_spec": best_spec.model_dump(mode="json"),
        "val_accuracy": best.get("accuracy"),
        "trainable_params": best["trainable_params"],
        "candidates": [
            {
                "cell": s.cell_id,
                "hparams": s.hparams,
                "lr": s.lr,
                "weight_decay": s.weight_decay,
                "accuracy": m.get("accuracy"),
                "status": m.get("status"),
                "trainable_params": m["trainable_params"],
            }
            for s, m in candidates
        ],
    }


def grid_selection(candidates: list[tuple[CellSpec, dict[str, Any]]]) -> dict[str, Any]:
    """What a grid selection adds to the selection file: its cost in training images (every cell's
    full budget on its training split; None for cells recorded before ``n_train`` was)."""
    sizes = [m.get("n_train") for _, m in candidates]
    images = None if None in sizes else sum(n * s.epochs for n, (s, _) in zip(sizes, candidates))
    return {"strategy": "grid", "selection_images": images}
