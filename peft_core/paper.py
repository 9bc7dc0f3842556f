"""The main report's paper-ready files, beside the HTML, from the report's frames alone.

``reports/<study>/``:

* ``figures/{accuracy_params,rank_heatmap,sensitivity,cd_all,cd_<group>}.{pdf,svg,png}``
  (:mod:`peft_core.figures`);
* ``tables/{accuracy,selection,published,costs}.tex`` and ``tables/tables.tex``, a standalone
  document that inputs them (:mod:`peft_core.latex`);
* ``stats/{accuracy_ci,pairwise,significance,ranks}.csv`` (:mod:`peft_core.stats`; the first
  three need the final runs' predictions, so ``results_root``).

:func:`report_outputs` names them all (the Snakemake rule declares them). Heavy imports
(matplotlib, scipy) happen inside :func:`write_outputs`, so naming the files stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Study
from .results import write_text
from .summary import GROUP_ORDER

MAIN_FIGURES = ("accuracy_params", "rank_heatmap", "sensitivity", "cd_all")
TABLES = ("accuracy", "selection", "published", "costs", "tables")
STATS = ("accuracy_ci", "pairwise", "significance", "ranks")
FORMATS = ("pdf", "svg", "png")  # figures.FORMATS, without importing matplotlib


def study_groups(study: Study) -> list[str]:
    """The VTAB groups of the study's data sets, in the tables' order."""
    have = {study.cfg.datasets[d].group for d in study.dataset_names()}
    return [g for g in GROUP_ORDER if g in have]


def report_outputs(study: Study) -> list[str]:
    """Paths, relative to ``reports/<study>/``, of every file :func:`write_outputs` writes."""
    stems = [*MAIN_FIGURES, *(f"cd_{g}" for g in study_groups(study))]
    return ([f"figures/{s}.{f}" for s in stems for f in FORMATS] + [f"tables/{t}.tex" for t in TABLES]
            + [f"stats/{s}.csv" for s in STATS])  # fmt: skip


@dataclass
class Outputs:
    """What the HTML page shows of the files written: figures (stem -> caption, paths) and frames."""

    figures: dict[str, tuple[str, dict[str, Path]]] = field(default_factory=dict)
    accuracy_ci: pd.DataFrame | None = None  # None: no predictions were read
    counts: pd.DataFrame | None = None
    tests: list[Any] = field(default_factory=list)
    costs: pd.DataFrame = field(default_factory=pd.DataFrame)
    changes: dict[str, Any] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)


FIGURE_CAPTIONS = {
    "accuracy_params": "Mean test accuracy vs trainable parameters (excluding the head; log scale, 0 drawn at 1), "
    "complete methods; dashed: the Pareto front (no method is both smaller and more accurate).",
    "rank_heatmap": "Rank per data set (1 = best test accuracy among complete methods); a method with a hole "
    "shows the rank it would take among them.",
    "sensitivity": "Tuning sensitivity: validation-accuracy spread (max − min, points) over each method's "
    "hyper-parameter grid; dots are data sets, bars their mean.",
}


def write_outputs(
    results: pd.DataFrame, study: Study, frames: dict[str, pd.DataFrame], out_dir: Path,
    results_root: Path | None = None, published: pd.DataFrame | None = None,
) -> Outputs:  # fmt: skip
    """Write the figures, LaTeX tables and statistics; ``frames``: per, summ, sel, ranks."""
    from . import figures, latex, stats
    from .costs import changes, cost_frame, keep_history

    per, summ, sel, ranks = frames["per"], frames["summ"], frames["sel"], frames["ranks"]
    methods, cfg = study.method_names(), study.cfg
    group_of = {d: cfg.datasets[d].group for d in study.dataset_names()}
    out = Outputs()
    fig_dir, tab_dir, stat_dir = out_dir / "figures", out_dir / "tables", out_dir / "stats"

    def fig(stem: str, figure: Any, caption: str) -> None:
        out.figures[stem] = (caption, figures.save_figure(figure, fig_dir, stem))

    fig("accuracy_params", figures.accuracy_vs_params(summ), FIGURE_CAPTIONS["accuracy_params"])
    fig("rank_heatmap", figures.rank_heatmap(ranks), FIGURE_CAPTIONS["rank_heatmap"])
    fig("sensitivity", figures.sensitivity(sel, methods), FIGURE_CAPTIONS["sensitivity"])
    datasets = [d for d in group_of if d in set(per.dataset)]
    out.tests = stats.rank_tests(per[per.dataset.isin(datasets)], {d: group_of[d] for d in datasets}, methods)
    by_scope = {t.scope: t for t in out.tests}
    for key in ["all", *study_groups(study)]:
        test = by_scope.get(key) or stats.RankTest(key, [], note="no data set of this group has results")
        fig(f"cd_{key}", figures.cd_diagram(test), "Critical-difference diagram, " + test.caption())

    stat_dir.mkdir(parents=True, exist_ok=True)
    write_text(stat_dir / "ranks.csv", stats.ranks_frame(out.tests).to_csv(index=False, float_format="%.6g"))
    s = stats.compute_stats(results, results_root, group_of, methods) if results_root is not None else None
    empty = {"accuracy_ci": stats.accuracy_frame({}), "pairwise": stats.pairwise_frame({}),
             "significance": stats.significance_counts(stats.pairwise_frame({}))}  # fmt: skip
    got = {"accuracy_ci": s.accuracy, "pairwise": s.pairs, "significance": s.counts} if s else empty
    for name, frame in got.items():
        write_text(stat_dir / f"{name}.csv", frame.to_csv(index=False, float_format="%.6g"))
    if s is not None:
        out.accuracy_ci, out.counts = s.accuracy, s.counts

    out.costs = cost_frame(results, methods)
    history = (results_root / "history") if results_root is not None else None
    out.changes = changes(results, keep_history(results, history) if history else None, methods)

    split = ", ".join(sorted(set(results[results.stage == "final"].eval_split))) or cfg.data.final_eval
    seeds = len(cfg.train.final_seeds)
    tex = {
        "accuracy": latex.accuracy_table(summ, per, group_of, study.name, split, seeds),
        "selection": latex.selection_table(sel, study.name, cfg.data.tune_eval),
        "published": latex.published_table(published if published is not None else pd.DataFrame(
            columns=["method", "published_as", "datasets", "ours", "published", "diff", "note"]),
            study.name, str(cfg.published or "none configured")),
        "costs": latex.cost_table(out.costs, study.name),
    }  # fmt: skip
    tab_dir.mkdir(parents=True, exist_ok=True)
    for name, text in tex.items():
        write_text(tab_dir / f"{name}.tex", text)
    write_text(tab_dir / "tables.tex", latex.document(list(tex)))
    out.tables = [f"tables/{name}.tex" for name in [*tex, "tables"]]
    return out
