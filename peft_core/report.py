"""Result tables and the report, built from the cells' JSON files only.

``aggregate_dataset`` turns one data set's cell directories into tidy rows
(one row per cell, tuning and final); ``build_report`` concatenates those
into ``results.parquet`` and renders ``summary.md``, ``summary.csv``, the paper
files (figures, LaTeX tables, statistics: ``paper.py``) and a self-contained
``index.html`` (``templates/index.html.j2``: inline CSS and SVG figures, no
script, no network). The tables themselves live in ``summary.py`` (holes are
never averaged over) and ``published.py`` (ours vs published, like with like).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Study
from .findings import (
    CONVERGENCE_NOTE,
    convergence_frame,
    convergence_text,
    findings_context,
    findings_markdown,
    study_findings,
    upstream_text,
)
from .pages import figure, render, render_table, table_model
from .paper import MAIN_FIGURES, Outputs, write_outputs
from .provenance import provenance_summary, provenance_text, row_columns
from .published import PUBLISHED_AS, published_frame, tuned_values  # noqa: F401 (re-exported)
from .results import METRICS, SPEC, read_json, write_parquet, write_text
from .summary import (  # noqa: F401 (rank_frame, summary_frame: re-exported)
    GROUP_ORDER,
    HOLE,
    HOLES_NOTE,
    cell_text,
    detail_columns,
    final_table,
    protocol,
    rank_frame,
    summary_frame,
    with_config,
)


def _scalar(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


def cell_row(cell_dir: Path, study: str, group: str, final_eval: str, selected: set[str]) -> dict[str, Any]:
    m = read_json(cell_dir / METRICS)
    s = read_json(cell_dir / SPEC)
    stage = "final" if s["eval_split"] == final_eval else "tune"
    row = {
        "study": study,
        "dataset": s["dataset"],
        "group": group,
        "method": s["method"],
        "stage": stage,
        "cell": m["cell"],
        "train_split": s["train_split"],
        "eval_split": s["eval_split"],
        "seed": s["seed"],
        "lr": s["lr"],
        "weight_decay": s["weight_decay"],
        "epochs": s["epochs"],
        "batch_size": s["batch_size"],
        "hparams": json.dumps(s["hparams"], sort_keys=True),
        "status": m["status"],
        "diverged_epoch": m.get("diverged_epoch"),
        "accuracy": m["accuracy"] if m["accuracy"] is not None else math.nan,
        "n_eval": m["n_eval"],
        "trainable_params": m["trainable_params"],
        "head_params": m["head_params"],
        "ppt": m["ppt"] if m["ppt"] is not None else math.nan,
        "images_per_s": m["images_per_s"],
        "peak_memory_mb": m["peak_memory_mb"],
        "wall_time_s": m["wall_time_s"],
        "train_s": m["train_s"],
        "final_train_loss": m.get("final_train_loss", math.nan),
        "final_train_accuracy": m.get("final_train_accuracy", math.nan),  # cells before it was recorded: NaN
        "device": m["device"],
        "precision": m.get("precision"),  # None for cells written before metrics.json had it
        "selected": stage == "tune" and m["cell"] in selected,
        "backbone": s["backbone"]["model"],
        "schedule": s.get("schedule"),
        "init": s.get("init"),
        "interpolation": s.get("interpolation"),
        "normalize": s.get("normalize"),
        "image_size": s.get("image_size"),
        # what computed it: the checksum of the engine + method sources it ran (its code stamp),
        # the library versions, and how it was trained (None for cells before they were recorded)
        "code_stamp": m.get("code"),
        "torch": m.get("torch"),
        "peft_core": m.get("peft_core"),
        "batched": m.get("batched"),
        "feature_cache": m.get("feature_cache"),
    }
    # data provenance: the content fingerprints of what the cell read (peft_core/fingerprint.py)
    # and the record of where each cache came from (peft_core/provenance.py)
    inputs = m.get("inputs") or {}
    for role in ("train", "eval", "checkpoint"):
        row[f"{role}_sha256"] = (inputs.get(role) or {}).get("sha256")
    row.update(row_columns(inputs))
    row.update({f"hp_{k}": _scalar(v) for k, v in s["hparams"].items()})
    return row


def uniform_hparams(frame: pd.DataFrame) -> pd.DataFrame:
    """``hp_<name>`` columns with one type: where methods share a name with different types
    (LAST's ``heads: 1``, HST's ``heads: [1, 2]``), every value is written as JSON text."""
    for col in [c for c in frame.columns if c.startswith("hp_")]:
        kinds = {type(v) for v in frame[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if str in kinds and len(kinds) > 1:
            frame[col] = [v if v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v))
                          else json.dumps(v) for v in frame[col]]  # fmt: skip
    return frame


def selected_by(selection: dict) -> str:
    """How a selection file's configuration was chosen: ``grid``, ``halving``, or noise-aware halving."""
    strategy = selection.get("strategy", "grid")
    z = selection.get("keep_within_se")
    return f"{strategy}, keep_within_se={z:g}" if z is not None else strategy


