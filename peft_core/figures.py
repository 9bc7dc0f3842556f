"""The reports' figures: one function ``(frame) -> matplotlib Figure`` each, saved by one helper.

Every figure is drawn with the Agg backend inside :func:`style` (an ``rc_context``, so
nothing global changes): fonts embedded as TrueType in PDF (``pdf.fonttype 42``) and as
paths in SVG, a fixed ``svg.hashsalt`` and no dates in the metadata, so regenerating a
figure from the same numbers gives byte-identical PDF, SVG and PNG files.

Colours: the Okabe–Ito palette (colour-blind safe) crossed with markers. A method's
colour and marker depend only on its name (:data:`KNOWN_METHODS` order, unknown names
after them in the order seen), so a method looks the same in every figure and study.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, same output everywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .results import write_with  # noqa: E402

# Okabe & Ito (2008), without its yellow (unreadable as text on white)
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P")
# The registered methods in the reference table's order (peft_core/methods): their styles never move.
KNOWN_METHODS = (
    "linear", "full", "bitfit", "ln", "difffit", "ssf", "lora", "fact_tt", "fact_tk", "adapter", "houlsby",
    "adaptformer", "convpass", "repadapter", "vpt_shallow", "vpt_deep", "vqt", "selective",
)  # fmt: skip
FORMATS = ("pdf", "svg", "png")
RC = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
    "svg.hashsalt": "peft-vision-bench",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "path.simplify": False,
}
METADATA = {
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": "peft-vision-bench"},
    "svg": {"Date": None, "Creator": "peft-vision-bench"},
    "png": {"Software": "peft-vision-bench"},
}


@contextmanager
def style() -> Iterator[None]:
    """The figures' matplotlib settings, for the duration of a ``with`` block."""
    with plt.rc_context(RC):
        yield


