"""The ensembles stage: read the cells' predictions, analyse, write the report.

Inputs are the per-data-set tables (``aggregate_dataset``) and, optionally, the
selection files. Predictions are read from the cell layout
``<results>/cells/<dataset>/<method>/<cell>/predictions.parquet``.

* Validation (``tune`` stage): the chosen tuning cell of every method
  (``selection/<dataset>/<method>.json`` ``chosen``, else the table's
  ``selected`` rows), all evaluated on the tuning-evaluation split. Greedy
  member selection runs here and nowhere else.
* Test (``final`` stage): the final runs, one per seed. An ensemble is scored
  per seed on its members' runs with that seed; the report averages over seeds.

Outputs (every number carries its ``split`` and ``seed``):

* ``ensembles.parquet``: one row per (dataset, selection, rule, split, seed):
  ``members`` ("+"-joined, in the order added), ``accuracy`` of the ensemble,
  ``best_single`` / ``best_single_method`` (see :func:`best_single`) and
  ``gain = accuracy - best_single``. ``selection`` is ``greedy_val`` (members
  chosen greedily on validation) or ``all`` (every method with predictions).
* ``diversity.parquet``: one row per (dataset, split, seed, method pair).
* ``figures/ensemble_gain.{pdf,svg,png}``: the test gain of each ensemble per data set;
* ``ensembles.md`` and a self-contained ``ensembles.html`` (``templates/ensembles.html.j2``:
  inline CSS, the gain figure as inline SVG, shaded heatmap tables; no script, no network).

Fewer than two methods in the tables: only ``ensembles.md``, with a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import ensembles as ens
from .errors import InputError
from .findings import ensemble_findings, findings_context, findings_markdown
from .pages import figure, render, table_model
from .report import _fmt, _md_table
from .results import PREDICTIONS, read_json, write_parquet, write_text

ENSEMBLE_COLUMNS = [
    "dataset", "selection", "rule", "members", "n_members", "stage", "split", "seed",
    "accuracy", "best_single", "best_single_method", "gain", "n_eval",
]
DIVERSITY_COLUMNS = [
    "dataset", "stage", "split", "seed", "method_a", "method_b", "n", "accuracy_a", "accuracy_b",
    "disagreement", "error_overlap", "confident_q", "confident_k", "confident_overlap",
    "confident_agreement", "n_confident_both",
]


@dataclass(frozen=True)
class Run:
    """One cell's predictions on one split."""

    method: str
    split: str
    seed: int
    index: np.ndarray
    labels: np.ndarray
    logits: np.ndarray


def read_run(cell_dir: Path, method: str, split: str, seed: int) -> Run:
    path = cell_dir / PREDICTIONS
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    p = pd.read_parquet(path).sort_values("index")
    if p.empty:
        raise InputError(f"{path}: no predictions (diverged cell?)")
    logits = np.stack([np.asarray(z, dtype=np.float64) for z in p["logits"]])
    return Run(method, split, int(seed), p["index"].to_numpy(), p["label"].to_numpy(), logits)


def _check_aligned(runs: Sequence[Run], what: str) -> None:
    ref = runs[0]
    for r in runs[1:]:
        if not (np.array_equal(r.index, ref.index) and np.array_equal(r.labels, ref.labels)):
            raise InputError(
                f"{what}: {r.method} and {ref.method} were evaluated on different samples of {r.split!r}"
            )


