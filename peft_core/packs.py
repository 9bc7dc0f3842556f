"""Tuning packs: the optimiser sub-grid of one method configuration, trained by one job.

The reference study tunes every method configuration over lr x weight decay
(4 cells). Giving each cell its own Snakemake job makes the VTAB-1k study
~13,000 jobs, and Snakemake's per-job planning cost (~2 ms a job on a 2-core
machine) alone then exceeds half a minute; a queue wait per cell on SLURM is
worse. A *pack* is the cells of one (dataset, method, method configuration):
one job trains them one after another in one process.

Per-cell staleness is kept by content, not by the pack: a cell's directory
(``cells/<dataset>/<method>/<cell id>/``) is reused when its ``metrics.json``
names the same cell id, the same code stamp (the checksum of the engine and
the method's source files) and the same input fingerprints (sha256 of the
train and eval data caches and of the checkpoint it read, see
peft_core/fingerprint.py); otherwise it retrains and the log says why
("val200 changed", "checkpoint changed", "code changed"). So adding a learning rate to the grid makes a new
pack (its id hashes its cells) whose existing cells are reused and only the
new one trains; editing a method's file changes its code stamp, and every
cell of that method trains again. ``snakemake --forcerun train_pack`` reruns
packs but still reuses unchanged cells; delete a cell directory to retrain it.

A pack's output is a manifest written last and atomically: a pack killed
mid-cell has no manifest, so Snakemake reruns it, and the rerun reuses the
cells that finished and resumes a preempted one from its saved state.

One writer per cell: a pack holds an exclusive lock on ``<cell dir>.lock``
while it checks, trains and writes a cell, so a rerun started beside a job that
survived (e.g. after only Snakemake was killed) waits for it and then reuses
its result instead of training the same cell twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .cells import CellSpec, cell_hash
from .fingerprint import changed_inputs
from .results import METRICS, PREDICTIONS, RESUME, SPEC, WEIGHTS, read_json, write_json

CELL_FILES = (SPEC, PREDICTIONS, WEIGHTS, METRICS)


def pack_id(specs: list[CellSpec]) -> str:
    """10 hex characters naming exactly this list of cells."""
    return cell_hash({"pack": [s.cell_id for s in specs]})


def group_into_packs(specs: list[CellSpec]) -> list[list[CellSpec]]:
    """Consecutive cells sharing everything but lr and weight decay form one pack (order kept)."""
    packs: list[list[CellSpec]] = []
    last_key = None
    for spec in specs:
        key = json.dumps(spec.model_dump(mode="json", exclude={"lr", "weight_decay"}), sort_keys=True)
        if key != last_key:
            packs.append([])
            last_key = key
        packs[-1].append(spec)
    return packs


def cell_path(cells_root: str | Path, spec: CellSpec) -> Path:
    return Path(cells_root) / spec.dataset / spec.method / spec.cell_id


def read_code_stamp(path: str | Path) -> str:
    """One checksum for a ``peft-core code-stamp`` file (which lists one checksum per source file)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def reuse_verdict(
    cell_dir: Path, spec: CellSpec, code: str | None, inputs: dict | None, batched: bool = False
) -> tuple[dict[str, Any] | None, str]:
    """(metrics, "") if the finished cell can be reused, else (None, why it must (re)train).

    Reusable: all outputs present, and metrics.json (written last) is of this cell,
    this code, trained alone (``batched``: with its pack as one model, peft_core/batched.py;
    the two agree only to rounding, so they are never mixed) and, when ``inputs`` is
    given, the same input fingerprints.
    """
    if not (cell_dir / METRICS).is_file():
        return None, "not trained yet"
    if not all((cell_dir / name).is_file() for name in CELL_FILES):
        return None, "outputs incomplete"
    try:
        metrics = read_json(cell_dir / METRICS)
    except (OSError, ValueError):
        return None, "metrics.json unreadable"
    why = record_verdict(metrics, spec, code, inputs)
    if not why and bool(metrics.get("batched", False)) != batched:
        why = "trained batched" if metrics.get("batched") else "trained alone"
    return (None, why) if why else (metrics, "")