def aggregate_dataset(
    study: str, group: str, final_eval: str, cell_dirs: list[Path], selections: list[Path], out: Path
) -> pd.DataFrame:
    """One row per cell of one data set; ``selected`` marks the chosen tuning cells."""
    sels = {sel["chosen"]: sel for sel in map(read_json, selections)}
    frame = uniform_hparams(pd.DataFrame([cell_row(Path(d), study, group, final_eval, set(sels)) for d in cell_dirs]))
    # which strategy chose the configuration, and the training images the choice cost (peft_core/halving.py)
    picked = [sels.get(c) if chosen else None for c, chosen in zip(frame.cell, frame.selected)]
    frame["selected_by"] = [selected_by(p) if p else None for p in picked]
    frame["selection_images"] = pd.array([p.get("selection_images") if p else None for p in picked], dtype="Int64")
    write_parquet(out, frame)
    return frame


# ------------------------------------------------------------------ tables


def selection_frame(results: pd.DataFrame, study: Study | None = None) -> pd.DataFrame:
    """The chosen configuration per (dataset, method), in config order, with its grid's spread."""
    tune = results[results.selected]
    if study is not None:
        rank = {(d, m): i for i, (d, m) in enumerate((d, m) for d in study.dataset_names() for m in study.method_names())}
        tune = tune.assign(_o=[rank.get((d, m), len(rank)) for d, m in zip(tune.dataset, tune.method)])
        tune = tune.sort_values("_o").drop(columns="_o")
    cols = ["dataset", "method", "hparams", "lr", "weight_decay", "accuracy", "trainable_params", "eval_split"]
    cols += [c for c in ("selected_by", "selection_images") if c in tune.columns]
    out = tune[cols].rename(columns={"accuracy": "val_accuracy", "eval_split": "selected_on"}).copy()
    out["val_accuracy"] = out.val_accuracy * 100
    grid = results[results.stage == "tune"].groupby(["dataset", "method"]).accuracy
    spread = (grid.max() - grid.min()).mul(100).rename("grid_spread").reset_index()
    size = grid.size().rename("grid_size").reset_index()
    return out.merge(size, on=["dataset", "method"], sort=False).merge(spread, on=["dataset", "method"], sort=False)


# ------------------------------------------------------------------ rendering


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _params_m(params: float) -> str:
    """Millions with 4 significant digits: 85.8, 0.2949, 0.002944 (PEFT counts span 5 decades)."""
    return "–" if math.isnan(params) else f"{params / 1e6:.4g}"


def _images_m(images: Any) -> str:
    """Training images a selection cost, in millions (the hole mark where unrecorded)."""
    return HOLE if images is None or pd.isna(images) else f"{images / 1e6:.3g}"


def _md_table(header: list[str], rows: list[list[str]], align_right_from: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i < align_right_from else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i >= align_right_from else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _num(v: Any, digits: int = 2) -> str:
    """A number, or the hole mark for a missing aggregate."""
    return HOLE if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v, digits)


