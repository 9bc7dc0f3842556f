"""The studies' qualitative findings, checked on a study's own numbers.

Each check returns a :class:`Finding`: a one-line statement, whether it holds
on these results, and the numbers behind it. The reports print them (so a
reader sees, e.g., that the demo's PEFT methods land close to full
fine-tuning, or that they do not), and ``tests/unit/test_demo_findings.py``
asserts the demo's on its committed tables. Pure pandas: no torch.

What is checked, after Mai et al. (CVPR 2025) and V-PEFT Bench:

* every data set is learnt: the best method far above chance, the linear probe
  at least twice chance (frozen features that carry information);
* the headline: tuned PEFT methods close to each other and to full
  fine-tuning, and above the linear probe on the structured group (the tasks
  farthest from the upstream data);
* the spread between methods is of the size of the tuning grid's spread (a
  method's own configurations differ as much as methods do);
* convergence: the final runs' last-epoch training accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .config import Study

#: not PEFT: the two ends the PEFT methods are compared with
BASELINES = ("linear", "full")
#: "far above chance": the best method's error at most this share of chance's error
FAR_ABOVE = 0.5
#: "close": PEFT methods' Means within this many points of the best PEFT method
CLOSE_POINTS = 10.0


@dataclass(frozen=True)
class Finding:
    name: str
    holds: bool
    statement: str
    numbers: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return f"{'holds' if self.holds else 'does not hold'}: {self.statement}"


def chance(study: Study, dataset: str) -> float:
    """Chance accuracy (%) of a data set: one over its number of classes."""
    return 100.0 / study.cfg.datasets[dataset].num_classes


def learnt(per: pd.DataFrame, study: Study) -> list[Finding]:
    """Per data set: best method far above chance, linear probe >= 2x chance (holes never count)."""
    out = []
    for dataset, g in per.groupby("dataset", sort=False):
        g = g.dropna(subset=["mean"])
        c = chance(study, dataset)
        if g.empty:
            out.append(Finding(f"learnt:{dataset}", False, f"{dataset}: no finished method"))
            continue
        best = g.loc[g["mean"].idxmax()]
        far = best["mean"] >= 100 - FAR_ABOVE * (100 - c)
        lin = g[g.method == "linear"]
        lin_acc = float(lin["mean"].iloc[0]) if len(lin) else math.nan
        lin_ok = not math.isnan(lin_acc) and lin_acc >= 2 * c
        text = (
            f"{dataset} (chance {c:.1f} %): best {best.method} {best['mean']:.1f} %"
            + (f", linear probe {lin_acc:.1f} % ({lin_acc / c:.1f}x chance)" if not math.isnan(lin_acc) else "")
        )
        out.append(
            Finding(
                f"learnt:{dataset}",
                bool(far and (lin_ok or math.isnan(lin_acc))),
                text,
                {"chance": c, "best": float(best["mean"]), "linear": lin_acc},
            )
        )
    return out


def headline(summ: pd.DataFrame) -> list[Finding]:
    """PEFT methods close to each other and to full FT; PEFT above linear on structured tasks."""
    done = summ[summ.complete.astype(bool)].set_index("method")
    peft = done.drop(index=[m for m in BASELINES if m in done.index])
    if peft.empty:
        return []
    out = []
    top, bottom = peft["mean"].max(), peft["mean"].min()
    close = peft[peft["mean"] >= top - CLOSE_POINTS]
    numbers = {"peft_best": float(top), "peft_worst": float(bottom), "peft_close": float(len(close)), "peft_n": float(len(peft))}
    text = (
        f"{len(close)} of {len(peft)} PEFT methods within {CLOSE_POINTS:g} points of the best PEFT Mean "
        f"({peft['mean'].idxmax()} {top:.1f}); range {bottom:.1f}-{top:.1f}"
    )
    if "full" in done.index:
        full = float(done.at["full", "mean"])
        numbers["full"] = full
        text += f"; full fine-tuning {full:.1f} ({full - top:+.1f} vs the best PEFT)"
        holds = len(close) * 2 > len(peft) and abs(full - top) <= CLOSE_POINTS
    else:
        holds = len(close) * 2 > len(peft)
    out.append(Finding("peft_close", bool(holds), text, numbers))
    if "structured" in done.columns and "linear" in done.index:
        lin = float(done.at["linear", "structured"])
        above = peft["structured"] > lin
        median = float(peft["structured"].median())
        out.append(
            Finding(
                "structured_above_linear",
                bool(above.mean() > 0.5 and median - lin >= 5.0),
                f"structured group: {int(above.sum())} of {len(peft)} PEFT methods above the linear probe "
                f"({lin:.1f}); PEFT median {median:.1f} ({median - lin:+.1f} points)",
                {"linear": lin, "peft_median": median, "above": float(above.sum())},
            )
        )
    return out


def sensitivity(sel: pd.DataFrame, summ: pd.DataFrame) -> list[Finding]:
    """Is the spread between PEFT methods of the size of the spread within their tuning grids?"""
    tuned = sel[(sel.grid_size > 1) & ~sel.method.isin(BASELINES)]
    done = summ[summ.complete.astype(bool) & ~summ.method.isin(BASELINES)]
    if tuned.empty or len(done) < 2:
        return []
    within = float(tuned.grid_spread.median())
    between = float(done["mean"].max() - done["mean"].median())
    return [
        Finding(
            "grid_spread",
            bool(within >= 0.5 * between),
            f"median validation spread inside a tuned PEFT method's grid {within:.1f} points vs "
            f"{between:.1f} points between the best PEFT method and the median one "
            f"({tuned.method.nunique()} PEFT methods tuned on more than one configuration)",
            {"within": within, "between": between},
        )
    ]


def convergence_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, method): mean over the final runs of the last epoch's training loss and accuracy (%)."""
    cols = ["final_train_loss", "final_train_accuracy"]
    final = results[(results.stage == "final") & (results.status == "ok")]
    if final.empty or any(c not in final for c in cols):
        return pd.DataFrame(columns=["dataset", "method", *cols])
    out = final.groupby(["dataset", "method"], sort=False)[cols].mean().reset_index()
    out["final_train_accuracy"] *= 100
    return out


