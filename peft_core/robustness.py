"""Robustness under distribution shift: WiSE-FT curves of the final runs on ID and shifted test sets.

For every final run of one data set (the rows of its ``aggregate_dataset``
table with ``stage == "final"``; cells under ``<results>/cells/<dataset>/
<method>/<cell>/``):

* a **mergeable** method (full fine-tuning included) is merged into a plain
  timm model and interpolated with the pre-trained backbone at each alpha of
  the grid (:func:`peft_core.wise.wise_models`; alpha = 0 is the pre-trained
  backbone read out by the fine-tuned head, alpha = 1 the fine-tuned model);
* a **non-mergeable** method (prompts, sequential adapters) has no weights to
  interpolate: only alpha = 1, the fine-tuned model itself, is evaluated.

Each model is scored on the ID test split (``eval_set = "id"``) and on every
shifted set. A shifted set with a class map (ImageNet-A/-R: 200 of
ImageNet-1k's classes) is scored by restricting the logits to the mapped ID
classes before the argmax (:func:`restricted_argmax`), so accuracy is over
the shifted set's own labels. Nothing here selects anything: the alpha grid
is reported whole, and the chosen configurations come from the validation
split (the selection files are only checked against the final runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import InputError

ROW_COLUMNS = [
    "dataset", "method", "mergeable", "cell", "seed", "alpha", "eval_set", "distribution", "split",
    "accuracy", "n_eval", "n_classes",
]  # fmt: skip
ID_SET = "id"


@dataclass(frozen=True)
class EvalSet:
    """One test set: the ID test split (``distribution == "id"``) or a shifted one."""

    name: str
    distribution: str  # "id" or "ood"
    split: str
    cache: Path
    class_map: tuple[int, ...] | None = None


def restricted_argmax(logits: torch.Tensor, class_map: Sequence[int] | None) -> torch.Tensor:
    """Prediction in the eval set's label space: argmax over the mapped ID classes only.

    ``class_map[i]`` is the ID class of the eval set's label ``i``; without a
    map the eval set has the ID classes and this is the plain argmax.
    """
    if class_map is None:
        return logits.argmax(1)
    return logits[:, torch.as_tensor(list(class_map), device=logits.device)].argmax(1)


def plan_sets(plan: dict[str, Any], caches: dict[str, str]) -> list[EvalSet]:
    """The eval sets of a plan (``{"sets": {name: {distribution, split, class_map}}}``) with their cache files."""
    sets = plan.get("sets") or {}
    if set(sets) != set(caches):
        raise InputError(f"--eval: caches for {sorted(caches)}, but the plan names {sorted(sets)}")
    out = []
    for name, s in sets.items():
        cmap = s.get("class_map")
        cmap = tuple(cmap) if cmap is not None else None
        out.append(EvalSet(name, s["distribution"], s["split"], Path(caches[name]), cmap))
    return out


def load_eval(es: EvalSet, device: torch.device | str = "cpu"):
    """The cached split (on ``device``), with its labels checked against the class map."""
    from .data import load_split

    split = load_split(es.cache, device)
    if es.class_map is not None and len(split.labels) and int(split.labels.max()) >= len(es.class_map):
        raise InputError(
            f"{es.cache}: label {int(split.labels.max())} of eval set {es.name!r} has no entry in its "
            f"class_map ({len(es.class_map)} entries)"
        )
    return split


def own_predictions(cell_dir: Path, spec, es: EvalSet, split) -> tuple[float, int] | None:
    """The run's saved accuracy on ``es`` when ``es`` is the very split it was evaluated on (same labels)."""
    from .results import PREDICTIONS

    path = cell_dir / PREDICTIONS
    if es.distribution != "id" or es.class_map is not None or es.split != spec.eval_split or not path.is_file():
        return None
    p = pd.read_parquet(path).sort_values("index")
    if len(p) != len(split.labels) or not (p.label.to_numpy() == split.labels.cpu().numpy()).all():
        return None
    return float((p.pred == p.label).mean()), len(p)


def score(
    model: torch.nn.Module, spec, sets: list[tuple[EvalSet, Any]], cell_dir: Path | None = None
) -> list[tuple[EvalSet, float, int]]:
    """(eval set, accuracy, n) of one model on each set.

    With ``cell_dir`` the model is that cell's fine-tuned model (alpha = 1):
    on the split the run was evaluated on, its saved predictions are used.
    """
    from .train import evaluate

    out = []
    for es, split in sets:
        saved = own_predictions(cell_dir, spec, es, split) if cell_dir is not None else None
        if saved is not None:
            out.append((es, *saved))
            continue
        pred = restricted_argmax(evaluate(model, spec, split.images), es.class_map)
        n = len(split.labels)
        out.append((es, float((pred == split.labels).float().mean()) if n else math.nan, n))
    return out