def render_markdown(results: pd.DataFrame, study: Study) -> str:
    per = final_table(results, study)
    summ = summary_frame(results, study, per)
    sel = selection_frame(results, study)
    datasets = list(dict.fromkeys(per.dataset))
    groups = [g for g in GROUP_ORDER if g in summ.columns]
    cfg = study.cfg
    info = protocol(results, study, per)
    lines = [
        f"# {study.name}: PEFT methods on {cfg.backbone.model}",
        "",
        f"Split: `{info['split']}` (after training on `{cfg.data.final_train}`). Final seeds: {info['seeds']}. "
        f"Precision: {info['precision']}.",
        "",
        provenance_text(prov := provenance_summary(results)),
        "",
        *[f"**Warning:** {w}." for w in prov["warnings"]],
        *([""] if prov["warnings"] else []),
        f"Top-1 accuracy (%), mean ± std over the finished seeds; {HOLES_NOTE} Configurations were selected per "
        f"data set and method by accuracy on `{cfg.data.tune_eval}` after training on `{cfg.data.tune_train}` "
        "(never on test). Params: trainable parameters excluding the head, mean over data sets. "
        "PPT = Mean/100 · exp(−log10(Params/10⁷ + 1)).",
        "",
    ]
    up = upstream_text(study)
    lines += [up, ""] if up else []
    lines += findings_markdown(study_findings(per, summ, sel, results, study))
    if info["deviations"]:
        lines += ["Deviations from the reference implementation:", ""]
        lines += [f"- {m}: {d}" for m, devs in info["deviations"].items() for d in devs] + [""]
    lines += ["## Test accuracy", ""]
    header = ["method", *datasets, *[g.capitalize() for g in groups], "Mean", "Coverage", "Params (M)", "PPT", "Mean rank"]
    rows = [
        [r.method, *[cell_text(per, r.method, d) for d in datasets], *[_num(r[g]) for g in groups], _num(r["mean"]),
         r.coverage, HOLE if math.isnan(r.params) else _params_m(r.params), _num(r.ppt), _num(r.mean_rank, 1)]
        for _, r in summ.iterrows()
    ]  # fmt: skip
    lines += [_md_table(header, rows), ""]
    lines += _published_lines(summ, study, datasets, per, tuned_values(results))
    lines += ["## Selected configurations (validation accuracy, %)", ""]
    srows = [
        [r.dataset, r.method, r.hparams, f"{r.lr:g}", f"{r.weight_decay:g}", _fmt(r.val_accuracy, 1), f"{int(r.grid_size)}",
         _fmt(r.grid_spread, 1), getattr(r, "selected_by", None) or "grid", _images_m(getattr(r, "selection_images", None))]
        for r in sel.itertuples()
    ]  # fmt: skip
    header = ["dataset", "method", "hyper-parameters", "lr", "wd", "val acc", "grid", "grid spread", "by", "images (M)"]
    lines += [
        _md_table(header, srows, 3),
        "",
    ]
    conv = convergence_text(convergence_frame(results))
    if len(conv):
        lines += ["## Convergence (final runs, last epoch)", "", CONVERGENCE_NOTE, "",
                  _md_table(list(conv.columns), conv.values.tolist()), ""]  # fmt: skip
    div = results[results.status != "ok"]
    short = per[per.seeds_ok < per.seeds_total]
    lines += [
        "## Runs",
        "",
        f"{len(results)} cells ({int((results.stage == 'tune').sum())} tuning, "
        f"{int((results.stage == 'final').sum())} final); {len(div)} diverged"
        + ("" if div.empty else ": " + ", ".join(f"{r.dataset}/{r.method}/{r.cell}" for r in div.itertuples()))
        + ".",
        "",
    ]
    if len(short):
        lines += ["Final seeds short of the plan: " + ", ".join(
            f"{r.dataset}/{r.method} {int(r.seeds_ok)}/{int(r.seeds_total)} ok ({int(r.diverged)} diverged)"
            for r in short.itertuples()) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def _published(summ: pd.DataFrame, study: Study, per: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame | None:
    """Ours vs the study's published table (None when it has none)."""
    path = study.cfg.published
    if not path or not Path(path).is_file():
        return None
    return published_frame(summ, pd.read_csv(path), list(dict.fromkeys(per.dataset)), per, tuned_values(results))


def _published_lines(
    summ: pd.DataFrame, study: Study, datasets: list[str], per: pd.DataFrame, tuned: dict[str, dict[str, set]]
) -> list[str]:
    path = study.cfg.published
    if not path or not Path(path).is_file():
        return []
    comp = published_frame(summ, pd.read_csv(path), datasets, per, tuned)
    if comp.empty:
        return []
    rows = [[r.method, r.published_as, str(r.datasets), _num(r.ours), _fmt(r.published),
             HOLE if math.isnan(r.diff) else f"{r.diff:+.2f}", r.note] for r in comp.itertuples()]  # fmt: skip
    return [
        f"## Ours vs published (`{path}`)",
        "",
        "Mean test accuracy (%) over the data sets both report on which our selected configuration is what the "
        "published row ran (see `peft_core/published.py`); diff = ours − published. A method tuned over more "
        "than the published row and never selecting its configuration is not compared.",
        "",
        _md_table(["method", "published as", "datasets", "ours", "published", "diff", "note"], rows, 2),
        "",
    ]


def _summary_html(summ: pd.DataFrame, per: pd.DataFrame, datasets: list[str], groups: list[str]) -> str:
    """The main table: cells flagged like the markdown's, best value per column among complete methods."""
    cols = ["method", *datasets, *groups, "mean", "coverage", "params", "ppt", "mean_rank"]
    frame = summ[cols].rename(columns={"params": "params (M)", "ppt": "PPT", "mean_rank": "mean rank"})
    text = pd.DataFrame(index=frame.index)
    for d in datasets:
        text[d] = [cell_text(per, m, d) for m in summ.method]
    for c in [*groups, "mean", "PPT", "mean rank"]:
        text[c] = [_num(v, 1 if c == "mean rank" else 2) for v in frame[c]]
    text["params (M)"] = [HOLE if math.isnan(v) else _params_m(v) for v in frame["params (M)"]]
    return table_model(frame, [*datasets, *groups, "mean", "PPT"], eligible=summ.complete, text=text, second=True)


def _html_table(frame: pd.DataFrame, best_cols: list[str] | None = None, digits: int = 2,
                eligible: pd.Series | None = None, text: pd.DataFrame | None = None) -> str:  # fmt: skip
    """``frame`` as an HTML table (best per column of ``best_cols`` marked), for the pages not
    rendered from a template of their own."""
    return render_table(table_model(frame, best_cols, digits, eligible, text))


def _rank_table(ranks: pd.DataFrame) -> dict[str, Any]:
    """Methods x data sets ranks as a table model, shaded green (best) to white."""
    n = max(len(ranks), 1)
    frame = ranks.reset_index(names="method")
    model = table_model(frame, text=frame.apply(lambda c: c.map(lambda v: _num(v, 1 if c.name == "mean rank" else 0)
                                                                if isinstance(v, float) else str(v))))  # fmt: skip
    for row, (_, r) in zip(model["rows"], frame.iterrows()):
        for cell, c in zip(row, frame.columns):
            if c not in ("method", "mean rank") and not math.isnan(r[c]):
                cell["style"] = f"background:rgba(26,127,55,{0.55 * (1 - (r[c] - 1) / max(n - 1, 1)):.2f})"
    return model


def _matrix(counts: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    """Significance counts as a method x method table: row beats column on k of n data sets."""
    frame = pd.DataFrame("", index=methods, columns=methods)
    for r in counts.itertuples():
        if r.method_a in frame.index and r.method_b in frame.index:
            frame.loc[r.method_a, r.method_b] = f"{int(r.a_better)}/{int(r.datasets)}"
            frame.loc[r.method_b, r.method_a] = f"{int(r.b_better)}/{int(r.datasets)}"
    return table_model(frame.reset_index(names="better than →"))


def outputs_context(outputs: Outputs | None, out_dir: Path | None) -> dict[str, Any]:
    """The page's view of the paper files: inline figures, CIs, significance, costs, changes."""
    from .stats import N_RESAMPLES

    figs = {stem: None for stem in MAIN_FIGURES}
    ctx: dict[str, Any] = {"figures": figs, "cd_figures": [], "ci": None, "counts": None, "costs": None,
                           "changed": None, "paper_files": [], "n_resamples": N_RESAMPLES}  # fmt: skip
    if outputs is None or out_dir is None:
        return ctx
    for stem, (caption, paths) in outputs.figures.items():
        fig = figure(paths, caption, stem.replace("_", " "), out_dir)
        if stem.startswith("cd_"):
            ctx["cd_figures"].append(fig)
        else:
            figs[stem] = fig
    ctx["paper_files"] = outputs.tables
    if outputs.accuracy_ci is not None and len(outputs.accuracy_ci):
        ci = outputs.accuracy_ci.assign(text=[f"{r.mean:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}]"
                                              for r in outputs.accuracy_ci.itertuples()])  # fmt: skip
        wide = ci.pivot(index="method", columns="dataset", values="text").reindex(
            index=list(dict.fromkeys(ci.method)), columns=list(dict.fromkeys(ci.dataset))).fillna(HOLE)  # fmt: skip
        ctx["ci"] = table_model(wide.reset_index())
        ctx["counts"] = _matrix(outputs.counts, list(wide.index))
    if len(outputs.costs):
        costs = outputs.costs.rename(columns={"s_per_cell": "s / cell", "total_h": "total (h)",
                                              "peak_memory_mb": "peak memory (MB)", "images_per_s": "images/s"})  # fmt: skip
        text = pd.DataFrame({"s / cell": costs["s / cell"].map("{:.1f}".format), "total (h)": costs["total (h)"].map("{:.3g}".format),
                             "peak memory (MB)": costs["peak memory (MB)"].map("{:.0f}".format),
                             "images/s": costs["images/s"].map("{:.0f}".format)}, index=costs.index)  # fmt: skip
        ctx["costs"] = table_model(costs, text=text)
    ch = outputs.changes
    if ch:
        moves, cells = ch.get("moves"), ch.get("cells")
        why = cells.why.value_counts().to_dict() if cells is not None and len(cells) else {}
        ctx["changed"] = {
            "baseline": ch.get("baseline", False), "n_cells": 0 if cells is None else len(cells),
            "summary": ", ".join(f"{n} {w}" for w, n in why.items()) or "none",
            "moves": table_model(moves.rename(columns={"before": "mean before (%)", "after": "mean now (%)",
                                                       "delta": "change (points)", "largest_move": "largest move (points)",
                                                       "new_datasets": "new data sets"})) if moves is not None and len(moves) else None,
            "cells": table_model(cells) if cells is not None and len(cells) else None,
        }  # fmt: skip
    return ctx


def render_html(results: pd.DataFrame, study: Study, outputs: Outputs | None = None, out_dir: Path | None = None) -> str:
    """``index.html`` from ``templates/index.html.j2``; ``outputs`` (figures, statistics, costs,
    changes: :func:`peft_core.paper.write_outputs`, written under ``out_dir``) where built."""
    per = final_table(results, study)
    summ = summary_frame(results, study, per)
    sel = selection_frame(results, study)
    datasets = list(dict.fromkeys(per.dataset))
    groups = [g for g in GROUP_ORDER if g in summ.columns]
    cfg = study.cfg
    info = protocol(results, study, per)
    ppt_rank = summ.sort_values("ppt", ascending=False, kind="stable")[["method", "mean", "coverage", "params", "ppt"]]
    ppt_text = pd.DataFrame(
        {"mean": ppt_rank["mean"].map(_num), "ppt": ppt_rank.ppt.map(_num),
         "params": [HOLE if math.isnan(v) else _params_m(v) for v in ppt_rank.params]}, index=ppt_rank.index
    )  # fmt: skip
    sel_shown = sel.rename(
        columns={"val_accuracy": "val acc (%)", "trainable_params": "trainable", "weight_decay": "wd"}
    ).assign(lr=lambda f: f.lr.map("{:g}".format), wd=lambda f: f.wd.map("{:g}".format))
    sel_shown["trainable"] = sel_shown.trainable.map("{:,}".format)
    names = {"params": "params (M)", "ppt": "PPT"}
    context = {
        "study": study.name, "backbone": cfg.backbone.model, "split": info["split"], "final_train": cfg.data.final_train,
        "seeds": info["seeds"], "precision": info["precision"], "holes_note": HOLES_NOTE, "tune_eval": cfg.data.tune_eval,
        "provenance": provenance_text(prov := provenance_summary(results)), "provenance_warnings": prov["warnings"],
        "deviations": [(m, d) for m, devs in info["deviations"].items() for d in devs],
        "summary": _summary_html(summ, per, datasets, groups),
        "ranks": _rank_table(rank_frame(summ, datasets)),
        "ppt": table_model(ppt_rank.rename(columns=names), text=ppt_text.rename(columns=names)),
        "selection": table_model(sel_shown),
        "n_cells": len(results), "n_diverged": int((results.status != "ok").sum()),
        "ensembles_link": len(study.method_names()) >= 2,
        "upstream": upstream_text(study), "findings": findings_context(study_findings(per, summ, sel, results, study)),
        "convergence": table_model(conv) if len(conv := convergence_text(convergence_frame(results))) else None,
        "convergence_note": CONVERGENCE_NOTE,
    }  # fmt: skip
    context.update(outputs_context(outputs, out_dir))
    return render("index.html.j2", **context)


def results_table(results: pd.DataFrame, per: pd.DataFrame) -> pd.DataFrame:
    """The cells plus ``config`` (compact JSON) and, on final rows, their (data set, method)'s
    ``final_mean``/``final_std`` (%), ``seeds_ok``, ``seeds_total`` and ``seeds_diverged``."""
    out = with_config(results)
    keys = per.set_index(["dataset", "method"])
    idx = pd.MultiIndex.from_arrays([out.dataset, out.method])
    final = (out.stage == "final").to_numpy()
    for col, src in (("final_mean", "mean"), ("final_std", "std"), ("seeds_ok", "seeds_ok"),
                     ("seeds_total", "seeds_total"), ("seeds_diverged", "diverged")):  # fmt: skip
        vals = keys[src].reindex(idx).to_numpy(dtype=float) if len(keys) else [math.nan] * len(out)
        out[col] = pd.Series(vals, index=out.index).where(final)
    return out


def build_report(study: Study, tables: list[Path], out_dir: Path, results_root: Path | None = None) -> pd.DataFrame:
    """results.parquet, summary.{csv,md}, the paper files (:mod:`peft_core.paper`) and index.html.
    ``results_root`` (``results/<study>``): where the final runs' predictions are (for the
    confidence intervals and paired tests) and where the previous results table is kept."""
    results = uniform_hparams(pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    per = final_table(results, study)
    write_parquet(out_dir / "results.parquet", results_table(results, per))
    summ = detail_columns(summary_frame(results, study, per), per)
    write_text(out_dir / "summary.csv", summ.to_csv(index=False, float_format="%.4f"))
    write_text(out_dir / "summary.md", render_markdown(results, study))
    base = summary_frame(results, study, per)
    frames = {"per": per, "summ": base, "sel": selection_frame(results, study),
              "ranks": rank_frame(base, list(dict.fromkeys(per.dataset)))}  # fmt: skip
    outputs = write_outputs(results, study, frames, out_dir, results_root, _published(base, study, per, results))
    write_text(out_dir / "index.html", render_html(results, study, outputs, out_dir))
    return results
