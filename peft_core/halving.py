"""Successive halving over the tuning grid (``tuning: {strategy: halving, eta, min_epochs}``).

The reference grid trains every configuration (method hyper-parameters x lr x wd)
for the full ``train.epochs``. Halving trains all of them for ``min_epochs``, ranks
them by validation accuracy, and lets the top ``ceil(n / eta)`` continue to ``eta``
times the budget, and so on up to ``train.epochs``; the best of the last rung is
selected. Selection stays on the validation split only.

Why it is planned this way:

* **No checkpoint.** The number of configurations in each rung is known when the
  DAG is built (:func:`plan_rungs`); *which* ones is read at run time from the
  previous rung's ranking file, as ``train_final`` reads the selection file. So
  ``snakemake -n`` lists every job, and SLURM's group-components keep working.
* **The same cells as the grid.** A rung trains the grid's own cell (same spec,
  same id, same directory) and stops at its budget; the learning-rate schedule
  stays that of the full budget. The state is saved in the cell's ``resume.pt``
  with a record of the validation accuracy (``rungs/e<epochs>.json``, with the
  code and input fingerprints that made it), and the next rung resumes from it.
  A promoted configuration's full-budget cell is therefore the grid's cell, bit
  for bit on CPU fp32, and grid and halving runs of a study share work.
* **Ties** rank by cell id, so a ranking never depends on file order.

**Noise-aware promotion** (``tuning.keep_within_se: z``; our addition, docs/deviations.md).
Plain halving cuts at the top ``ceil(n / eta)`` even where the configurations around the cut
cannot be told apart on a 200-image validation split. With ``z`` set, a rung also promotes
every configuration whose validation accuracy is within ``z`` standard errors of the rung's
best (:func:`within_noise`); the rest are dropped as they are under plain halving. How many
continue is then known only at run time, so the plan gives every later rung room for all the
configurations (:func:`plan_rungs`), and a job whose slots nobody was promoted to trains
nothing and writes an empty manifest. benchmarks/halving_replay.py measures what it costs and
what it saves (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .cells import CellSpec
from .errors import InputError
from .packs import (
    cell_lock,
    cell_path,
    drop_stale_resume,
    pack_id,
    record_verdict,
    reuse_verdict,
    rung_record_path,
)
from .results import METRICS, read_json, write_json


@dataclass(frozen=True)
class Rung:
    """One rung of a (data set, method): its budget, its size and its jobs."""

    index: int
    epochs: int  # the budget: every cell of this rung is trained up to this epoch
    previous: int  # the budget of the rung before (0 for the first)
    size: int  # configurations trained in this rung
    parts: tuple[str, ...]  # job names: the tuning packs (rung 0) or chunks "c0", "c1", ... of ranked slots
    chunk: int  # slots per chunk (rungs after the first)
    promote: int  # configurations the next rung takes (0 for the last)

    def slots(self, part: str) -> tuple[int, int]:
        """[first, last) ranked positions of the previous rung that chunk ``part`` trains."""
        j = int(part.removeprefix("c"))
        return j * self.chunk, min((j + 1) * self.chunk, self.size)


def budgets(min_epochs: int, eta: int, epochs: int) -> list[int]:
    """Rung budgets: min_epochs, eta x that, ... capped at (and ending with) the full ``epochs``."""
    out = [min(min_epochs, epochs)]
    while out[-1] < epochs:
        out.append(min(out[-1] * eta, epochs))
    return out


def rung_sizes(n: int, eta: int, rungs: int) -> list[int]:
    """Configurations per rung: n, then ceil(n / eta) of each rung before."""
    sizes = [n]
    for _ in range(rungs - 1):
        sizes.append(math.ceil(sizes[-1] / eta))
    return sizes


def planned_sizes(n: int, eta: int, rungs: int, noise_aware: bool = False) -> list[int]:
    """The room of each rung: :func:`rung_sizes`, or ``n`` throughout under noise-aware promotion
    (how many continue is known only at run time)."""
    return [n] * rungs if noise_aware else rung_sizes(n, eta, rungs)


def split_images(path: str | Path) -> int:
    """The images in a split's cache: the validation split's size, noise-aware promotion's n."""
    from .data import load_split

    return len(load_split(path).labels)


