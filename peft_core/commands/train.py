"""Cell commands: train one cell or a pack of them (tuning, halving rungs, final runs), and the data-dependent steps before training (feature cache, prestep).

Part of the ``peft-core`` command line (:mod:`peft_core.cli` builds the parser).
Heavy imports (torch, timm) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError, require_files
from . import model_from_json


def _spec(raw: str):
    from pydantic import ValidationError

    from ..cells import CellSpec
    from ..grids import format_validation_error
    from ..methods import get_method

    spec = model_from_json(CellSpec, raw, "spec")

    method = get_method(spec.method)
    try:
        method.hparams(**spec.hparams)
    except ValidationError as err:
        raise InputError(format_validation_error(err, f"methods.{spec.method}")) from None
    return spec


def _check_inputs(a) -> str | None:
    """Every input file exists (before any training); returns the code checksum, if given."""
    require_files(*(p or None for p in (a.train_data, a.eval_data, a.checkpoint, a.code_stamp)))
    if a.code_stamp:
        from ..packs import read_code_stamp

        return read_code_stamp(a.code_stamp)
    return None


def cmd_train(a) -> int:
    require_files(a.spec or None)
    spec = _spec(a.spec_json if a.spec_json else Path(a.spec).read_text())
    code = _check_inputs(a)
    from ..fingerprint import cell_inputs
    from ..train import Preempted, run_cell

    prestep = _prestep_for([spec], a.prestep)
    features = _features(a.features)
    inputs = cell_inputs(spec.train_split, a.train_data, spec.eval_split, a.eval_data, a.checkpoint, prestep=prestep,
                         features=features)  # fmt: skip
    try:
        m = run_cell(
            spec, a.train_data, a.eval_data, a.checkpoint, a.out, a.threads, a.device, code=code, inputs=inputs,
            prestep=prestep, features=features,
        )
    except Preempted:
        return PREEMPTED_EXIT  # the rerun (Snakemake retry or SLURM requeue) resumes
    return 0 if m["status"] in ("ok", "diverged") else 1


def _final_specs(a) -> list:
    """The final runs of the configuration chosen in ``--selection``, one per ``--final-seeds``."""
    from ..cells import final_cells
    from ..results import read_json

    require_files(a.selection)
    try:
        chosen = read_json(a.selection)["chosen_spec"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{a.selection}: not a selection file (no chosen_spec)") from None
    if not a.final_seeds or not a.final_train or not a.final_eval:
        raise InputError("--selection needs --final-seeds, --final-train and --final-eval")
    return final_cells(_spec(json.dumps(chosen)), a.final_seeds, a.final_train, a.final_eval)


def _promoted(a) -> list:
    """``--ranking FILE --slots A B``: the configurations a halving rung takes from the rung before."""
    from ..halving import promoted_specs
    from ..results import read_json

    require_files(a.ranking)
    if not a.slots or a.budget is None:
        raise InputError("--ranking needs --slots and --budget")
    return [_spec(json.dumps(s)) for s in promoted_specs(read_json(a.ranking), *a.slots)]


def cmd_train_pack(a) -> int:
    specs = [_spec(raw) for raw in a.spec_json] if a.spec_json else _promoted(a) if a.ranking else _final_specs(a)
    if not specs and not a.ranking:
        raise InputError("train-pack: no cells to train")
    code = _check_inputs(a)
    if not specs:  # noise-aware halving promoted nobody to these slots (peft_core/halving.py)
        from ..results import write_json

        write_json(a.manifest, {"budget": a.budget, "code": code, "cells": []})
        print(f"{a.manifest}: no configuration promoted to slots {a.slots[0]}..{a.slots[1] - 1}; nothing to train")
        return 0
    if len({(s.train_split, s.eval_split) for s in specs}) != 1:
        raise InputError("train-pack: every cell of a pack must read the same train and eval splits")
    from ..fingerprint import cell_inputs
    from ..packs import run_pack
    from ..train import Preempted, run_cell

    # sha256 of what every cell reads, memoised beside the cells (by path, size, mtime)
    memo = Path(a.cells_root).parent / "fingerprints"
    prestep = _prestep_for(specs, a.prestep)
    s0 = specs[0]
    features = _features(a.features)
    inputs = cell_inputs(s0.train_split, a.train_data, s0.eval_split, a.eval_data, a.checkpoint, memo, prestep,
                         features)  # fmt: skip

    def train_one(spec, out, stop_at=None):
        return run_cell(
            spec, a.train_data, a.eval_data, a.checkpoint, out, a.threads, a.device, code=code, inputs=inputs,
            prestep=prestep, features=features, stop_at=stop_at,
        )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        if a.budget is not None:  # a successive-halving rung (peft_core/halving.py): its cells train alone
            from ..halving import run_rung

            rows = run_rung(specs, a.budget, train_one, a.cells_root, code, a.manifest, log, inputs)
        elif a.batched:
            rows = _run_batched_pack(a, specs, train_one, code, inputs, features is not None, log)
        else:
            rows = run_pack(specs, train_one, a.cells_root, code, a.manifest, log, inputs)
    except Preempted:
        return PREEMPTED_EXIT
    trained = sum(not r["reused"] for r in rows)
    print(f"{a.manifest}: {len(rows)} cells ({trained} trained, {len(rows) - trained} reused)")
    return 0


def _run_batched_pack(a, specs: list, train_one, code: str | None, inputs: dict, features: bool, log) -> list[dict]:
    """``train-pack --batched``: the cells that allow it train as one model (peft_core/batched.py)."""
    from ..batched import cell_reason, run_batched, run_batched_pack

    def batched(group, dirs):
        return run_batched(group, dirs, a.train_data, a.eval_data, a.checkpoint, a.threads, a.device, log, code,
                           inputs)  # fmt: skip

    def reason(spec):
        return cell_reason(spec, a.checkpoint, features)

    return run_batched_pack(specs, train_one, batched, reason, a.cells_root, code, a.manifest, log, inputs)


def _prestep_for(specs: list, paths: list[str] | None) -> Path | None:
    """The prestep result the cells' method needs, picked from ``--prestep`` (None if it has none).

    A tuning pack is given its one result; a final run all of its method's, and takes the
    one made for the chosen configuration.
    """
    from ..methods import get_method
    from ..prestep import pick_prestep

    if get_method(specs[0].method).prestep is None:
        if paths:
            raise InputError(f"--prestep: method {specs[0].method!r} has no prestep")
        return None
    if not paths:
        raise InputError(f"method {specs[0].method!r} chooses from the data first: give its prestep result (--prestep)")
    picked = {pick_prestep(paths, s) for s in specs}
    if len(picked) != 1:
        raise InputError(f"--prestep: the cells of one pack need different prestep results ({sorted(map(str, picked))})")
    return picked.pop()


def _features(paths: list[str] | None) -> tuple[str, str] | None:
    """``--features TRAIN EVAL``: the cached head inputs of the two splits (peft_core/features.py)."""
    if not paths:
        return None
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: feature cache not found")
    return paths[0], paths[1]


def cmd_features(a) -> int:
    from ..features import FeatureSpec, extract

    fspec = model_from_json(FeatureSpec, a.spec_json, "feature spec")
    extract(fspec, a.data, a.checkpoint, a.out, a.threads, a.device)
    return 0


def cmd_prestep(a) -> int:
    from ..prestep import PrestepSpec, run_prestep

    pspec = model_from_json(PrestepSpec, a.spec_json, "prestep spec")
    run_prestep(pspec, a.train_data, a.eval_data, a.checkpoint, a.out, a.threads, a.device)
    return 0


# Exit status of a cell stopped by SIGTERM/SIGUSR1 after saving its state.
PREEMPTED_EXIT = 75  # EX_TEMPFAIL