def method_style(method: str, seen: tuple[str, ...] = ()) -> dict[str, str]:
    """Colour and marker of ``method``: fixed for known methods, else by its place in ``seen``."""
    if method in KNOWN_METHODS:
        i = KNOWN_METHODS.index(method)
    else:
        extra = [m for m in dict.fromkeys(seen) if m not in KNOWN_METHODS]
        i = len(KNOWN_METHODS) + (extra.index(method) if method in extra else len(extra))
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[(i // len(OKABE_ITO)) % len(MARKERS)]}


def save_figure(fig: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``fig`` as ``<out_dir>/<stem>.{pdf,svg,png}`` (atomically, deterministically); close it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with style():
        for fmt in FORMATS:
            path = out_dir / f"{stem}.{fmt}"
            write_with(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, metadata=METADATA[fmt]))
            paths[fmt] = path
    plt.close(fig)
    return paths


def _message(fig: Figure, ax, text: str) -> Figure:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


# ------------------------------------------------------------------ the main report


def pareto_front(params: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal params and higher accuracy), by params."""
    order = sorted(range(len(params)), key=lambda i: (params[i], -accuracy[i]))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def accuracy_vs_params(summ: pd.DataFrame) -> Figure:
    """Mean test accuracy vs trainable parameters (log x; 0 shown at 1), complete methods,
    with the Pareto front (no method both smaller and more accurate)."""
    with style():
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        pts = summ.dropna(subset=["mean"])
        if pts.empty:
            return _message(fig, ax, "No complete method yet.")
        x = pts.params.clip(lower=1.0).to_numpy(float)
        y = pts["mean"].to_numpy(float)
        front = pareto_front(list(x), list(y))
        ax.step(x[front], y[front], where="post", color="0.4", lw=1, ls="--", zorder=1, label="Pareto front")
        seen = tuple(pts.method)
        for xi, yi, m in zip(x, y, pts.method):
            s = method_style(m, seen)
            ax.scatter(xi, yi, s=28, color=s["color"], marker=s["marker"], edgecolor="white", lw=0.4, zorder=2)
            ax.annotate(m, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=6.5)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters, excl. head (log; 0 drawn at 1)")
        ax.set_ylabel("mean test accuracy (%)")
        ax.legend(loc="lower right", frameon=False)
        ax.grid(alpha=0.3, lw=0.5)
        return fig


def rank_heatmap(ranks: pd.DataFrame) -> Figure:
    """Methods x data sets ranks (1 = best), colour-blind-safe sequential scale (cividis)."""
    table = ranks.drop(columns=["mean rank"], errors="ignore")
    with style():
        fig, ax = plt.subplots(figsize=(1.6 + 0.55 * max(len(table.columns), 1), 0.8 + 0.24 * max(len(table), 1)))
        if table.empty:
            return _message(fig, ax, "No ranks yet.")
        vals = table.to_numpy(float)
        im = ax.imshow(vals, cmap="cividis_r", vmin=1, vmax=max(len(table), 2), aspect="auto")
        ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns], rotation=45, ha="right")
        ax.set_yticks(range(len(table)), [str(i) for i in table.index])
        for (i, j), v in np.ndenumerate(vals):
            if not math.isnan(v):
                light = v <= (len(table) + 1) / 2  # cividis_r: good ranks are light
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=6, color="black" if light else "white")
        ax.spines[:].set_visible(False)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="rank (1 = best)")
        return fig


def sensitivity(sel: pd.DataFrame, methods: list[str]) -> Figure:
    """Per method, the validation-accuracy spread (max - min, points) over its grid on each
    data set (dots) and their mean (bar)."""
    sel = sel[sel.method.isin(methods)]
    rows = [m for m in methods if m in set(sel.method)]
    with style():
        fig, ax = plt.subplots(figsize=(5.0, 0.6 + 0.2 * max(len(rows), 1)))
        if not rows:
            return _message(fig, ax, "No tuning cells yet.")
        for i, m in enumerate(rows):
            mine = sel[sel.method == m]
            s = method_style(m, tuple(methods))
            ax.barh(i, mine.grid_spread.mean(), color=s["color"], alpha=0.45, height=0.65)
            ax.scatter(mine.grid_spread, [i] * len(mine), s=10, color=s["color"], marker=s["marker"], zorder=2)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlabel("validation accuracy spread over the grid (points)")
        ax.grid(axis="x", alpha=0.3, lw=0.5)
        return fig


def cd_diagram(test) -> Figure:
    """Critical-difference diagram (Demšar, 2006) of a :class:`peft_core.stats.RankTest`: average
    ranks on an axis (best left), thick bars joining methods the Nemenyi test does not separate
    (:func:`peft_core.stats.cliques`), and the critical difference drawn above the axis."""
    from .stats import ALPHA, cliques

    ranks = test.ranks.sort_values(kind="stable")
    k = len(ranks)
    half = (k + 1) // 2
    bars = cliques(ranks, test.nemenyi, ALPHA) if test.tested else []
    step, bar_gap = 0.28, 0.14
    first = -0.3 - bar_gap * len(bars) - 0.15  # the first label row, below the clique bars
    with style():
        fig, ax = plt.subplots(figsize=(6.0, 1.0 + step * half * 0.75))
        if not test.tested:
            return _message(fig, ax, test.caption())
        ax.axis("off")
        lo, hi = 1.0, float(max(k, 2))
        ax.plot([lo, hi], [0, 0], color="black", lw=0.8)
        for t in range(1, int(hi) + 1):
            ax.plot([t, t], [0, 0.07], color="black", lw=0.8)
            ax.text(t, 0.12, str(t), ha="center", va="bottom", fontsize=7)
        seen = tuple(ranks.index)
        left_x, right_x = lo - 0.06 * (hi - lo), hi + 0.06 * (hi - lo)
        for i, (m, r) in enumerate(ranks.items()):
            s = method_style(m, seen)
            row = i if i < half else k - 1 - i
            y = first - step * row
            end = left_x if i < half else right_x
            ax.plot([r, r, end], [0, y, y], color=s["color"], lw=1)
            ax.plot([r], [0], marker=s["marker"], color=s["color"], ms=4, zorder=3)
            text = f"{m} ({r:.2f})" if i < half else f"({r:.2f}) {m}"
            ax.text(end + (-0.02 if i < half else 0.02) * (hi - lo), y, text, ha="right" if i < half else "left",
                    va="center", fontsize=7, color=s["color"])  # fmt: skip
        for j, members in enumerate(bars):
            y = -0.3 - bar_gap * j
            ax.plot([ranks[members[0]] - 0.03, ranks[members[-1]] + 0.03], [y, y], color="black", lw=2.2,
                    solid_capstyle="round")  # fmt: skip
        top = 0.55
        ax.plot([lo, lo + test.cd], [top, top], color="black", lw=1)
        for x in (lo, lo + test.cd):
            ax.plot([x, x], [top - 0.05, top + 0.05], color="black", lw=1)
        ax.text(lo + test.cd / 2, top + 0.08, f"CD = {test.cd:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xlim(lo - 0.3 * (hi - lo), hi + 0.3 * (hi - lo))
        ax.set_ylim(first - step * (half - 1) - 0.2, top + 0.45)
        ax.set_title(f"{test.label}: Friedman p = {test.pvalue:.3g}, Nemenyi at α = {ALPHA:g}", fontsize=8)
        return fig


# ------------------------------------------------------------------ analyses


def id_vs_ood(curves: pd.DataFrame, id_col: str, ood: str, methods: list[str]) -> Figure:
    """WiSE-FT: x = ID accuracy, y = accuracy on ``ood`` (%), one line per method through its alphas
    (hollow: alpha = 0, filled: alpha = 1); a non-mergeable method is one square."""
    pts = curves.dropna(subset=[id_col, ood])
    with style():
        fig, ax = plt.subplots(figsize=(5.0, 3.6))
        if pts.empty:
            return _message(fig, ax, "No data.")
        for m in [m for m in methods if m in set(pts.method)]:
            c = pts[pts.method == m].sort_values("alpha")
            s = method_style(m, tuple(methods))
            x, y = c[id_col].to_numpy(float) * 100, c[ood].to_numpy(float) * 100
            if bool(c.mergeable.iloc[0]):
                ax.plot(x, y, color=s["color"], lw=1.2, marker=s["marker"], ms=3, label=m)
                ax.scatter(x[:1], y[:1], s=30, facecolor="white", edgecolor=s["color"], marker=s["marker"], zorder=3)
            else:
                ax.scatter(x, y, s=30, color=s["color"], marker="s", label=f"{m} (not mergeable)", zorder=3)
        ax.set_xlabel("ID accuracy (%)")
        ax.set_ylabel(f"{ood} accuracy (%)")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
        return fig


def ensemble_gain(per: pd.DataFrame) -> Figure:
    """Test gain of each ensemble (selection x rule) over the best single method, per data set (points)."""
    test = per[per.stage == "final"]
    with style():
        fig, ax = plt.subplots(figsize=(5.0, 2.8))
        if test.empty:
            return _message(fig, ax, "No test ensembles.")
        datasets = list(dict.fromkeys(test.dataset))
        kinds = list(dict.fromkeys(zip(test.selection, test["rule"])))
        width = 0.8 / len(kinds)
        for k, (sel, rule) in enumerate(kinds):
            g = test[(test.selection == sel) & (test["rule"] == rule)].set_index("dataset").reindex(datasets)
            xs = np.arange(len(datasets)) + (k - (len(kinds) - 1) / 2) * width
            ax.bar(xs, g.gain.to_numpy(float) * 100, width=width, color=OKABE_ITO[k % len(OKABE_ITO)],
                   label=f"{sel}, {rule}")  # fmt: skip
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        ax.set_ylabel("gain over best single (points)")
        ax.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(axis="y", alpha=0.3, lw=0.5)
        return fig