def cell_rows(
    cell_dir: Path,
    sets: list[tuple[EvalSet, Any]],
    alphas: list[float],
    checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Rows of one final run: every alpha if its method merges, else alpha = 1 only.

    alpha = 1 is always the fine-tuned model as trained (not its merged copy),
    scored before merging (a method's merge may fold its modules in place).
    """
    from .merge import load_cell_model
    from .methods import get_method
    from .wise import wise_models

    spec, model = load_cell_model(cell_dir, checkpoint)
    mergeable = get_method(spec.method).mergeable
    scored = [(1.0, score(model.to(device), spec, sets, cell_dir))] if 1.0 in alphas or not mergeable else []
    if mergeable:
        others = [a for a in alphas if a != 1.0]
        scored += [(alpha, score(m.to(device), spec, sets)) for alpha, m in wise_models(spec, model, others, checkpoint)]
    rows = []
    for alpha, results in sorted(scored, key=lambda t: t[0]):
        for es, acc, n in results:
            rows.append(
                {"dataset": spec.dataset, "method": spec.method, "mergeable": mergeable, "cell": spec.cell_id,
                 "seed": spec.seed, "alpha": float(alpha), "eval_set": es.name, "distribution": es.distribution,
                 "split": es.split, "accuracy": acc, "n_eval": n,
                 "n_classes": len(es.class_map) if es.class_map is not None else spec.num_classes}
            )  # fmt: skip
    return rows


_FINAL_ONLY = ("train_split", "eval_split", "seed")


def final_cells(table: pd.DataFrame, results_root: Path, selections: list[dict[str, Any]]) -> list[Path]:
    """The finished final runs of one data set's table, each checked to descend from its method's selection."""
    from .results import SPEC, read_json

    chosen = {s["method"]: s["chosen_spec"] for s in selections}
    final = table[(table.stage == "final") & (table.status == "ok")]
    cells = []
    for r in final.itertuples():
        cell = results_root / "cells" / str(r.dataset) / str(r.method) / str(r.cell)
        if not (cell / SPEC).is_file():
            raise InputError(f"{cell / SPEC}: not found (is --results the study's results directory?)")
        if r.method in chosen:
            spec = read_json(cell / SPEC)
            same = {k: v for k, v in spec.items() if k not in _FINAL_ONLY}
            if same != {k: v for k, v in chosen[r.method].items() if k not in _FINAL_ONLY}:
                raise InputError(f"{cell}: final run is not of the configuration selected for {r.dataset}/{r.method}")
        cells.append(cell)
    return cells


def robustness_rows(
    tables: list[Path],
    results_root: Path,
    selections: list[Path],
    plan: dict[str, Any],
    caches: dict[str, str],
    checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Every final run of the tables, scored along the alpha grid on every eval set of the plan."""
    from .results import read_json

    alphas = [float(a) for a in plan.get("alphas") or [1.0]]
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise InputError(f"alphas: each must be within [0, 1] (got {alphas})")
    sets = [(es, load_eval(es, device)) for es in plan_sets(plan, caches)]
    chosen = [read_json(p) for p in selections]
    rows: list[dict[str, Any]] = []
    for table in tables:
        for cell in final_cells(pd.read_parquet(table), results_root, chosen):
            rows += cell_rows(cell, sets, alphas, checkpoint, device)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def build_plan(study, dataset: str) -> dict[str, Any]:
    """What the robustness stage of one data set evaluates (class maps resolved): the rule's params."""
    sets: dict[str, dict[str, Any]] = {
        ID_SET: {"distribution": "id", "split": study.cfg.data.final_eval, "class_map": None}
    }
    for name, ood in study.ood_sets(dataset).items():
        sets[name] = {"distribution": "ood", "split": ood.split, "class_map": study.ood_class_map(dataset, name)}
    return {"dataset": dataset, "alphas": study.robustness_alphas(), "sets": sets}


def plan_json(study, dataset: str) -> str:
    return json.dumps(build_plan(study, dataset), sort_keys=True, separators=(",", ":"))