def _chosen_cells(frame: pd.DataFrame, dataset: str, selections: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """The chosen tuning cell per method (from the selection files when given)."""
    tune = frame[frame.stage == "tune"]
    if selections:
        keep = [
            i
            for i, r in tune.iterrows()
            if (sel := selections.get((dataset, r.method))) is not None and sel["chosen"] == r.cell
        ]
        chosen = tune.loc[keep]
        for r in chosen.itertuples():
            sel = selections[(dataset, r.method)]
            if sel.get("selected_on", r.eval_split) != r.eval_split:
                raise InputError(f"{dataset}/{r.method}: selection made on {sel['selected_on']!r}, cell on {r.eval_split!r}")
    else:
        chosen = tune[tune.selected.astype(bool)]
    return chosen.drop_duplicates(["method"])


def best_single(final: dict[str, dict[int, float]]) -> str | None:
    """The method with the highest mean test accuracy over its seeds (ties: listed first)."""
    means = {m: float(np.mean(list(a.values()))) for m, a in final.items() if a}
    return max(means, key=lambda m: (means[m], -list(means).index(m))) if means else None


def analyse_dataset(
    frame: pd.DataFrame, results_root: Path, selections: dict[tuple[str, str], dict], q: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ensemble rows and diversity rows of one data set's table."""
    dataset = str(frame.dataset.iloc[0])
    methods = list(dict.fromkeys(frame.method))
    ok = frame[frame.status == "ok"]
    final_rows = ok[ok.stage == "final"]
    final_splits = set(frame[frame.stage == "final"].eval_split)

    def cell_dir(r: Any) -> Path:
        return results_root / "cells" / dataset / r.method / r.cell

    # Validation: chosen tuning cells only (never the final split).
    chosen = _chosen_cells(ok, dataset, selections)
    leaked = set(chosen.eval_split) & final_splits
    if leaked:
        raise InputError(f"{dataset}: a chosen tuning cell was evaluated on the final split {sorted(leaked)}")
    val = {r.method: read_run(cell_dir(r), r.method, r.eval_split, r.seed) for r in chosen.itertuples()}
    val = {m: val[m] for m in methods if m in val}
    # Test: final runs per method and seed.
    test: dict[str, dict[int, Run]] = {m: {} for m in methods}
    for r in final_rows.itertuples():
        test[r.method][int(r.seed)] = read_run(cell_dir(r), r.method, r.eval_split, r.seed)
    test = {m: runs for m, runs in test.items() if runs}
    seeds = sorted({s for runs in test.values() for s in runs})
    if val:
        _check_aligned(list(val.values()), f"{dataset} validation")
    for s in seeds:
        runs = [test[m][s] for m in test if s in test[m]]
        _check_aligned(runs, f"{dataset} seed {s}")

    diversity = []
    groups: list[tuple[str, list[Run]]] = [("tune", list(val.values()))]
    groups += [("final", [test[m][s] for m in test if s in test[m]]) for s in seeds]
    for stage, runs in groups:
        probs = {r.method: ens.softmax(r.logits) for r in runs}
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                pa, pb = probs[a.method].argmax(1), probs[b.method].argmax(1)
                conf = ens.confident_agreement(probs[a.method], probs[b.method], q)
                diversity.append(
                    {
                        "dataset": dataset, "stage": stage, "split": a.split, "seed": a.seed,
                        "method_a": a.method, "method_b": b.method, "n": len(a.labels),
                        "accuracy_a": ens.accuracy(pa, a.labels), "accuracy_b": ens.accuracy(pb, b.labels),
                        "disagreement": ens.disagreement(pa, pb),
                        "error_overlap": ens.error_overlap(pa, pb, a.labels),
                        "confident_q": q, "confident_k": conf.k, "confident_overlap": conf.overlap,
                        "confident_agreement": conf.agreement, "n_confident_both": conf.n_both,
                    }
                )

    rows: list[dict[str, Any]] = []
    if len(val) < 2 and len(test) < 2:
        return rows, diversity
    val_logits = {m: r.logits for m, r in val.items()}
    val_labels = next(iter(val.values())).labels if val else np.array([])
    val_single = {m: ens.accuracy(z.argmax(1), val_labels) for m, z in val_logits.items()}
    val_best = max(val_single, key=lambda m: (val_single[m], -list(val_single).index(m))) if val_single else None
    test_single = {m: {s: ens.accuracy(r.logits.argmax(1), r.labels) for s, r in runs.items()} for m, runs in test.items()}
    test_best = best_single(test_single)
    test_logits = {m: {s: r.logits for s, r in runs.items()} for m, runs in test.items()}
    test_labels = {s: next(test[m][s] for m in test if s in test[m]).labels for s in seeds}

    def add(selection: str, rule: str, members: Sequence[str], stage: str, split: str, seed: int,
            acc: float, best: str | None, best_acc: float, n: int) -> None:
        rows.append(
            {
                "dataset": dataset, "selection": selection, "rule": rule, "members": "+".join(members),
                "n_members": len(members), "stage": stage, "split": split, "seed": seed, "accuracy": acc,
                "best_single": best_acc, "best_single_method": best, "gain": acc - best_acc, "n_eval": n,
            }
        )

    for rule in ens.RULES:
        candidates: list[tuple[str, tuple[str, ...]]] = []
        if val_logits:
            greedy = ens.greedy_select(val_logits, val_labels, rule)
            candidates.append(("greedy_val", greedy.members))
        candidates.append(("all", tuple(test) if test else tuple(val_logits)))
        for selection, members in candidates:
            if val_logits and all(m in val_logits for m in members):
                acc = ens.accuracy(ens.ensemble_predict([val_logits[m] for m in members], rule), val_labels)
                split, seed = next(iter(val.values())).split, next(iter(val.values())).seed
                add(selection, rule, members, "tune", split, seed, acc, val_best, val_single[val_best], len(val_labels))
            per_seed = ens.seed_matched_accuracy(test_logits, test_labels, members, rule)
            for s, acc in per_seed.items():
                best_acc = test_single[test_best].get(s, math.nan) if test_best else math.nan
                split = test[members[0]][s].split
                add(selection, rule, members, "final", split, s, acc, test_best, best_acc, len(test_labels[s]))
    return rows, diversity


# ------------------------------------------------------------------ summaries


def per_dataset_summary(ensembles: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, selection, rule, split): mean accuracy / best single / gain over seeds (fractions)."""
    if ensembles.empty:
        return pd.DataFrame(
            columns=["dataset", "selection", "rule", "split", "members", "seeds", "accuracy", "best_single",
                     "best_single_method", "gain"]
        )
    keys = ["dataset", "selection", "rule", "stage", "split"]
    out = (
        ensembles.groupby(keys, sort=False)
        .agg(
            members=("members", "first"),
            seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s))),
            accuracy=("accuracy", "mean"),
            best_single=("best_single", "mean"),
            best_single_method=("best_single_method", "first"),
            gain=("gain", "mean"),
        )
        .reset_index()
    )
    return out


def averaged_summary(per: pd.DataFrame) -> pd.DataFrame:
    """Per (selection, rule, split): mean over data sets of the per-data-set means; wins = datasets with gain > 0."""
    if per.empty:
        return pd.DataFrame(columns=["selection", "rule", "split", "datasets", "accuracy", "best_single", "gain", "wins"])
    return (
        per.groupby(["selection", "rule", "stage", "split"], sort=False)
        .agg(
            datasets=("dataset", "nunique"),
            accuracy=("accuracy", "mean"),
            best_single=("best_single", "mean"),
            gain=("gain", "mean"),
            wins=("gain", lambda g: int((g > 0).sum())),
        )
        .reset_index()
    )


def mean_matrix(diversity: pd.DataFrame, metric: str, methods: list[str]) -> pd.DataFrame:
    """Symmetric method x method mean of ``metric`` over the given rows (NaN-skipping)."""
    m = pd.DataFrame(np.nan, index=methods, columns=methods, dtype=float)
    if diversity.empty:
        return m
    means = diversity.groupby(["method_a", "method_b"])[metric].mean()
    for (a, b), v in means.items():
        if a in m.index and b in m.index:
            m.loc[a, b] = m.loc[b, a] = v
    diag = {"disagreement": 0.0, "error_overlap": 1.0, "confident_overlap": 1.0, "confident_agreement": 1.0}
    for a in methods:
        m.loc[a, a] = diag.get(metric, np.nan)
    return m


# ------------------------------------------------------------------ rendering

DEFINITIONS = (
    "**Disagreement** = fraction of samples where two methods predict different classes. "
    "**Error overlap** = |both wrong| / |either wrong| (Jaccard of the error sets; 1 = same mistakes). "
    "**Confident overlap** (q = {q:g}) = share of the ⌈q·n⌉ most confident samples (max softmax) that two "
    "methods have in common; **confident agreement** = fraction of those shared samples with the same prediction. "
    "Ensembles: **softmax_average** = argmax of the mean softmax probability; **majority_vote** = plurality of "
    "argmax votes, ties broken by summed probability. **greedy_val** members are chosen by greedy forward "
    "selection on `{val}` (chosen tuning cells) only; **all** = every method. Test numbers are seed-matched: "
    "for each final seed the members' runs with that seed are ensembled; accuracies are then averaged over seeds. "
    "**Best single** = the method with the highest mean test accuracy (an oracle choice, so the gain is "
    "conservative); on `{val}` rows, the best method on validation. Validation rows of greedy_val are "
    "optimistic (the members were chosen on them)."
)


GAIN_CAPTION = ("Test accuracy of each ensemble (member selection, combination rule) minus the best single "
                "method's, per data set, mean over seeds (points).")


def _pct(v: Any) -> str:
    return _fmt(v * 100 if isinstance(v, float) else v, 2)


def _signed(v: float) -> str:
    return "–" if math.isnan(v) else f"{v * 100:+.2f}"


def _pairs_table(diversity: pd.DataFrame) -> pd.DataFrame:
    test = diversity[diversity.stage == "final"]
    if test.empty:
        return pd.DataFrame()
    cols = ["disagreement", "error_overlap", "confident_overlap", "confident_agreement"]
    return test.groupby(["method_a", "method_b"], sort=False)[cols].mean().reset_index()


def render_markdown(study: str, ensembles: pd.DataFrame, diversity: pd.DataFrame, q: float, val_split: str) -> str:
    per = per_dataset_summary(ensembles)
    avg = averaged_summary(per)
    lines = [f"# {study}: prediction diversity and ensembles of PEFT methods", "", DEFINITIONS.format(q=q, val=val_split), ""]
    lines += findings_markdown(ensemble_findings(per))
    lines += ["## Ensemble vs best single method, averaged over data sets (accuracy %, gain in points)", ""]
    rows = [
        [r.selection, r.rule, r.split, str(r.datasets), _pct(r.accuracy), _pct(r.best_single), _signed(r.gain), f"{r.wins}/{r.datasets}"]
        for r in avg.itertuples()
    ]
    lines += [_md_table(["selection", "rule", "split", "datasets", "ensemble", "best single", "gain", "wins"], rows, 3), ""]
    lines += ["## Per data set (test: mean over seeds)", ""]
    rows = [
        [r.dataset, r.selection, r.rule, r.members, r.split, r.seeds, _pct(r.accuracy), f"{_pct(r.best_single)} ({r.best_single_method})", _signed(r.gain)]
        for r in per.itertuples()
    ]
    header = ["dataset", "selection", "rule", "members", "split", "seeds", "ensemble", "best single", "gain"]
    lines += [_md_table(header, rows, 6), ""]
    pairs = _pairs_table(diversity)
    lines += ["## Diversity of method pairs (test; mean over seeds and data sets)", ""]
    if pairs.empty:
        lines += ["No pair of methods has final runs.", ""]
    else:
        rows = [
            [r.method_a, r.method_b, _fmt(r.disagreement, 3), _fmt(r.error_overlap, 3), _fmt(r.confident_overlap, 3), _fmt(r.confident_agreement, 3)]
            for r in pairs.itertuples()
        ]
        header = ["method a", "method b", "disagreement", "error overlap", "confident overlap", "confident agreement"]
        lines += [_md_table(header, rows, 2), ""]
    lines += ["Per-sample details: `ensembles.parquet` (per seed) and `diversity.parquet` (per pair, split and seed).", ""]
    return "\n".join(lines)


def _color(v: float) -> str:
    lo, hi = (246, 248, 250), (9, 105, 218)
    t = min(max(v, 0.0), 1.0)
    return "rgb({},{},{})".format(*(round(a + (b - a) * t) for a, b in zip(lo, hi)))


def heat_table(matrix: pd.DataFrame) -> dict[str, Any]:
    """A method x method matrix in [0, 1] as a table model, each cell shaded by its value."""
    frame = matrix.reset_index(names="")
    model = table_model(frame, digits=2)
    for row, (_, r) in zip(model["rows"], frame.iterrows()):
        for cell, c in zip(row[1:], frame.columns[1:]):
            v = float(r[c])
            if not math.isnan(v):
                cell["style"] = f"background:{_color(v)};color:{'#ffffff' if v > 0.55 else '#1b1f24'}"
    return model


def _heat_pair(div: pd.DataFrame, methods: list[str], where: str) -> list[dict[str, Any]]:
    return [{"title": f"{title} ({where})", "table": heat_table(mean_matrix(div, metric, methods))}
            for metric, title in (("disagreement", "Disagreement"), ("error_overlap", "Error overlap"))]  # fmt: skip


def _md_parts(text: str) -> list[dict[str, str]]:
    """The definitions paragraph split into plain, **bold** and `code` parts (the template marks them up)."""
    import re

    parts = re.split(r"(\*\*.+?\*\*|`.+?`)", text)
    return [{"kind": "b", "text": p[2:-2]} if p.startswith("**") else {"kind": "code", "text": p[1:-1]}
            if p.startswith("`") else {"kind": "", "text": p} for p in parts if p]  # fmt: skip


def render_html(study: str, ensembles: pd.DataFrame, diversity: pd.DataFrame, q: float, val_split: str,
                methods: list[str], gain: tuple[str, dict[str, Path]] | None = None, out_dir: Path | None = None) -> str:  # fmt: skip
    """``ensembles.html`` from ``templates/ensembles.html.j2``; ``gain``: the gain figure's caption and files."""
    per = per_dataset_summary(ensembles)
    avg = averaged_summary(per)
    pct = ["accuracy", "best_single", "gain"]
    avg_shown = avg.drop(columns=["stage"]).copy()
    per_shown = per.drop(columns=["stage"]).copy()
    for f in (avg_shown, per_shown):
        f[pct] = f[pct] * 100
    rename = {"accuracy": "ensemble (%)", "best_single": "best single (%)", "gain": "gain (points)", "best_single_method": "best single method"}
    test_div = diversity[diversity.stage == "final"] if not diversity.empty else diversity
    datasets = []
    for dataset in dict.fromkeys(diversity.dataset) if not diversity.empty else []:
        d = diversity[diversity.dataset == dataset]
        datasets.append({"name": dataset, "test": _heat_pair(d[d.stage == "final"], methods, f"{dataset}, test, mean over seeds"),
                         "val": _heat_pair(d[d.stage == "tune"], methods, f"{dataset}, {val_split}, chosen tuning cells")})  # fmt: skip
    pairs = _pairs_table(diversity)
    return render(
        "ensembles.html.j2", study=study, definitions=_md_parts(DEFINITIONS.format(q=q, val=val_split)),
        averaged=table_model(avg_shown.rename(columns=rename)), per_dataset=table_model(per_shown.rename(columns=rename)),
        gain_figure=figure(gain[1], gain[0], "ensemble gain", out_dir) if gain and out_dir is not None else None,
        overall=_heat_pair(test_div, methods, "test, mean over seeds and data sets"), datasets=datasets,
        pairs=table_model(pairs, digits=3) if not pairs.empty else None,
        findings=findings_context(ensemble_findings(per)),
    )  # fmt: skip


def note_markdown(study: str, methods: list[str]) -> str:
    return (
        f"# {study}: prediction diversity and ensembles\n\n"
        f"Not computed: diversity and ensembles need at least two methods; this study has "
        f"{len(methods)} ({', '.join(methods) or 'none'}).\n"
    )


def build_ensembles(
    study: str,
    tables: list[Path],
    out_dir: Path,
    results_root: Path,
    selections: list[Path] | None = None,
    q: float = 0.2,
) -> pd.DataFrame:
    """Analyse every data set's table; write the four outputs (or the note); return the ensemble rows."""
    frame = pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True)
    methods = list(dict.fromkeys(frame.method))
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(methods) < 2:
        write_text(out_dir / "ensembles.md", note_markdown(study, methods))
        return pd.DataFrame(columns=ENSEMBLE_COLUMNS)
    sel: dict[tuple[str, str], dict] = {}
    for p in selections or []:
        s = read_json(p)
        sel[(s["dataset"], s["method"])] = s
    rows, div_rows = [], []
    for _, g in frame.groupby("dataset", sort=False):
        r, d = analyse_dataset(g, results_root, sel, q)
        rows += r
        div_rows += d
    ensembles = pd.DataFrame(rows, columns=ENSEMBLE_COLUMNS)
    diversity = pd.DataFrame(div_rows, columns=DIVERSITY_COLUMNS)
    tune_splits = sorted(set(frame[frame.stage == "tune"].eval_split))
    val_split = ", ".join(tune_splits) or "validation"
    write_parquet(out_dir / "ensembles.parquet", ensembles)
    write_parquet(out_dir / "diversity.parquet", diversity)
    write_text(out_dir / "ensembles.md", render_markdown(study, ensembles, diversity, q, val_split))
    from .figures import ensemble_gain, save_figure

    gain = (GAIN_CAPTION, save_figure(ensemble_gain(per_dataset_summary(ensembles)), out_dir / "figures", "ensemble_gain"))
    write_text(out_dir / "ensembles.html", render_html(study, ensembles, diversity, q, val_split, methods, gain, out_dir))
    return ensembles