def plan_rungs(
    packs: list[list[CellSpec]],
    eta: int,
    min_epochs: int,
    epochs: int,
    chunk: int | None = None,
    noise_aware: bool = False,
) -> list[Rung]:
    """The rungs of one (data set, method) whose tuning cells are ``packs``.

    Rung 0 trains each pack in one job, as the grid does; a later rung trains its
    ranked slots in chunks of ``chunk`` (default: one pack's size, the same job length
    as a pack's; 1 for methods with a prestep, whose cells of one job must share it).
    ``noise_aware`` (``tuning.keep_within_se``): a rung's size is the most it can hold,
    every configuration, since how many are promoted is known only at run time.
    """
    n = sum(len(p) for p in packs)
    chunk = max(1, chunk or len(packs[0]))
    steps = budgets(min_epochs, eta, epochs)
    sizes = planned_sizes(n, eta, len(steps), noise_aware)
    rungs = []
    for r, (b, size) in enumerate(zip(steps, sizes)):
        parts = tuple(pack_id(p) for p in packs) if r == 0 else tuple(f"c{j}" for j in range(math.ceil(size / chunk)))
        promote = sizes[r + 1] if r + 1 < len(sizes) else 0
        rungs.append(Rung(r, b, steps[r - 1] if r else 0, size, parts, chunk, promote))
    return rungs


def promoted_specs(ranking: dict[str, Any], first: int, last: int) -> list[dict[str, Any]]:
    """The specs (as dicts) at ranked positions [first, last) of a ranking, within its promotions.

    Slots beyond the planned room (``capacity``) are refused: the plan and the ranking disagree.
    Under noise-aware promotion fewer than the room may be promoted; slots past them give no spec.
    """
    room = ranking.get("capacity", ranking["promote"])
    if last > room:
        raise InputError(f"ranking of rung {ranking['rung']}: slots {first}..{last - 1} beyond its {room} promoted")
    return [row["spec"] for row in ranking["ranked"][first : min(last, ranking["promote"])]]


def within_noise(best: float, acc: float, n_eval: int, z: float) -> bool:
    """Whether ``acc`` is within ``z`` standard errors of ``best``, both accuracies on ``n_eval`` images.

    The standard error is the unpooled (Wald) one of a difference of two independent
    proportions, sqrt((p_b (1 - p_b) + p (1 - p)) / n_eval). The configurations are scored on
    the same images, whose errors are positively correlated, so the true error of their
    difference is smaller: the rule keeps more than it must, erring towards the grid.
    """
    se = math.sqrt((best * (1 - best) + acc * (1 - acc)) / n_eval)
    return best - acc <= z * se


def promotions(ranked: list[dict[str, Any]], room: int, eta: int | None = None, z: float | None = None,
               n_eval: int | None = None) -> int:  # fmt: skip
    """How many of a rung's ``ranked`` rows (best first) continue, at most ``room`` (the plan's).

    Plain halving (``z`` None): ``room``, the planned ``ceil(n / eta)``. Noise-aware: the top
    ``ceil(len(ranked) / eta)`` and every configuration within ``z`` standard errors of the best
    (:func:`within_noise`), up to the lowest-ranked such one (a promotion is a prefix of the
    ranking); a diverged configuration is never within noise.
    """
    if z is None:
        return min(room, len(ranked))
    if eta is None or n_eval is None or n_eval < 1:
        raise InputError("noise-aware promotion needs eta and the validation split's size")
    top = math.ceil(len(ranked) / eta)
    scores = [_score(row) for row in ranked]
    near = [i + 1 for i, s in enumerate(scores) if s > -math.inf and within_noise(scores[0], s, n_eval, z)]
    return min(room, max([top, *near]))


def _train_to(spec: CellSpec, out: Path, budget: int, train_cell, code, inputs, log) -> tuple[dict, Path, bool, str]:
    """(record, its path, reused, why it trained) of one cell at one budget (under the cell's lock)."""
    name = f"{spec.dataset}/{spec.method}/{spec.cell_id}"
    if budget >= spec.epochs:  # the last rung: the finished cell itself
        record, why = reuse_verdict(out, spec, code, inputs)
        path = out / METRICS
    else:
        path = rung_record_path(out, budget)
        record = read_json(path) if path.is_file() else None
        why = "not trained to this budget yet" if record is None else record_verdict(record, spec, code, inputs)
        record = None if why else record
    if record is not None:
        log(f"{name}: reused at {budget} epochs (same spec, code and inputs)")
        return record, path, True, ""
    log(f"{name}: training to {budget} of {spec.epochs} epochs ({why})")
    drop_stale_resume(out, spec, budget, code, inputs, log)
    record = train_cell(spec, out, budget if budget < spec.epochs else None)
    if budget < spec.epochs:
        record = {**record, "code": code, "inputs": inputs}
        write_json(path, record)
    return record, path, False, why


