"""Successive halving replayed exactly for many (eta, min_epochs) from one training of the grid.

Why a replay is exact: a halving rung trains the grid's own cell, with the learning-rate
schedule of the full budget, and stops at the rung's budget; a promoted cell resumes from
the saved state, so its numbers at every budget are those of one uninterrupted run (bit for
bit on CPU fp32: tests/unit/test_halving.py). Training every configuration once, stopping
(and recording its validation accuracy) at every budget any replayed setting uses, therefore
gives what every rung of every setting would see. Each setting is then replayed with the
workflow's own functions (``halving.budgets``, ``halving.planned_sizes``, ``halving.rank`` for
the promotions, ``select.select`` for the last rung and for the grid), and the final runs
(``train800val200`` -> ``test``) give the test accuracy of whichever one a setting chooses: the
mean over ``--final-seeds`` (default 0; the study's protocol is 0 1 2), a hole if one of them did
not finish. Selection stays on validation only; test is read to score the choices, and for one
baseline: a configuration chosen at random (each pair's mean, on the first final seed, which
every configuration is trained with; the other seeds train only what something chose).
``--finals chosen`` trains only what something chose, on every final seed, and prints the
random baseline as not measured: a large grid's final runs otherwise cost as much as its tuning.

``--keep-within-se 1.96`` adds every setting again under noise-aware promotion
(``tuning.keep_within_se``, ``halving.promotions``): a rung also promotes every configuration
within that many standard errors of its best, the standard error from the validation split's
size.

Printed: per setting, the selection's training images (each rung: its configurations x the
epochs from the previous budget x ``n_train``, as ``halving.ranking`` counts them), the ratio
to the grid's, how many (data set, method) pairs chose the grid's configuration, the mean
selected validation and test accuracy, its difference to the grid's and a 95 % Student-t
interval of that difference over the pairs (paired by pair); per budget, the mean
Spearman rank correlation (scipy) between the validation accuracies at that budget and at the
full budget, over the pairs with at least 4 configurations.

``--tune-seeds 0 1`` repeats the whole tuning with another ``train.tune_seed`` (other data
orders and initialisations; the same final runs score every seed's choices). It
prints each seed's tables, then how far the grid's own choice moves between seeds (the floor
below which a difference cannot be told from re-running the grid), and each setting pooled: a
pair's (setting - grid) averaged over the seeds, the interval over the pairs.

The study is study_cost.py's (the demo's data, backbone and learning rates; each method's grid
as wide as the reference's). The data and backbone are made by the workflow; the cells train
here, in ``--jobs`` processes of one thread each, under ``<work>/replay/``.

Example:  python benchmarks/halving_replay.py --datasets digits textures --epochs 18 --tune-seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from study_cost import QUICK_METHODS, run_study, study_config  # noqa: E402

from peft_core.halving import budgets, planned_sizes, promotions, rank, split_images  # noqa: E402

#: the settings replayed by default: eta x the first rung's budget (each also noise-aware, --keep-within-se)
SETTINGS = [(2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3), (3, 6), (4, 1), (4, 2)]


def ladder(settings: list[tuple], epochs: int) -> list[int]:
    """Every budget any setting (eta, min_epochs[, keep_within_se]) stops at, ascending, ending with the full budget."""
    return sorted({b for eta, m, *_ in settings for b in budgets(m, eta, epochs)} | {epochs})


def with_noise(settings: list[tuple[int, int]], zs: list[float]) -> list[tuple[int, int, float | None]]:
    """Each (eta, min_epochs) as plain halving (z None), then under each noise-aware ``z``."""
    return [(eta, m, None) for eta, m in settings] + [(eta, m, z) for z in zs for eta, m in settings]


def _z(setting: tuple) -> str:
    return "-" if len(setting) < 3 or setting[2] is None else f"{setting[2]:g}"


def _train(task: dict) -> dict:
    """One configuration trained once, stopping at every budget of ``task['ladder']`` (a worker).

    Under the cell lock the packs take (``packs.cell_lock``): a worker of an earlier run whose
    parent was killed finishes its epoch (the engine saves its state on SIGTERM,
    ``peft_core.preempt``) and would otherwise write a resume state into the folder a new run is
    training in.
    """
    from peft_core.packs import cell_lock

    out = Path(task["out"])
    with cell_lock(out, lambda msg: None):
        return _ladder(task, out)


def _ladder(task: dict, out: Path) -> dict:
    from peft_core.cells import CellSpec
    from peft_core.results import write_text
    from peft_core.train import run_cell

    done = out / "ladder.json"
    if done.is_file():
        return json.loads(done.read_text())
    spec = CellSpec.model_validate(task["spec"])
    shutil.rmtree(out, ignore_errors=True)  # a ladder cut short restarts: no half-known resume state
    quiet = lambda msg: None  # noqa: E731
    records: dict[str, dict] = {}
    last = None
    for b in task["ladder"]:
        if last is not None and last["status"] != "ok":  # diverged: no state to resume, later rungs the same
            records[str(b)] = last
            continue
        stop = b if b < spec.epochs else None
        m = run_cell(spec, task["train"], task["eval"], task["checkpoint"], out, 1, "cpu", quiet, stop_at=stop)
        last = {k: m.get(k) for k in ("accuracy", "status", "eval_split", "n_train", "trainable_params")}
        records[str(b)] = last
    result = {"cell": spec.cell_id, "records": records}
    write_text(done, json.dumps(result))  # whole or absent: a run killed while writing leaves no half-written record
    return result


def replay(configs: list[dict], eta: int, min_epochs: int, epochs: int, keep_within_se: float | None = None,
           n_eval: int | None = None) -> dict:  # fmt: skip
    """One (data set, method) under one setting: the chosen cell and the selection's images.

    ``configs``: in the config's listed order, each ``{"spec", "records": {budget: record}}``.
    ``keep_within_se``: noise-aware promotion (``n_eval``: the validation images), planned and
    promoted as the workflow does (``halving.plan_rungs``, ``halving.promotions``).
    """
    from peft_core.cells import CellSpec
    from peft_core.select import select

    steps = budgets(min_epochs, eta, epochs)
    sizes = planned_sizes(len(configs), eta, len(steps), keep_within_se is not None)
    by_cell = {c["cell"]: c for c in configs}
    alive = list(by_cell)
    images, previous = 0, 0
    for r, b in enumerate(steps):
        rows = [{"cell": c, "dir": "", "spec": by_cell[c]["spec"]} for c in alive]
        recs = [by_cell[c]["records"][str(b)] for c in alive]
        images += sum(rec["n_train"] * (b - previous) for rec in recs)
        ranked = rank(rows, recs, recs[0]["eval_split"])
        room = sizes[r + 1] if r + 1 < len(steps) else len(ranked)  # the last rung: all compete
        alive = [row["cell"] for row in ranked[: promotions(ranked, room, eta, keep_within_se, n_eval)]]
        previous = b
    last = [(CellSpec.model_validate(by_cell[c]["spec"]), by_cell[c]["records"][str(epochs)]) for c in alive]
    chosen = select(last, last[0][1]["eval_split"])
    return {"chosen": chosen["chosen"], "val": chosen["val_accuracy"], "images": images}


def grid_choice(configs: list[dict], epochs: int) -> dict:
    """The grid: every configuration at the full budget, chosen as ``select_config`` chooses."""
    from peft_core.cells import CellSpec
    from peft_core.select import select

    cands = [(CellSpec.model_validate(c["spec"]), c["records"][str(epochs)]) for c in configs]
    chosen = select(cands, cands[0][1]["eval_split"])
    return {"chosen": chosen["chosen"], "val": chosen["val_accuracy"],
            "images": sum(m["n_train"] * epochs for _, m in cands)}  # fmt: skip


def fidelity(configs: list[dict], budget: int, epochs: int) -> float | None:
    """Spearman's rho between the validation accuracies at ``budget`` and at the full budget."""
    from scipy.stats import spearmanr

    if len(configs) < 4:
        return None
    early = [c["records"][str(budget)]["accuracy"] for c in configs]
    full = [c["records"][str(epochs)]["accuracy"] for c in configs]
    if len(set(early)) < 2 or len(set(full)) < 2:
        return None
    return float(spearmanr(early, full).statistic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "textures"])
    p.add_argument("--methods", nargs="+", default=QUICK_METHODS)
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0],
                   help="each a replicate of the whole tuning (train.tune_seed); the final runs stay --final-seeds")  # fmt: skip
    p.add_argument("--final-seeds", nargs="+", type=int, default=[0],
                   help="a choice's test accuracy: the mean of its final runs with these seeds (the study's "
                        "protocol: 0 1 2); the first seed also scores every configuration, for the random baseline")  # fmt: skip
    p.add_argument("--finals", choices=["all", "chosen"], default="all",
                   help="train the first final seed of every configuration (the random baseline) or only of "
                        "what something chose (a large grid's final runs cost as much as its tuning)")  # fmt: skip
    p.add_argument("--keep-within-se", nargs="*", type=float, default=[1.96],
                   help="each setting also under noise-aware promotion with this z (none: plain halving only)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="training processes (one thread each)")
    p.add_argument("--work", type=Path, default=REPO / "results" / "study_cost")
    a = p.parse_args(argv)
    from peft_core.cells import CellSpec
    from peft_core.config import load_study

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = study_config("grid", a.methods, a.datasets, a.epochs, 3, 2, [0])
    # two passes: with the data still to be made, `--until ... cache_split` ends with Snakemake's
    # "Out of jobs ready to be started" (snakemake/snakemake#823) and the caches unbuilt
    run_study(cfg, work, a.jobs, ["make_demo_data", "pretrain_demo_backbone"])
    run_study(cfg, work, a.jobs, ["cache_split"])
    settings = with_noise(SETTINGS, a.keep_within_se)
    steps = ladder(settings, a.epochs)
    base = load_study(cfg)
    n_eval = {ds: split_images(work / base.split_cache(ds, base.cfg.data.tune_eval)) for ds in a.datasets}
    seeds = {}
    for seed in a.tune_seeds:
        study = load_study({**cfg, "train": {**cfg["train"], "tune_seed": seed}})
        pairs = {(ds, m): study.tuning_cells(ds, m) for ds in a.datasets for m in a.methods}
        tasks = [_task(work, study, s, "tune", steps) for specs in pairs.values() for s in specs]
        print(f"tuning seed {seed}: {len(tasks)} configurations, each trained once with stops at {steps}", flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(a.jobs) as pool:
            done = {r["cell"]: r["records"] for r in pool.map(_train, tasks)}
        print(f"tuning cells: {time.perf_counter() - t0:.0f} s", flush=True)
        seeds[seed] = {k: [{"cell": s.cell_id, "spec": s.model_dump(mode="json"), "records": done[s.cell_id]}
                           for s in specs] for k, specs in pairs.items()}  # fmt: skip
    outcomes = {}
    for seed, configs in seeds.items():
        grid = {k: grid_choice(c, a.epochs) for k, c in configs.items()}
        runs = {s: {k: replay(c, s[0], s[1], a.epochs, s[2], n_eval[k[0]]) for k, c in configs.items()}
                for s in settings}  # fmt: skip
        outcomes[seed] = (grid, runs)
    # the final runs: the first final seed of every configuration (whichever tuning seed chose it: any
    # choice, and a choice at random), the other final seeds of every configuration something chose
    every = {c["cell"]: CellSpec.model_validate(c["spec"]) for configs in seeds.values() for cs in configs.values() for c in cs}
    chosen = chosen_cells(outcomes)
    finals = {(cell, fs): _task(work, study, spec, "final", [a.epochs], fs) for cell, spec in every.items()
              for fs in a.final_seeds if cell in chosen or (fs == a.final_seeds[0] and a.finals == "all")}  # fmt: skip
    unique = list({t["out"]: t for t in finals.values()}.values())  # one final run serves every tuning seed
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:
        by_out = {t["out"]: r["records"][str(a.epochs)] for t, r in zip(unique, pool.map(_train, unique))}
    print(f"final runs of the {len(unique)} (configuration, final seed) pairs: {time.perf_counter() - t0:.0f} s\n")
    records: dict[str, list[dict]] = {}
    for (cell, _), t in finals.items():
        records.setdefault(cell, []).append(by_out[t["out"]])
    test, first = scores(records), scores({cell: rs[:1] for cell, rs in records.items()})
    fin = next(iter(by_out.values()))["n_train"] * a.epochs * len(a.final_seeds)  # one pair's final runs
    final = (study.cfg.data.final_train, study.cfg.data.final_eval, a.final_seeds)
    for seed, (grid, runs) in outcomes.items():
        print(f"## tuning seed {seed}\n")
        report(grid, runs, test, first, seeds[seed], steps, a.epochs, final, fin)
    if len(outcomes) > 1:  # a configuration across seeds: its final run's cell (the tuning cells differ by seed)
        replicates(outcomes, test, {cell: t["cell"] for (cell, fs), t in finals.items() if fs == a.final_seeds[0]})
    return 0


def _task(work: Path, study, spec, stage: str, steps: list[int], final_seed: int = 0) -> dict:
    """One configuration's training: a tuning cell (``stage`` "tune") or its final run (``final_seed``)."""
    from peft_core.cells import final_cells

    d = study.cfg.data
    if stage == "final":
        spec = final_cells(spec, [final_seed], d.final_train, d.final_eval)[0]
    train, ev = (d.tune_train, d.tune_eval) if stage == "tune" else (d.final_train, d.final_eval)
    return {"cell": spec.cell_id, "spec": spec.model_dump(mode="json"), "out": str(work / "replay" / stage / spec.dataset / spec.method / spec.cell_id),
            "train": str(work / study.split_cache(spec.dataset, train)), "eval": str(work / study.split_cache(spec.dataset, ev)),
            "checkpoint": str(work / study.cfg.backbone.checkpoint), "ladder": steps}  # fmt: skip


def chosen_cells(outcomes: dict) -> set[str]:
    """Every tuning cell that the grid or a setting chose, under any tuning seed."""
    return {r["chosen"] for grid, runs in outcomes.values() for res in (grid, *runs.values()) for r in res.values()}


def scores(records: dict[str, list[dict]]) -> dict[str, float]:
    """A configuration's test accuracy (%): the mean of its final runs; a hole (nan) if one did not finish."""
    return {cell: 100 * statistics.mean(r["accuracy"] for r in rs) if all(r["status"] == "ok" for r in rs) else math.nan
            for cell, rs in records.items()}  # fmt: skip


def _mean(xs) -> float:
    """A mean of fractions, in percent."""
    return 100 * statistics.mean(xs)


def paired_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of paired differences (points), over the (data set, method) pairs."""
    from scipy import stats

    m = statistics.mean(diffs)
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return m, m
    return tuple(stats.t.interval(level, len(diffs) - 1, loc=m, scale=stats.sem(diffs)))


def _known(xs) -> list[float]:
    return [x for x in xs if not math.isnan(x)]


def _difference(diffs: list[float]) -> tuple[str, str]:
    """The mean difference and its interval (points) over the pairs without a hole; holes are counted."""
    ok = _known(diffs)
    if not ok:
        return "hole", "-"
    lo, hi = paired_ci(ok)
    holes = "" if len(ok) == len(diffs) else f" ({len(diffs) - len(ok)} of {len(diffs)} pairs a hole)"
    return f"{statistics.mean(ok):+.2f}", f"[{lo:+.2f}, {hi:+.2f}]{holes}"


def report(grid, runs, test, first, configs, steps, epochs, final, fin) -> None:
    """The tables of the module docstring.

    ``test``: a chosen configuration's test accuracy (%, the mean of its final seeds, nan: a hole);
    ``first``: every configuration's, from the first final seed (the random baseline); ``fin``: one
    pair's final-run images.
    """
    g_sel = sum(r["images"] for r in grid.values())
    g_test = {k: test[r["chosen"]] for k, r in grid.items()}
    fin *= len(grid)  # the same count under every setting
    print(f"grid: {len(grid)} (data set, method) pairs, selection {g_sel:,} images, final runs {fin:,} "
          f"({final[0]} -> {final[1]}, seeds {' '.join(map(str, final[2]))}), mean selected val "
          f"{_mean(r['val'] for r in grid.values()):.2f} / test {statistics.mean(_known(g_test.values())):.2f}\n")  # fmt: skip
    print("| eta | min_epochs | keep_within_se | budgets | selection images | fewer (selection) | fewer (with final "
          f"runs) | same configuration | mean val (%) | mean test (%) | test - grid (points) | 95% CI (paired t, "
          f"{len(grid)} pairs) |")  # fmt: skip
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for setting, res in runs.items():
        eta, m = setting[:2]
        sel = sum(r["images"] for r in res.values())
        same = sum(res[k]["chosen"] == grid[k]["chosen"] for k in grid)
        mean, ci = _difference([test[res[k]["chosen"]] - g_test[k] for k in grid])
        print(f"| {eta} | {m} | {_z(setting)} | {budgets(m, eta, epochs)} | {sel:,} | {g_sel / sel:.2f}x | "
              f"{(g_sel + fin) / (sel + fin):.2f}x | {same}/{len(grid)} | {_mean(r['val'] for r in res.values()):.2f} "
              f"| {statistics.mean(_known(test[r['chosen']] for r in res.values())):.2f} | {mean} | {ci} |")  # fmt: skip
    if all(c["cell"] in first for cs in configs.values() for c in cs):
        at_random = {k: statistics.mean(first[c["cell"]] for c in configs[k]) for k in grid}
        mean, ci = _difference([at_random[k] - first[grid[k]["chosen"]] for k in grid])
        print(f"| a configuration at random (the mean over each pair's configurations; final seed {final[2][0]} only) "
              f"| | | | 0 | | | | | {statistics.mean(_known(at_random.values())):.2f} | {mean} | {ci} |")  # fmt: skip
    else:
        print("| a configuration at random: not measured (`--finals chosen`) | | | | 0 | | | | | | | |")
    print("\n| budget (epochs) | mean Spearman rho vs the full budget (pairs with >= 4 configurations) |")
    print("|---:|---:|")
    for b in steps[:-1]:
        rhos = [r for r in (fidelity(c, b, epochs) for c in configs.values()) if r is not None]
        print(f"| {b} | {statistics.mean(rhos):.2f} (n={len(rhos)}) |" if rhos else f"| {b} | - |")
    print("\nper pair: grid's choice val / test, then each setting's (val / test, * = the grid's configuration)")
    for k, g in grid.items():
        cells = [f"{100 * r[k]['val']:.1f}/{test[r[k]['chosen']]:.1f}{'*' if r[k]['chosen'] == g['chosen'] else ''}"
                 for r in runs.values()]  # fmt: skip
        print(f"{k[0]:>9} {k[1]:>9}  grid {100 * g['val']:.1f}/{g_test[k]:.1f}   " + "  ".join(cells))


def replicates(outcomes: dict, test: dict[str, float], config: dict[str, str]) -> None:
    """Across tuning seeds: how far the grid moves from itself, and each setting pooled.

    The grid re-run with another tuning seed (its choice scored by the same final runs)
    differs from the first only by the noise of training and selecting on 200 validation images: a
    difference smaller than that cannot be told apart from re-running the grid. Pooled: each
    pair's (setting - grid) averaged over the seeds, the interval over the pairs. ``config``:
    each tuning cell's configuration (its final run's cell id, the same for every seed); ``test``:
    as :func:`report`'s, a pair with a hole in any seed is a hole.
    """
    (s0, (g0, _)), *rest = outcomes.items()
    pairs = list(g0)
    print(f"## {len(outcomes)} tuning seeds ({', '.join(map(str, outcomes))})\n")
    print(f"| the grid, tuning seed s vs {s0} | same configuration | test - grid {s0} (points) "
          f"| mean abs difference | 95% CI (paired t, {len(pairs)} pairs) |")  # fmt: skip
    print("|---|---:|---:|---:|---|")
    for seed, (g, _) in rest:
        diffs = [test[g[k]["chosen"]] - test[g0[k]["chosen"]] for k in pairs]
        same = sum(config[g[k]["chosen"]] == config[g0[k]["chosen"]] for k in pairs)
        mean, ci = _difference(diffs)
        print(f"| s = {seed} | {same}/{len(pairs)} | {mean} | {statistics.mean(map(abs, _known(diffs))):.2f} | {ci} |")
    print(f"\n| eta | min_epochs | keep_within_se | fewer (selection) | same configuration | test - grid, pooled "
          f"(points) | 95% CI (paired t over {len(pairs)} pairs, each the mean of {len(outcomes)} seeds) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---|")
    for setting in next(iter(outcomes.values()))[1]:
        per_pair = [statistics.mean(test[r[setting][k]["chosen"]] - test[g[k]["chosen"]] for g, r in outcomes.values())
                    for k in pairs]  # fmt: skip
        images = sum(r[setting][k]["images"] for _, r in outcomes.values() for k in pairs)
        grid_images = sum(g[k]["images"] for g, _ in outcomes.values() for k in pairs)
        same = sum(r[setting][k]["chosen"] == g[k]["chosen"] for g, r in outcomes.values() for k in pairs)
        mean, ci = _difference(per_pair)
        print(f"| {setting[0]} | {setting[1]} | {_z(setting)} | {grid_images / images:.2f}x | "
              f"{same}/{len(pairs) * len(outcomes)} | {mean} | {ci} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
