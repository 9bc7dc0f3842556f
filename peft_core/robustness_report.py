"""The robustness report: ID vs OOD accuracy along WiSE-FT's alpha, per method.

Input: the per-data-set tables of :mod:`peft_core.robustness` (one row per
final run, alpha and eval set). Outputs, in ``reports/<study>/``:

* ``robustness.parquet``: those rows, concatenated (per seed);
* ``robustness.md``: per data set, the curve table (mean over seeds);
* ``figures/wise_<dataset>_<set>.{pdf,svg,png}``: per data set and shifted set
  (and ``ood_mean`` when there are several), the study's key figure, x = ID test
  accuracy, y = OOD accuracy, one line per mergeable method through its alphas
  (a non-mergeable method is one square: the fine-tuned model);
* ``robustness.html`` (``templates/robustness.html.j2``): self-contained (inline
  CSS and SVG, no script, no network): those figures and the tables.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .findings import findings_context, findings_markdown, robustness_findings
from .pages import figure, render, table_model
from .report import _fmt, _md_table
from .robustness import ID_SET, ROW_COLUMNS
from .results import write_parquet, write_text

EXPLAIN = (
    "WiSE-FT (Wortsman et al., 2022): the weights of each final run are interpolated with the pre-trained "
    "backbone, θ(α) = (1 − α)·θ_pre + α·θ_ft (for a PEFT method: the pre-trained weights plus α times its merged "
    "delta); the fine-tuned head is kept at every α, so α = 0 is the pre-trained backbone read out by that head and "
    "α = 1 the fine-tuned model. Methods that can not be merged (prompts, sequential adapters) have only α = 1. "
    "ID = the data set's `{split}` split; OOD = the shifted test sets declared in the config (subset-class sets are "
    "scored with the logits restricted to their classes). Accuracies in %, mean over final seeds; no α is selected."
)


def curve_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, alpha): ID accuracy and each eval set's accuracy, mean over seeds."""
    if rows.empty:
        return pd.DataFrame(columns=["dataset", "method", "mergeable", "alpha", "seeds"])
    keys = ["dataset", "method", "mergeable", "alpha"]
    wide = rows.pivot_table(index=keys + ["seed"], columns="eval_set", values="accuracy", sort=False).reset_index()
    sets = sorted(dict.fromkeys(rows.eval_set), key=lambda s: s != ID_SET)  # ID first, then listed order
    agg = {s: (s, "mean") for s in sets if s in wide}
    out = wide.groupby(keys, sort=False).agg(seeds=("seed", "nunique"), **agg).reset_index()
    ood = [s for s in sets if s != ID_SET]
    if len(ood) > 1:
        out["ood_mean"] = out[ood].mean(axis=1)
    first = {m: i for i, m in enumerate(dict.fromkeys(rows.method))}
    where = {d: i for i, d in enumerate(dict.fromkeys(rows.dataset))}
    order = out.dataset.map(where) * len(first) + out.method.map(first)
    return out.assign(_order=order).sort_values(["_order", "alpha"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _ood_sets(rows: pd.DataFrame, dataset: str) -> list[str]:
    return [s for s in dict.fromkeys(rows[rows.dataset == dataset].eval_set) if s != ID_SET]


def _split_of(rows: pd.DataFrame, dataset: str, eval_set: str) -> str:
    r = rows[(rows.dataset == dataset) & (rows.eval_set == eval_set)]
    return str(r.split.iloc[0]) if len(r) else "?"


def render_markdown(study: str, rows: pd.DataFrame) -> str:
    curves = curve_frame(rows)
    split = ", ".join(sorted(set(rows[rows.eval_set == ID_SET].split))) or "test"
    lines = [f"# {study}: robustness under distribution shift (WiSE-FT)", "", EXPLAIN.format(split=split), ""]
    lines += findings_markdown(robustness_findings(curves, ID_SET, chance_of(rows)))
    for dataset in dict.fromkeys(rows.dataset):
        ood = _ood_sets(rows, dataset)
        named = ", ".join(f"`{s}` ({_split_of(rows, dataset, s)})" for s in ood)
        lines += [f"## {dataset}: ID `{_split_of(rows, dataset, ID_SET)}` vs {named}", ""]
        c = curves[curves.dataset == dataset]
        cols = [ID_SET, *ood] + (["ood_mean"] if "ood_mean" in c and len(ood) > 1 else [])
        header = ["method", "α", "seeds", "ID", *ood] + (["OOD mean"] if "ood_mean" in cols else [])
        body = []
        for r in c.itertuples():
            vals = [_fmt(getattr(r, k) * 100 if isinstance(getattr(r, k), float) else getattr(r, k), 2) for k in cols]
            name = r.method if r.mergeable else f"{r.method} (not mergeable)"
            body.append([name, f"{r.alpha:g}", str(r.seeds), *vals])
        lines += [_md_table(header, body, 1), ""]
    lines += ["Per seed: `robustness.parquet` (columns: " + ", ".join(ROW_COLUMNS) + ").", ""]
    return "\n".join(lines)


def figure_stem(dataset: str, eval_set: str) -> str:
    """``figures/<stem>.{pdf,svg,png}`` of one ID-vs-OOD plot (``eval_set``: a shifted set or ood_mean)."""
    return f"wise_{dataset}_{eval_set}"


def draw_figures(rows: pd.DataFrame, fig_dir: Path) -> dict[tuple[str, str], tuple[str, dict[str, Path]]]:
    """Per data set and shifted set (and their mean, when there are several): the ID-vs-OOD figure."""
    from .figures import id_vs_ood, save_figure

    curves, methods, out = curve_frame(rows), list(dict.fromkeys(rows.method)), {}
    for dataset in dict.fromkeys(rows.dataset):
        ood = _ood_sets(rows, dataset)
        for s in ood + (["ood_mean"] if len(ood) > 1 else []):
            title = "mean over OOD sets" if s == "ood_mean" else f"{s} ({_split_of(rows, dataset, s)})"
            fig = id_vs_ood(curves[curves.dataset == dataset], ID_SET, s, methods)
            caption = (f"{dataset}: ID vs {title} accuracy along α (hollow: α = 0, the pre-trained backbone; "
                       "line ends: α = 1, fine-tuned; squares: not mergeable, α = 1 only).")  # fmt: skip
            out[(dataset, s)] = (caption, save_figure(fig, fig_dir, figure_stem(dataset, s)))
    return out


def chance_of(rows: pd.DataFrame) -> dict[str, float]:
    """Chance accuracy (%) of each data set's in-distribution test set."""
    ident = rows[rows.eval_set == ID_SET].drop_duplicates("dataset")
    return {r.dataset: 100.0 / r.n_classes for r in ident.itertuples()}


def render_html(study: str, rows: pd.DataFrame, figures: dict | None = None, out_dir: Path | None = None) -> str:
    """``robustness.html`` from ``templates/robustness.html.j2``; ``figures``: :func:`draw_figures`'s."""
    curves = curve_frame(rows)
    split = ", ".join(sorted(set(rows[rows.eval_set == ID_SET].split))) or "test"
    sections = []
    for dataset in dict.fromkeys(rows.dataset):
        c = curves[curves.dataset == dataset]
        ood = _ood_sets(rows, dataset)
        figs = [figure(paths, caption, f"{dataset} ID vs {s}", out_dir)
                for (d, s), (caption, paths) in (figures or {}).items() if d == dataset and out_dir is not None]  # fmt: skip
        shown = c.copy()
        pct = [k for k in [ID_SET, *ood, "ood_mean"] if k in shown]
        shown[pct] = shown[pct] * 100
        shown = shown.drop(columns=["dataset"]).rename(columns={ID_SET: "ID (%)", "ood_mean": "OOD mean (%)", "alpha": "α"})
        shown = shown.rename(columns={s: f"{s} (%)" for s in ood})
        sections.append({"dataset": dataset, "figures": figs, "table": table_model(shown)})
    explain = EXPLAIN.format(split=split).replace("`", "")
    found = findings_context(robustness_findings(curves, ID_SET, chance_of(rows)))
    return render("robustness.html.j2", study=study, explain=explain, sections=sections, findings=found)


def build_robustness_report(study: str, tables: list[Path], out_dir: Path) -> pd.DataFrame:
    """Concatenate the per-data-set tables; write robustness.{parquet,md,html}."""
    frames = [pd.read_parquet(t) for t in tables]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "robustness.parquet", rows)
    write_text(out_dir / "robustness.md", render_markdown(study, rows))
    figures = draw_figures(rows, out_dir / "figures")
    write_text(out_dir / "robustness.html", render_html(study, rows, figures, out_dir))
    return rows
