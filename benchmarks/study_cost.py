"""What a study costs under the grid and under successive halving (``tuning.strategy``).

Part 1 runs the same demo study twice through the workflow, once per strategy
(config/demo.yaml's data, backbone and per-method learning rates; each method's
grid as wide as the reference's: config/method_grids/<method>.yaml x two lrs x
the reference's two weight decays), and prints per strategy the training images
(selection: ``selection_images`` of the selection files; final runs: every final
cell's epochs x its training split), the wall time of the run, and per (data
set, method) whether halving chose the grid's configuration, with the selected
configuration's test accuracy under both. The two studies have their own
results folders (nothing shared), the same cell ids, the same data and backbone.

Part 2 projects the VTAB-1k study (config/vtab1k.yaml) on one H100 under each
strategy, from the planned cells alone:

    images(m)   = sum over data sets d of  n_train * sum over rungs r of  n_r(d, m) * (b_r - b_{r-1})
                  + n_final * epochs * seeds                       (the final runs, the same for both)
    hours(m)    = images(m) / throughput(m) / 3600
    grid:    one rung, n_0 = |cells(d, m)|, b_0 = epochs
    halving: b_r = min(min_epochs * eta^r, epochs), n_0 = |cells(d, m)|, n_r = ceil(n_{r-1} / eta)

with n_train = 800 (train800), n_final = 1000 (train800val200), and throughput(m)
the training images/s measured on an H100 (docs/benchmarks.md, bf16, batch 64,
``benchmarks/bench_engine.py``); a method not measured there takes the median of
the measured ones (marked ``*``). Evaluation passes and job overheads are left out.

Example:  python benchmarks/study_cost.py --quick            # one data set, 6 methods, 6 epochs, a small backbone
Example:  python benchmarks/study_cost.py --project-only     # part 2 only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_core.config import load_study  # noqa: E402
from peft_core.halving import budgets, rung_sizes  # noqa: E402

#: H100 training img/s, ViT-B/16 bf16 eager, batch 64 (docs/benchmarks.md, measured 2026-11-25)
H100_IMG_S = {"full": 1596.8, "linear": 4331.2, "lora": 1900.5, "adapter": 1869.0, "vpt_deep": 1806.9,
              "ssf": 1094.6, "fact_tt": 793.8}  # fmt: skip
QUICK_METHODS = ["linear", "bitfit", "ln", "ssf", "lora", "vpt_deep"]
FULL_METHODS = QUICK_METHODS + ["difffit", "adaptformer", "fact_tt", "convpass"]
REFERENCE_WD = [1e-4, 1e-3]


#: --quick: a smaller upstream pre-training than the demo's (seconds, not minutes); its own checkpoint
QUICK_PRETRAIN = {"images": 2000, "epochs": 2, "lr": 0.002, "batch_size": 128, "seed": 0}


def _dataset(demo: dict, name: str) -> dict:
    """A data set's block: the demo config's (without its shifted test sets), or, for a demo data
    set the demo leaves out (``count``), its class count and group from ``peft_core.demo``."""
    from peft_core.demo import DATASETS

    if name in demo["datasets"]:
        return {k: v for k, v in demo["datasets"][name].items() if k != "ood"}
    if name not in DATASETS:
        raise SystemExit(f"--datasets: {name!r} is no demo data set (known: {', '.join(DATASETS)})")
    group, classes = DATASETS[name]
    return {"num_classes": classes, "group": group}


def study_config(strategy: str, methods: list[str], datasets: list[str], epochs: int, eta: int, min_epochs: int,
                 seeds: list[int], quick: bool = False) -> dict:  # fmt: skip
    """The demo study with the reference's grid width, under one strategy."""
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg = {k: demo[k] for k in ("data", "backbone", "compute") if k in demo}
    if quick:
        cfg["backbone"] = {**cfg["backbone"], "pretrain": QUICK_PRETRAIN,
                           "checkpoint": "results/study_cost/backbone/quick_upstream.safetensors"}  # fmt: skip
    cfg["study"] = f"study_cost_{strategy}"
    cfg["datasets"] = {d: _dataset(demo, d) for d in datasets}
    cfg["methods"] = {}
    for m in methods:
        grid_file = REPO / "config" / "method_grids" / f"{m}.yaml"
        grid = yaml.safe_load(grid_file.read_text()) or {} if grid_file.is_file() else {}
        own = demo["methods"].get(m) or {}
        cfg["methods"][m] = {**grid, **{k: v for k, v in own.items() if k in ("lr", "norm")}}
    cfg["train"] = {**demo.get("train", {}), "epochs": epochs, "weight_decay": REFERENCE_WD, "final_seeds": seeds}
    cfg["train"]["warmup_epochs"] = min(cfg["train"].get("warmup_epochs", 0), epochs - 1)
    if strategy == "halving":
        cfg["tuning"] = {"strategy": "halving", "eta": eta, "min_epochs": min_epochs}
    return cfg