def run_rung(
    specs: list[CellSpec],
    budget: int,
    train_cell: Callable[[CellSpec, Path, int | None], dict[str, Any]],
    cells_root: str | Path,
    code: str | None,
    manifest: str | Path,
    log: Callable[[str], None],
    inputs: dict | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) each cell up to ``budget`` epochs, then write the rung part's manifest."""
    rows = []
    for spec in specs:
        out = cell_path(cells_root, spec)
        with cell_lock(out, log):
            record, path, reused, why = _train_to(spec, out, budget, train_cell, code, inputs, log)
        rows.append(
            {"cell": spec.cell_id, "dir": str(out), "record": str(path), "spec": spec.model_dump(mode="json"),
             "status": record["status"], "accuracy": record["accuracy"], "reused": reused, "trained_because": why or None}
        )  # fmt: skip
    write_json(manifest, {"budget": budget, "code": code, "cells": rows})
    return rows


def _score(record: dict[str, Any]) -> float:
    """A record's validation accuracy; -inf if it diverged or has none (ranked last)."""
    acc = record.get("accuracy")
    return -math.inf if acc is None or record.get("status") != "ok" or math.isnan(acc) else acc


def rank(rows: list[dict[str, Any]], records: list[dict[str, Any]], eval_split: str) -> list[dict[str, Any]]:
    """Rows of a rung's manifests, best validation accuracy first, ties by cell id; diverged last.

    Refuses a record evaluated on any split but the validation split.
    """
    for row, rec in zip(rows, records):
        if rec.get("eval_split") != eval_split or row["spec"]["eval_split"] != eval_split:
            raise InputError(f"ranking: cell {row['cell']} was evaluated on {rec.get('eval_split')!r}, "
                             f"expected the validation split {eval_split!r}")  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: (-_score(records[i]), rows[i]["cell"]))
    return [
        {"cell": rows[i]["cell"], "dir": rows[i]["dir"], "spec": rows[i]["spec"], "accuracy": records[i].get("accuracy"),
         "status": records[i].get("status"), "n_train": records[i].get("n_train")}
        for i in order
    ]  # fmt: skip


def ranking(manifests: list[Path], eval_split: str, rung: int, previous: int, promote: int, eta: int | None = None,
            keep_within_se: float | None = None, n_eval: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The ranking file of one rung, from its parts' manifests; ``images``: what the rung trained
    (each cell from the previous budget to this one, on its training split). ``promote``: the
    plan's room in the next rung; how many take it, :func:`promotions`."""
    parts = [read_json(p) for p in manifests]
    budget = {p["budget"] for p in parts}
    if len(budget) != 1:
        raise InputError(f"ranking of rung {rung}: parts trained to different budgets {sorted(budget)}")
    rows = [row for p in parts for row in p["cells"]]
    if len({r["cell"] for r in rows}) != len(rows):
        raise InputError(f"ranking of rung {rung}: a cell appears in two parts")
    ranked = rank(rows, [read_json(r["record"]) for r in rows], eval_split)
    epochs = budget.pop()
    images = sum((r["n_train"] or 0) * (epochs - previous) for r in ranked)
    first = rows[0]["spec"] if rows else {}
    n_promoted = promotions(ranked, promote, eta, keep_within_se, n_eval) if promote else 0
    return {"dataset": first.get("dataset"), "method": first.get("method"), "rung": rung, "epochs": epochs,
            "previous": previous, "selected_on": eval_split, "capacity": promote, "promote": n_promoted,
            "keep_within_se": keep_within_se, "n_eval": n_eval, "images": images, "ranked": ranked}  # fmt: skip


def halving_selection(rankings: list[dict[str, Any]]) -> dict[str, Any]:
    """What a halving selection adds to the selection file: its rungs and its cost in training images."""
    rungs = [{"rung": r["rung"], "epochs": r["epochs"], "configurations": len(r["ranked"]), "images": r["images"]}
             for r in rankings]  # fmt: skip
    z = rankings[0].get("keep_within_se") if rankings else None
    return {"strategy": "halving", "keep_within_se": z, "selection_images": sum(r["images"] for r in rankings),
            "rungs": rungs}  # fmt: skip


def last_rung_cells(rankings: list[dict[str, Any]]) -> list[str]:
    """The cell directories of the last rung (its full-budget cells), in ranked order."""
    last = max(rankings, key=lambda r: r["rung"])
    full = {row["spec"]["epochs"] for row in last["ranked"]}
    if full != {last["epochs"]}:
        raise InputError(f"ranking of rung {last['rung']}: budget {last['epochs']} is not the cells' full budget")
    return [row["dir"] for row in last["ranked"]]
