"""Selection, aggregation and report commands, and the analyses on trained cells (ensembles, robustness, WiSE-FT, merging).

Part of the ``peft-core`` command line (:mod:`peft_core.cli` builds the parser).
Heavy imports (torch, timm) happen inside the commands that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError, require_files
from . import study_from_arg


def cmd_rank_rung(a) -> int:
    from ..halving import ranking, split_images
    from ..results import write_json

    n_eval = None
    if a.keep_within_se is not None:  # noise-aware promotion (peft_core/halving.py): the split's size
        if a.eta is None or a.eval_data is None:
            raise InputError("rank-rung --keep-within-se needs --eta and --eval-data")
        require_files(a.eval_data)
        n_eval = split_images(a.eval_data)
    result = ranking([Path(m) for m in a.manifests], a.eval_split, a.rung, a.previous, a.promote, a.eta,
                     a.keep_within_se, n_eval)  # fmt: skip
    write_json(a.out, result)
    print(f"{a.out}: {len(result['ranked'])} ranked at {result['epochs']} epochs, top {result['promote']} continue")
    return 0


def cmd_select(a) -> int:
    from ..cells import CellSpec
    from ..halving import halving_selection, last_rung_cells
    from ..results import METRICS, SPEC, read_json, write_json
    from ..select import grid_selection, select

    rankings = [read_json(r) for r in a.rankings or []]
    cells = last_rung_cells(rankings) if rankings else a.cells
    if not cells:
        raise InputError("select: give --cells (grid) or --rankings (halving)")
    cands = [(CellSpec.model_validate(read_json(Path(c) / SPEC)), read_json(Path(c) / METRICS)) for c in cells]
    result = select(cands, a.eval_split)
    result.update(halving_selection(rankings) if rankings else grid_selection(cands))
    write_json(a.out, result)
    print(f"{a.out}: chose {result['chosen']} (val acc {result['val_accuracy']})")
    return 0


def cmd_aggregate(a) -> int:
    from ..report import aggregate_dataset
    from ..results import read_json

    # final runs: the cells listed, in seed order, by each `train-pack --selection` manifest
    finals = [Path(row["dir"]) for m in a.finals for row in read_json(m)["cells"]]
    # halving: the tuning cells trained to the full budget are those of each last rung's ranking
    tuned = [*a.cells, *(row["dir"] for r in a.rankings for row in read_json(r)["ranked"])]
    frame = aggregate_dataset(
        a.study, a.group, a.final_eval, [Path(c) for c in tuned] + finals, [Path(s) for s in a.selections], Path(a.out)
    )
    print(f"{a.out}: {len(frame)} rows")
    return 0


def cmd_report(a) -> int:
    from ..report import build_report

    results = build_report(study_from_arg(a.config), [Path(t) for t in a.tables], Path(a.out_dir),
                           Path(a.results) if a.results else None)  # fmt: skip
    print(f"{a.out_dir}: report of {len(results)} cells")
    return 0


def cmd_ensembles(a) -> int:
    from ..ensemble_report import build_ensembles

    if not 0.0 < a.confident_q <= 1.0:
        raise InputError(f"--confident-q {a.confident_q}: must be in (0, 1]")
    require_files(*a.tables, *(a.selections or []))
    results = Path(a.results) if a.results else Path("results") / a.study
    rows = build_ensembles(a.study, [Path(t) for t in a.tables], Path(a.out_dir), results,
                           [Path(s) for s in a.selections or []], a.confident_q)
    print(f"{a.out_dir}: {len(rows)} ensemble rows")
    return 0


def _named_paths(items: list[str], flag: str) -> dict[str, str]:
    bad = [item for item in items if "=" not in item]
    if bad:
        raise InputError(f"{flag} {bad[0]!r}: expected NAME=path")
    out = dict(item.split("=", 1) for item in items)
    require_files(*out.values())
    return out


def cmd_robustness(a) -> int:
    import torch

    from ..results import write_parquet
    from ..robustness import robustness_rows

    try:
        plan = json.loads(a.plan)
    except json.JSONDecodeError as err:
        raise InputError(f"--plan: not JSON ({err})") from None
    caches = _named_paths(a.eval, "--eval")
    require_files(*a.tables, *(a.selections or []))
    from ..train import pick_device

    torch.set_num_threads(a.threads)
    rows = robustness_rows([Path(t) for t in a.tables], Path(a.results), [Path(s) for s in a.selections or []],
                           plan, caches, a.checkpoint, pick_device(a.device))  # fmt: skip
    write_parquet(a.out, rows)
    print(f"{a.out}: {len(rows)} rows ({rows.cell.nunique()} final runs)")
    return 0


def cmd_robustness_report(a) -> int:
    from ..robustness_report import build_robustness_report

    require_files(*a.tables)
    rows = build_robustness_report(a.study, [Path(t) for t in a.tables], Path(a.out_dir))
    print(f"{a.out_dir}: robustness report of {len(rows)} rows")
    return 0


def cmd_zeroshot_head(a) -> int:
    from ..results import write_safetensors
    from ..zeroshot import TEMPLATES, load_clip, read_class_names, text_head

    names = read_class_names(a.classes)
    model, tokenizer = load_clip(a.model, a.checkpoint)
    head = text_head(model, tokenizer, names, a.templates or TEMPLATES)
    write_safetensors(a.out, {"weight": head.contiguous()}, metadata={"model": a.model, "classes": str(len(names))})
    print(f"{a.out}: zero-shot head {tuple(head.shape)}")
    return 0


def cmd_merge(a) -> int:
    from ..merge import merge_cell

    print(json.dumps(merge_cell(a.cell, a.out, a.checkpoint)))
    return 0


def cmd_wise(a) -> int:
    import pandas as pd

    from ..results import write_parquet
    from ..wise import wise_curve

    bad = [item for item in a.eval if "=" not in item]
    if bad:
        raise InputError(f"--eval {bad[0]!r}: expected NAME=path/to/cache.safetensors")
    splits = dict(item.split("=", 1) for item in a.eval)
    rows = wise_curve(a.cell, splits, a.alphas, a.checkpoint)
    write_parquet(a.out, pd.DataFrame(rows))
    for r in rows:
        print(f"alpha {r['alpha']:.2f} {r['split']}: {100 * r['accuracy']:.2f}")
    return 0
