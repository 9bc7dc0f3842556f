"""The robustness report: ID vs OOD accuracy along WiSE-FT's alpha, per method.

Input: the per-data-set tables of :mod:`peft_core.robustness` (one row per
final run, alpha and eval set). Outputs, in ``reports/<study>/``:

* ``robustness.parquet``: those rows, concatenated (per seed);
* ``robustness.md``: per data set, the curve table (mean over seeds);
* ``robustness.html``: self-contained (inline CSS and SVG, no script, no
  network): per data set and shifted set, the study's key figure, x = ID test
  accuracy, y = OOD accuracy, one polyline per mergeable method through its
  alphas (a non-mergeable method is one square: the fine-tuned model), and
  the tables.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from .findings import findings_html, findings_markdown, robustness_findings
from .report import CSS, _fmt, _html_table, _md_table
from .robustness import ID_SET, ROW_COLUMNS
from .results import write_parquet, write_text

# A categorical palette with enough distinct colours for every registered method.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
)  # fmt: skip

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


def chance_of(rows: pd.DataFrame) -> dict[str, float]:
    """Chance accuracy (%) of each data set's in-distribution test set."""
    ident = rows[rows.eval_set == ID_SET].drop_duplicates("dataset")
    return {r.dataset: 100.0 / r.n_classes for r in ident.itertuples()}


def _ticks(lo: float, hi: float) -> list[float]:
    step = next(s for s in (1, 2, 5, 10, 20, 25) if (hi - lo) / s <= 8)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def svg_id_vs_ood(curves: pd.DataFrame, ood: str, methods: list[str], label: str) -> str:
    """x = ID accuracy, y = accuracy on ``ood`` (both %), one polyline per method over alpha."""
    pts = curves.dropna(subset=[ID_SET, ood])
    if pts.empty:
        return "<p>No data.</p>"
    xs, ys = pts[ID_SET] * 100, pts[ood] * 100
    pad = 2.0
    x0, x1 = max(0.0, xs.min() - pad), min(100.0, xs.max() + pad)
    y0, y1 = max(0.0, ys.min() - pad), min(100.0, ys.max() + pad)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    w, h, left, top, pw, ph = 720, 440, 56, 16, 470, 370

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" class="curves" role="img" '
        f'aria-label="{html.escape(label)}">',
        f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>',
    ]
    for t in _ticks(x0, x1):
        parts.append(f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + ph}"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        parts.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>')
        parts.append(f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 30}" text-anchor="middle">ID accuracy (%)</text>')
    parts.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
        f"{html.escape(ood)} accuracy (%)</text>"
    )
    legend_y = top
    for k, method in enumerate(m for m in methods if m in set(pts.method)):
        colour = PALETTE[k % len(PALETTE)]
        c = pts[pts.method == method].sort_values("alpha")
        name = html.escape(method)
        coords = [(sx(a), sy(b)) for a, b in zip(c[ID_SET] * 100, c[ood] * 100)]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline class="curve" points="{path}" stroke="{colour}"><title>{name}</title></polyline>')
        for (x, y), r in zip(coords, c.itertuples()):
            tip = f"{name} α={r.alpha:g}: ID {getattr(r, ID_SET) * 100:.2f}%, {html.escape(ood)} {getattr(r, ood) * 100:.2f}%"
            if bool(r.mergeable):
                rad = 4.5 if r.alpha in (0.0, 1.0) else 3
                hollow = ' fill="#ffffff"' if r.alpha == 0.0 else f' fill="{colour}"'
                parts.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{rad}" stroke="{colour}"{hollow}><title>{tip}</title></circle>'
                )
            else:
                parts.append(
                    f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}"><title>{tip}</title></rect>'
                )
        lx = left + pw + 16
        marker = "▬" if bool(c.mergeable.iloc[0]) else "■"
        parts.append(f'<text x="{lx}" y="{legend_y + 10}" fill="{colour}">{marker} {name}</text>')
        legend_y += 15
    parts.append(
        f'<text x="{left}" y="{h - 8}" class="hint">○ α = 0 (pre-trained backbone), ● α = 1 (fine-tuned); '
        "■ not mergeable (α = 1 only)</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


CURVE_CSS = """
svg.curves{max-width:720px}svg .curve{fill:none;stroke-width:1.8;opacity:.85}svg .hint{fill:#57606a;font-size:10px}
"""


def render_html(study: str, rows: pd.DataFrame) -> str:
    curves = curve_frame(rows)
    methods = list(dict.fromkeys(rows.method))
    split = ", ".join(sorted(set(rows[rows.eval_set == ID_SET].split))) or "test"
    sections = []
    for dataset in dict.fromkeys(rows.dataset):
        c = curves[curves.dataset == dataset]
        ood = _ood_sets(rows, dataset)
        figs = []
        for s in ood + (["ood_mean"] if len(ood) > 1 else []):
            title = "mean over OOD sets" if s == "ood_mean" else f"{s} ({_split_of(rows, dataset, s)})"
            figs.append(
                f"<figure><figcaption>{html.escape(dataset)}: ID vs {html.escape(title)}</figcaption>"
                f"{svg_id_vs_ood(c, s, methods, f'{dataset} ID vs {title}')}</figure>"
            )
        shown = c.copy()
        pct = [k for k in [ID_SET, *ood, "ood_mean"] if k in shown]
        shown[pct] = shown[pct] * 100
        shown = shown.drop(columns=["dataset"]).rename(columns={ID_SET: "ID (%)", "ood_mean": "OOD mean (%)", "alpha": "α"})
        shown = shown.rename(columns={s: f"{s} (%)" for s in ood})
        sections.append(f"<h2>{html.escape(dataset)}</h2>{''.join(figs)}{_html_table(shown)}")
    explain = html.escape(EXPLAIN.format(split=split)).replace("`", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(study)} · robustness · peft-vision-bench</title><style>{CSS}{CURVE_CSS}</style></head>
<body>
<h1>{html.escape(study)}: robustness under distribution shift (WiSE-FT)</h1>
<p class="note">{explain}</p>
{findings_html(robustness_findings(curves, ID_SET, chance_of(rows)))}
{"".join(sections)}
<p class="note">Per seed: <code>robustness.parquet</code>.</p>
</body></html>
"""


def build_robustness_report(study: str, tables: list[Path], out_dir: Path) -> pd.DataFrame:
    """Concatenate the per-data-set tables; write robustness.{parquet,md,html}."""
    frames = [pd.read_parquet(t) for t in tables]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "robustness.parquet", rows)
    write_text(out_dir / "robustness.md", render_markdown(study, rows))
    write_text(out_dir / "robustness.html", render_html(study, rows))
    return rows