def record_verdict(record: dict[str, Any], spec: CellSpec, code: str | None, inputs: dict | None) -> str:
    """"" if a record (metrics.json, or a halving rung's record) is of this cell, code and inputs, else why not."""
    if record.get("cell") != spec.cell_id:
        return "metrics.json of another cell"
    if record.get("code") != code:
        return "code changed"
    return ", ".join(changed_inputs(record.get("inputs"), inputs)) if inputs is not None else ""


def rung_record_path(cell_dir: Path, epochs: int) -> Path:
    """The validation record of a cell trained to ``epochs`` by a halving rung (peft_core/halving.py)."""
    return cell_dir / "rungs" / f"e{epochs}.json"


def stale_resume(cell_dir: Path, spec: CellSpec, budget: int, code: str | None, inputs: dict | None) -> str:
    """Why the saved state ``resume.pt`` must not seed training up to ``budget`` epochs ("" if it may).

    A halving rung leaves its state there, with a record of the code and inputs that made it
    (:func:`rung_record_path`); a state of other code or inputs, or past the budget, is dropped.
    A preempted cell's state has no record and is resumed as before.
    """
    path = cell_dir / RESUME
    if not path.is_file():
        return ""
    import torch

    epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0)
    if epoch >= budget:
        return f"its saved state is at epoch {epoch}, not before {budget}"
    record = rung_record_path(cell_dir, epoch)
    why = record_verdict(read_json(record), spec, code, inputs) if record.is_file() else ""
    return f"its saved state of epoch {epoch} is stale: {why}" if why else ""


def drop_stale_resume(cell_dir: Path, spec: CellSpec, budget: int, code, inputs, log: Callable[[str], None]) -> None:
    why = stale_resume(cell_dir, spec, budget, code, inputs)
    if why:
        log(f"{cell_dir}: training from scratch ({why})")
        (cell_dir / RESUME).unlink()


def reusable_metrics(cell_dir: Path, spec: CellSpec, code: str | None, inputs: dict | None = None):
    """The cell's metrics if it can be reused, else None (see :func:`reuse_verdict`)."""
    return reuse_verdict(cell_dir, spec, code, inputs)[0]


def manifest_row(spec: CellSpec, out: Path, metrics: dict[str, Any], reused: bool, why: str) -> dict[str, Any]:
    """One cell's line in its pack's manifest."""
    return {"cell": spec.cell_id, "dir": str(out), "status": metrics["status"],
            "accuracy": metrics["accuracy"], "reused": reused, "trained_because": why or None}  # fmt: skip


@contextmanager
def cell_lock(cell_dir: Path, log: Callable[[str], None]):
    """Exclusive lock on ``<cell_dir>.lock`` (beside the cell, so deleting the cell keeps it valid)."""
    lock_path = cell_dir.with_name(cell_dir.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{cell_dir}: another job is writing this cell; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_pack(
    specs: list[CellSpec],
    train_cell: Callable[[CellSpec, Path], dict[str, Any]],
    cells_root: str | Path,
    code: str,
    manifest: str | Path,
    log: Callable[[str], None],
    inputs: dict | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) each cell in order, then write the manifest; returns its rows.

    ``inputs`` (peft_core/fingerprint.cell_inputs) is what every cell of the pack reads;
    a finished cell that read other contents retrains.
    """
    rows = []
    for spec in specs:
        out = cell_path(cells_root, spec)
        name = f"{spec.dataset}/{spec.method}/{spec.cell_id}"
        with cell_lock(out, log):
            metrics, why = reuse_verdict(out, spec, code, inputs)
            reused = metrics is not None
            if reused:
                log(f"{name}: reused (same spec, code and inputs)")
            else:
                log(f"{name}: training ({why})")
                drop_stale_resume(out, spec, spec.epochs, code, inputs, log)
                metrics = train_cell(spec, out)
        rows.append(manifest_row(spec, out, metrics, reused, why))
    write_json(manifest, {"pack": pack_id(specs), "code": code, "cells": rows})
    return rows