def converged(conv: pd.DataFrame, threshold: float = 90.0) -> list[Finding]:
    if conv.empty or conv.final_train_accuracy.isna().all():
        return []
    low = conv[conv.final_train_accuracy < threshold]
    return [
        Finding(
            "converged",
            low.empty,
            f"{len(conv) - len(low)} of {len(conv)} final (data set, method) runs end with training accuracy "
            f">= {threshold:g} %"
            + f" (median {conv.final_train_accuracy.median():.0f} %)"
            + ("" if low.empty else "; lowest: " + ", ".join(
                f"{r.dataset}/{r.method} {r.final_train_accuracy:.0f}"
                for r in low.nsmallest(5, "final_train_accuracy").itertuples())),  # fmt: skip
            {"below": float(len(low))},
        )
    ]


def study_findings(per: pd.DataFrame, summ: pd.DataFrame, sel: pd.DataFrame, results: pd.DataFrame, study: Study) -> list[Finding]:
    return [
        *learnt(per, study),
        *headline(summ),
        *sensitivity(sel, summ),
        *converged(convergence_frame(results)),
    ]


def ensemble_findings(per: pd.DataFrame) -> list[Finding]:
    """Do ensembles of different methods (members chosen on validation) beat the best single method on test?

    ``per`` is :func:`peft_core.ensemble_report.per_dataset_summary`; the best single method is an
    oracle choice on test, so a win is conservative.
    """
    rows = per[(per.selection == "greedy_val") & (per.stage == "final")] if len(per) else per
    out = []
    for rule, g in rows.groupby("rule", sort=False) if len(rows) else []:
        multi = g[g.members.str.contains(r"\+", regex=True)]
        wins = multi[multi.gain > 0]
        names = ", ".join(f"{r.dataset} ({100 * r.gain:+.1f})" for r in wins.itertuples())
        out.append(
            Finding(
                f"ensemble_wins:{rule}",
                len(wins) > 0,
                f"{rule} ensembles of different methods (members chosen on validation) beat the best single "
                f"method on test on {len(wins)} of {g.dataset.nunique()} data sets" + (f": {names}" if names else "; none did"),
                {"wins": float(len(wins)), "datasets": float(g.dataset.nunique())},
            )
        )
    return out