def run_study(cfg: dict, work: Path, cores: int, until: list[str] | None = None) -> float:
    """Run the workflow on ``cfg`` in ``work`` (this checkout's code); returns the wall time in s.
    ``until``: only the jobs up to these rules (the shared data and backbone, made before timing)."""
    path = work / f"{cfg['study']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = ["snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(work),
           "--configfile", str(path), "--cores", str(cores), "--rerun-incomplete", "--quiet", "all"]  # fmt: skip
    cmd += ["--until", *until] if until else []
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=work)
    return time.perf_counter() - t0


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def outcome(work: Path, study: str) -> dict:
    """Per (data set, method): the chosen cell, its val accuracy, the selection's images and the
    final runs' mean test accuracy and images."""
    res = work / "results" / study
    out = {}
    for sel_path in sorted((res / "selection").glob("*/*.json")):
        sel = _read(sel_path)
        finals = [_read(Path(work) / row["dir"] / "metrics.json")
                  for row in _read(res / "finals" / sel["dataset"] / f"{sel['method']}.json")["cells"]]  # fmt: skip
        epochs = sel["chosen_spec"]["epochs"]
        out[(sel["dataset"], sel["method"])] = {
            "chosen": sel["chosen"], "val": sel["val_accuracy"], "selection_images": sel["selection_images"] or 0,
            "test": statistics.mean(m["accuracy"] for m in finals),
            "final_images": sum(m["n_train"] * epochs for m in finals),
        }  # fmt: skip
    return out


def compare(work: Path, walls: dict[str, float]) -> None:
    grid, halving = outcome(work, "study_cost_grid"), outcome(work, "study_cost_halving")
    print("\n| strategy | selection images | final-run images | total images | wall time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, res in (("grid", grid), ("halving", halving)):
        sel = sum(r["selection_images"] for r in res.values())
        fin = sum(r["final_images"] for r in res.values())
        print(f"| {name} | {sel:,} | {fin:,} | {sel + fin:,} | {walls.get(name, math.nan):.0f} |")
    print("\n| dataset | method | same configuration | grid val / test (%) | halving val / test (%) |")
    print("|---|---|---|---:|---:|")
    for key in grid:
        g, h = grid[key], halving.get(key)
        if h is None:
            continue
        print(f"| {key[0]} | {key[1]} | {'yes' if g['chosen'] == h['chosen'] else 'no'} | "
              f"{100 * g['val']:.1f} / {100 * g['test']:.1f} | {100 * h['val']:.1f} / {100 * h['test']:.1f} |")  # fmt: skip
    same = sum(grid[k]["chosen"] == halving[k]["chosen"] for k in grid if k in halving)
    print(f"\nhalving chose the grid's configuration for {same} of {len(grid)} (data set, method) pairs")


def project(config: Path, eta: int, min_epochs: int, n_train: int = 800, n_final: int = 1000) -> None:
    """Projected H100-hours of a study under each strategy (the module docstring's formula)."""
    study = load_study(config)
    epochs, seeds = study.cfg.train.epochs, len(study.cfg.train.final_seeds)
    steps = budgets(min_epochs, eta, epochs)
    known = statistics.median(H100_IMG_S.values())
    totals = {"grid": 0.0, "halving": 0.0}
    print(f"\n{config.name}: {epochs} epochs, halving eta {eta}, budgets {steps}; H100 hours (tuning + final runs)")
    print("| method | cells per data set | grid images | halving images | img/s | grid h | halving h |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in study.method_names():
        counts = [len(study.tuning_cells(d, m)) for d in study.dataset_names()]
        final = len(counts) * n_final * epochs * seeds
        grid = sum(n * n_train * epochs for n in counts) + final
        prev = [0] + steps[:-1]
        halving = sum(n_train * sum(s * (b - p) for s, b, p in zip(rung_sizes(n, eta, len(steps)), steps, prev))
                      for n in counts) + final  # fmt: skip
        rate = H100_IMG_S.get(m, known)
        hours = {"grid": grid / rate / 3600, "halving": halving / rate / 3600}
        for k in totals:
            totals[k] += hours[k]
        mark = "" if m in H100_IMG_S else "*"
        print(f"| {m} | {counts[0]} | {grid:,} | {halving:,} | {rate:.0f}{mark} | {hours['grid']:.1f} | {hours['halving']:.1f} |")
    print(f"| **total** | | | | | **{totals['grid']:.0f}** | **{totals['halving']:.0f}** |")
    print(f"(* not measured on the H100: the median of the measured methods, {known:.0f} img/s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one data set, 6 methods, 6 epochs (a few CPU minutes)")
    p.add_argument("--datasets", nargs="+", help="demo data sets (default: all four; --quick: digits)")
    p.add_argument("--methods", nargs="+", help=f"default: {', '.join(FULL_METHODS)}; --quick: {', '.join(QUICK_METHODS)}")
    p.add_argument("--epochs", type=int, help="default 18; --quick: 6")
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--min-epochs", type=int, help="the first rung's budget (default: 2; VTAB-1k projection: 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / "results" / "study_cost", help="workdir of both runs")
    p.add_argument("--project-only", action="store_true", help="only the VTAB-1k projection")
    p.add_argument("--project-config", type=Path, default=REPO / "config" / "vtab1k.yaml")
    a = p.parse_args(argv)
    if not a.project_only:
        datasets = a.datasets or (["digits"] if a.quick else ["digits", "textures", "cells", "orientation"])
        methods = a.methods or (QUICK_METHODS if a.quick else FULL_METHODS)
        epochs = a.epochs or (6 if a.quick else 18)
        a.work = a.work.resolve()  # snakemake runs in it: a relative path would be taken twice
        a.work.mkdir(parents=True, exist_ok=True)
        walls = {}
        cfgs = {s: study_config(s, methods, datasets, epochs, a.eta, a.min_epochs or 2, a.seeds, a.quick)
                for s in ("grid", "halving")}  # fmt: skip
        run_study(cfgs["grid"], a.work, a.cores, ["make_demo_data", "pretrain_demo_backbone"])  # shared, untimed
        for strategy, cfg in cfgs.items():
            walls[strategy] = run_study(cfg, a.work, a.cores)
            print(f"{strategy}: {walls[strategy]:.0f} s", flush=True)
        compare(a.work, walls)
    project(a.project_config, a.eta, a.min_epochs or 4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
