"""The summary tables, built from ``results.parquet`` rows: aggregates never hide a hole.

``final_table`` has one row per (method, data set) of the study, including the
holes: a data set a method never finished, or on which every final seed
diverged, has ``seeds_ok == 0`` and no mean. ``summary_frame`` computes group
means, the Mean, params and PPT of a method over *complete* rows only (every
data set with at least one finished seed); ``rank_frame`` ranks complete
methods among themselves and lists incomplete ones after them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from .config import Study
from .metrics import ppt

GROUP_ORDER = ("natural", "specialized", "structured")
HOLE = "—"  # what a missing aggregate or data set shows in the tables


def _ok(g: pd.DataFrame) -> pd.DataFrame:
    return g[(g.status == "ok") & g.accuracy.notna()]


def _one_or_mixed(values: pd.Series) -> Any:
    """The single value of a column over seeds, ``"mixed"`` if they differ, None if there is none."""
    seen = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    return None if not seen else seen[0] if len(seen) == 1 else "mixed"


def config_text(row: Any) -> str:
    """A cell's configuration as compact JSON: its hyper-parameters plus lr and weight decay."""
    hp = json.loads(row["hparams"]) if isinstance(row["hparams"], str) else dict(row["hparams"] or {})
    hp.update(lr=float(row["lr"]), weight_decay=float(row["weight_decay"]))
    return json.dumps(hp, sort_keys=True, separators=(",", ":"))