def robustness_findings(curves: pd.DataFrame, id_set: str, chance_of: dict[str, float]) -> list[Finding]:
    """From the WiSE-FT curves (:func:`peft_core.robustness_report.curve_frame`, fractions):

    the shift is a shift (pre-trained features, i.e. the linear probe, well above chance on it
    and lower than in distribution); WiSE-FT curves are not flat; and whether full
    fine-tuning keeps less of its accuracy under the shift than the PEFT methods do.
    """
    out = []
    for dataset, c in curves.groupby("dataset", sort=False):
        ood = [k for k in c.columns if k not in ("dataset", "method", "mergeable", "alpha", "seeds", id_set, "ood_mean")]
        if not ood:
            continue
        col = "ood_mean" if "ood_mean" in c else ood[0]
        end = c[c.alpha == 1.0].set_index("method")
        ch = chance_of.get(dataset, math.nan)
        if "linear" in end.index:
            lin_id, lin_ood = 100 * end.at["linear", id_set], 100 * end.at["linear", col]
            out.append(
                Finding(
                    f"shift:{dataset}",
                    bool(lin_ood >= 2 * ch and lin_ood < lin_id),
                    f"{dataset}: the shift is a shift, not noise: linear probe (frozen pre-trained features) "
                    f"{lin_ood:.1f} % shifted vs {lin_id:.1f} % in distribution (chance {ch:.1f} %)",
                    {"linear_id": lin_id, "linear_ood": lin_ood},
                )
            )
        merge = c[c.mergeable.astype(bool)]
        span = merge.groupby("method")[col].agg(lambda s: 100 * (s.max() - s.min()))
        if len(span):
            out.append(
                Finding(
                    f"wise_not_flat:{dataset}",
                    bool(span.median() >= 2.0),
                    f"{dataset}: WiSE-FT curves move the shifted accuracy by a median {span.median():.1f} points "
                    f"over alpha ({len(span)} mergeable methods)",
                    {"median_span": float(span.median())},
                )
            )
        retain = (end[col] / end[id_set]).drop(index=[m for m in BASELINES if m in end.index])
        if "full" in end.index and len(retain):
            full = float(end.at["full", col] / end.at["full", id_set])
            peft = float(retain.median())
            out.append(
                Finding(
                    f"full_loses_more:{dataset}",
                    full < peft,
                    f"{dataset}: full fine-tuning keeps {100 * full:.0f} % of its in-distribution accuracy under the "
                    f"shift, the median PEFT method {100 * peft:.0f} %: full fine-tuning "
                    + ("loses more robustness than PEFT" if full < peft else "does not lose more robustness than PEFT"),
                    {"full_retained": full, "peft_retained": peft},
                )
            )
    return out


def findings_markdown(findings: list[Finding]) -> list[str]:
    if not findings:
        return []
    return ["## Findings (checked on these numbers)", "", *[f"- {f.line()}" for f in findings], ""]


def findings_context(findings: list[Finding]) -> list[dict[str, object]]:
    """What the templates' ``findings`` macro shows: one item per finding."""
    return [{"holds": f.holds, "line": f.line()} for f in findings]


def upstream_text(study: Study) -> str | None:
    """One sentence on how the demo backbone was pre-trained and how well (None for real checkpoints)."""
    from .demo import upstream_metadata

    pre = study.cfg.backbone.pretrain
    meta = upstream_metadata(study.cfg.backbone.checkpoint) if pre is not None else None
    if meta is None:
        return None
    acc = meta["accuracy"]
    parts = ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items() if k != "mean")
    mean = f"mean {100 * acc['mean']:.1f} %" if "mean" in acc else ""
    return (
        f"Backbone pre-trained on the demo's upstream task ({pre.images} images x {pre.epochs} epochs, "
        f"distinct from every downstream data set): held-out accuracy {mean}" + (f" ({parts})" if parts else "") + "."
    )


CONVERGENCE_NOTE = (
    "Training accuracy (%) / loss over the last epoch's batches, in training mode (dropout and drop-path on), "
    "mean over the final seeds: an under-trained method shows here before it shows in the test table."
)


def convergence_text(conv: pd.DataFrame) -> pd.DataFrame:
    """Methods x data sets, each cell ``"acc / loss"`` (empty frame when no cell recorded them)."""
    if conv.empty or conv.final_train_accuracy.isna().all():
        return pd.DataFrame()
    methods, datasets = list(dict.fromkeys(conv.method)), list(dict.fromkeys(conv.dataset))
    acc = conv.pivot(index="method", columns="dataset", values="final_train_accuracy").reindex(index=methods, columns=datasets)
    loss = conv.pivot(index="method", columns="dataset", values="final_train_loss").reindex(index=methods, columns=datasets)
    text = {d: [f"{a:.0f} / {b:.2f}" if not math.isnan(a) else "—" for a, b in zip(acc[d], loss[d])] for d in datasets}
    return pd.DataFrame({"method": methods, **text})