def with_config(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` plus ``config`` (per cell, compact JSON) and ``precision`` (None where a cell predates it)."""
    out = results.copy()
    out["config"] = [config_text(r) for _, r in results.iterrows()] if len(results) else []
    if "precision" not in out:
        out["precision"] = None
    return out


def _seeds_total(study: Study, n_rows: int) -> int:
    return max(len(study.cfg.train.final_seeds), n_rows)


def final_table(results: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Per (method, data set) of the study: test accuracy (%) mean/std over the finished seeds,
    seeds ok/total, diverged seeds, split, precision and the configuration the seeds ran.

    Every data set x method that shows up anywhere in ``results`` gets a row, so a method
    whose final runs are missing (or all diverged) on a data set has a row with no mean.
    """
    res = with_config(results)
    final = res[res.stage == "final"]
    datasets = [d for d in study.dataset_names() if d in set(res.dataset)]
    methods = [m for m in study.method_names() if m in set(res.method)]
    rows = []
    for method in methods:
        for dataset in datasets:
            g = final[(final.method == method) & (final.dataset == dataset)]
            ok = _ok(g)
            acc = ok.accuracy * 100
            # the chosen configuration: the final runs', else the selected tuning cell's
            src = g if len(g) else res[(res.method == method) & (res.dataset == dataset) & res.selected.astype(bool)]
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "group": study.cfg.datasets[dataset].group,
                    "mean": acc.mean() if len(ok) else math.nan,
                    "std": acc.std(ddof=1) if len(ok) > 1 else math.nan,  # one seed: no spread to report
                    "seeds": len(g),
                    "seeds_ok": len(ok),
                    "seeds_total": _seeds_total(study, len(g)),
                    "diverged": int((g.status != "ok").sum()),
                    "trainable_params": float(g.trainable_params.iloc[0]) if len(g) else math.nan,
                    "split": _one_or_mixed(g.eval_split) or study.cfg.data.final_eval,
                    "precision": _one_or_mixed(g.precision),
                    "config": _one_or_mixed(src.config),
                    "hparams": _one_or_mixed(src.hparams),
                }
            )
    return pd.DataFrame(rows)


def summary_frame(results: pd.DataFrame, study: Study, per: pd.DataFrame | None = None) -> pd.DataFrame:
    """Methods x data sets (test %), group means, Mean, params (M), PPT, coverage and mean rank.

    Complete methods (every data set has a finished seed) come first, in config order, then
    the incomplete ones, whose group means, Mean, params and PPT are NaN (shown as a hole).
    """
    per = final_table(results, study) if per is None else per
    if per.empty:
        return pd.DataFrame(columns=["method", "mean", "params", "params_m", "ppt", "coverage", "complete", "mean_rank"])
    datasets = list(dict.fromkeys(per.dataset))
    groups = [g for g in GROUP_ORDER if any(study.cfg.datasets[d].group == g for d in datasets)]
    rows = []
    for method, pm in per.groupby("method", sort=False):
        pm = pm.set_index("dataset")
        row: dict[str, Any] = {"method": method}
        row.update({d: float(pm.at[d, "mean"]) for d in datasets})
        done = sum(not math.isnan(row[d]) for d in datasets)
        complete = done == len(datasets)
        for g in groups:
            vals = [row[d] for d in datasets if study.cfg.datasets[d].group == g]
            row[g] = sum(vals) / len(vals) if complete else math.nan
        row["mean"] = sum(row[d] for d in datasets) / len(datasets) if complete else math.nan
        params = float(pm.trainable_params.mean()) if complete else math.nan
        row["params"] = params
        row["params_m"] = params / 1e6
        row["ppt"] = ppt(row["mean"] / 100, params) if complete else math.nan
        row.update(coverage=f"{done}/{len(datasets)}", datasets_ok=done, datasets_total=len(datasets), complete=complete)
        rows.append(row)
    summ = pd.DataFrame(rows)
    summ = pd.concat([summ[summ.complete], summ[~summ.complete]], ignore_index=True)
    ranks = rank_frame(summ, datasets)["mean rank"]
    summ["mean_rank"] = summ.method.map(ranks)
    return summ


def detail_columns(summ: pd.DataFrame, per: pd.DataFrame) -> pd.DataFrame:
    """``summ`` plus, per data set ``d``, the columns ``d:std``, ``d:seeds_ok``, ``d:seeds_total``,
    ``d:diverged``, ``d:split``, ``d:precision`` and ``d:config`` (the wide summary.csv)."""
    fields = ("std", "seeds_ok", "seeds_total", "diverged", "split", "precision", "config")
    out = summ.copy()
    for d in dict.fromkeys(per.dataset):
        pd_ = per[per.dataset == d].set_index("method")
        for f in fields:
            out[f"{d}:{f}"] = out.method.map(pd_[f])
    return out


def rank_frame(summ: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Rank of each method per data set (1 = best test accuracy; ties share the best rank).

    Complete methods (a value on every data set) are ranked among themselves and sorted by mean
    rank; an incomplete method shows, per data set it has, the rank it would take among the
    complete ones, gets no mean rank and comes after every complete method.
    """
    table = summ.set_index("method")[datasets].astype(float)
    full = table.notna().all(axis=1)
    ranks = table[full].rank(ascending=False, method="min")
    ranks["mean rank"] = ranks.mean(axis=1)
    ranks = ranks.sort_values("mean rank", kind="stable")
    rest = table[~full].copy()
    for d in datasets:
        rest[d] = [math.nan if math.isnan(v) else 1 + int((table.loc[full, d] > v).sum()) for v in rest[d]]
    rest["mean rank"] = math.nan
    return pd.concat([ranks, rest]) if len(rest) else ranks


def seeds_note(r: Any) -> str:
    """`` (k/n seeds)`` when only some final seeds finished, else nothing."""
    return f" ({int(r['seeds_ok'])}/{int(r['seeds_total'])} seeds)" if 0 < r["seeds_ok"] < r["seeds_total"] else ""


def cell_text(per: pd.DataFrame, method: str, dataset: str) -> str:
    """One summary cell: ``mean ± std``, flagged with ``(k/n seeds)``; a hole shows why it is one."""
    hit = per[(per.method == method) & (per.dataset == dataset)]
    if hit.empty or hit.iloc[0]["seeds"] == 0:
        return HOLE
    r = hit.iloc[0]
    if r["seeds_ok"] == 0:
        return f"{HOLE} (0/{int(r['seeds_total'])} seeds)"
    text = f"{r['mean']:.1f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.1f}")
    return text + seeds_note(r)


def method_deviations(methods: list[str]) -> dict[str, tuple[str, ...]]:
    """Each method's declared deviations from the reference (``Method.deviations``, where it has any)."""
    try:
        from .errors import InputError
        from .methods import get_method
    except ImportError:  # torch missing: the report still builds, without the list
        return {}
    out = {}
    for m in methods:
        try:
            dev = tuple(getattr(get_method(m), "deviations", ()) or ())
        except (InputError, KeyError):
            continue
        if dev:
            out[m] = dev
    return out


def protocol(results: pd.DataFrame, study: Study, per: pd.DataFrame) -> dict[str, Any]:
    """What the numbers are: evaluation split(s), final seeds, precision(s), method deviations."""
    final = results[results.stage == "final"]
    precisions = sorted({str(p) for p in final.get("precision", pd.Series(dtype=object)).dropna()})
    return {
        "split": ", ".join(sorted(set(final.eval_split))) or study.cfg.data.final_eval,
        "seeds": sorted(int(s) for s in final.seed.unique()),
        "precision": ", ".join(precisions) + (" (mixed)" if len(precisions) > 1 else "") if precisions else "unknown",
        "deviations": method_deviations(list(dict.fromkeys(per.method))) if len(per) else {},
    }


HOLES_NOTE = (
    "(k/n seeds) marks a mean over only k of the n final seeds (the others diverged or are missing); "
    f"{HOLE} marks a data set with none. Group means, Mean, Params, PPT and ranks are computed for complete "
    "methods only (coverage n/n): a method with a hole is listed after them, never ranked above them."
)
