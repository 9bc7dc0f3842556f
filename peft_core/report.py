"""Result tables and the report, built from the cells' JSON files only.

``aggregate_dataset`` turns one data set's cell directories into tidy rows
(one row per cell, tuning and final); ``build_report`` concatenates those
into ``results.parquet`` and renders ``summary.md``, ``summary.csv`` and a
self-contained ``index.html`` (inline CSS and SVG, no script, no network).
The tables themselves live in ``summary.py`` (holes are never averaged over)
and ``published.py`` (ours vs published, like with like).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Study
from .demo import upstream_metadata
from .findings import Finding, convergence_frame, findings_html, findings_markdown, study_findings
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
    }
    # data provenance: the content fingerprints of what the cell read (peft_core/fingerprint.py)
    inputs = m.get("inputs") or {}
    for role in ("train", "eval", "checkpoint"):
        row[f"{role}_sha256"] = (inputs.get(role) or {}).get("sha256")
    row.update({f"hp_{k}": _scalar(v) for k, v in s["hparams"].items()})
    return row


def aggregate_dataset(
    study: str, group: str, final_eval: str, cell_dirs: list[Path], selections: list[Path], out: Path
) -> pd.DataFrame:
    """One row per cell of one data set; ``selected`` marks the chosen tuning cells."""
    chosen = {read_json(p)["chosen"] for p in selections}
    frame = pd.DataFrame([cell_row(Path(d), study, group, final_eval, chosen) for d in cell_dirs])
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
        f"Top-1 accuracy (%), mean ± std over the finished seeds; {HOLES_NOTE} Configurations were selected per "
        f"data set and method by accuracy on `{cfg.data.tune_eval}` after training on `{cfg.data.tune_train}` "
        "(never on test). Params: trainable parameters excluding the head, mean over data sets. "
        "PPT = Mean/100 · exp(−log10(Params/10⁷ + 1)).",
        "",
    ]
    if info["deviations"]:
        lines += ["Deviations from the reference implementation:", ""]
        lines += [f"- {m}: {d}" for m, devs in info["deviations"].items() for d in devs] + [""]
    lines += _upstream_lines(study)
    lines += findings_markdown(study_findings(per, summ, sel, results, study))
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
        [r.dataset, r.method, r.hparams, f"{r.lr:g}", f"{r.weight_decay:g}", _fmt(r.val_accuracy, 1), f"{int(r.grid_size)}", _fmt(r.grid_spread, 1)]
        for r in sel.itertuples()
    ]
    lines += [
        _md_table(["dataset", "method", "hyper-parameters", "lr", "wd", "val acc", "grid", "grid spread"], srows, 3),
        "",
    ]
    lines += _convergence_lines(convergence_frame(results))
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


def upstream_text(study: Study) -> str | None:
    """One sentence on how the demo backbone was pre-trained and how well (None for real checkpoints)."""
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


def _upstream_lines(study: Study) -> list[str]:
    text = upstream_text(study)
    return [text, ""] if text else []


def _convergence_lines(conv: pd.DataFrame) -> list[str]:
    if conv.empty or conv.final_train_accuracy.isna().all():
        return []
    piv = conv.pivot(index="method", columns="dataset", values="final_train_accuracy")
    loss = conv.pivot(index="method", columns="dataset", values="final_train_loss")
    methods = list(dict.fromkeys(conv.method))
    datasets = list(dict.fromkeys(conv.dataset))
    rows = [[m, *[f"{piv.at[m, d]:.0f} / {loss.at[m, d]:.2f}" if not math.isnan(piv.at[m, d]) else HOLE for d in datasets]]
            for m in methods]  # fmt: skip
    return [
        "## Convergence (final runs, last epoch)",
        "",
        "Training accuracy (%) / loss over the last epoch's batches, in training mode (dropout and drop-path on), "
        "mean over the final seeds: an under-trained method shows here before it shows in the test table.",
        "",
        _md_table(["method", *datasets], rows),
        "",
    ]


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


def pareto_front(params: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal params and higher accuracy), by params."""
    order = sorted(range(len(params)), key=lambda i: (params[i], -accuracy[i]))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def _label_position(
    cx: float, cy: float, n_chars: int, placed: list[tuple[float, float, float, float]]
) -> tuple[float, float]:
    """First label position beside a point that overlaps no label placed before (greedy)."""
    w, h = 6.2 * n_chars, 11.0
    for dy in (-6, 14, -18, 26, -30, 38, -42, 50):
        box = (cx + 8, cy + dy - h + 2, cx + 8 + w, cy + dy + 2)
        if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
            placed.append(box)
            return box[0], cy + dy
    placed.append((cx + 8, cy - 6 - h + 2, cx + 8 + w, cy - 4))
    return cx + 8, cy - 6


def _svg_scatter(summ: pd.DataFrame) -> str:
    """Mean accuracy vs trainable parameters (log x); 0 params sit on the axis' left end."""
    w, h, pad = 640, 360, 56
    pts = summ.dropna(subset=["mean"])
    if pts.empty:
        return "<p>No finished final runs yet.</p>"
    params = (pts.params_m * 1e6).clip(lower=1.0)
    lx = params.map(math.log10)
    x0, x1 = math.floor(min(lx.min(), 2)), math.ceil(max(lx.max(), 3))
    y0, y1 = math.floor(pts["mean"].min() / 5) * 5 - 5, min(100, math.ceil(pts["mean"].max() / 5) * 5 + 5)
    sx = lambda v: pad + (v - x0) / (x1 - x0) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad + (y0 - v) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" role="img" aria-label="accuracy vs parameters">']
    parts.append(f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" class="frame"/>')
    for e in range(x0, x1 + 1):
        label = "≤1" if e == 0 else f"10<tspan dy='-6' font-size='9'>{e}</tspan>"
        parts.append(f'<line x1="{sx(e):.1f}" x2="{sx(e):.1f}" y1="{pad}" y2="{h - pad}" class="grid"/>')
        parts.append(f'<text x="{sx(e):.1f}" y="{h - pad + 18}" text-anchor="middle">{label}</text>')
    for v in range(int(y0), int(y1) + 1, 5 if y1 - y0 <= 40 else 10):
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" class="grid"/>')
        parts.append(f'<text x="{pad - 8}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">trainable parameters (excl. head, log scale)</text>')
    parts.append(f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">mean test accuracy (%)</text>')
    front = pareto_front(list(lx), list(pts["mean"]))
    path = " ".join(f"{sx(lx.iloc[i]):.1f},{sy(pts['mean'].iloc[i]):.1f}" for i in front)
    parts.append(f'<polyline points="{path}" class="front"><title>Pareto front</title></polyline>')
    placed: list[tuple[float, float, float, float]] = []
    for (_, r), x in sorted(zip(pts.iterrows(), lx), key=lambda item: item[1]):
        cx, cy = sx(x), sy(r["mean"])
        name = html.escape(r.method)
        lx0, ly = _label_position(cx, cy, len(r.method), placed)
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" class="pt"><title>{name}: {r["mean"]:.2f}% at '
            f'{int(round(r.params)):,} params</title></circle><text x="{lx0:.1f}" y="{ly:.1f}">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_sensitivity(sel: pd.DataFrame, methods: list[str]) -> str:
    """Tuning sensitivity: per method, the validation-accuracy spread (max - min, points) over
    its grid on each data set (dots) and their mean (bar). A one-configuration grid has none."""
    sel = sel[sel.method.isin(methods)]
    if sel.empty:
        return "<p>No tuning cells yet.</p>"
    rows = [m for m in methods if m in set(sel.method)]
    row_h, left, pad, w = 22, 110, 40, 640
    h = pad + row_h * len(rows) + 30
    top = max(5.0, math.ceil(float(sel.grid_spread.max() or 0) / 5) * 5)
    sx = lambda v: left + v / top * (w - left - 20)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" role="img" aria-label="tuning sensitivity">']
    step = 5 if top <= 40 else 10
    for v in range(0, int(top) + 1, step):
        parts.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{pad - 10}" y2="{h - 30}" class="grid"/>')
        parts.append(f'<text x="{sx(v):.1f}" y="{h - 16}" text-anchor="middle">{v}</text>')
    parts.append(f'<text x="{(left + w) / 2}" y="{h - 2}" text-anchor="middle">validation accuracy spread over the grid (points)</text>')
    for i, method in enumerate(rows):
        y = pad + i * row_h
        mine = sel[sel.method == method]
        mean = float(mine.grid_spread.mean())
        name = html.escape(method)
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y - 6}" width="{sx(mean) - left:.1f}" height="12" class="bar">'
                     f'<title>{name}: mean spread {mean:.1f} points over {len(mine)} data set(s)</title></rect>')  # fmt: skip
        for r in mine.itertuples():
            parts.append(f'<circle cx="{sx(r.grid_spread):.1f}" cy="{y}" r="3" class="pt"><title>{name} on '
                         f'{html.escape(r.dataset)}: {r.grid_spread:.1f} points over {int(r.grid_size)} configurations'
                         f'</title></circle>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}p.note{color:#57606a;max-width:60rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{padding:.3rem .55rem;border-bottom:1px solid #d0d7de;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f6f8fa}td.best{font-weight:700;background:#dafbe1}
li.holds::marker{content:"✓ ";color:#1a7f37}li.fails::marker{content:"✗ ";color:#cf222e}
svg{max-width:680px;width:100%;font-size:11px;fill:#1b1f24}svg .frame{fill:none;stroke:#8c959f}svg .grid{stroke:#eaeef2}svg .pt{fill:#0969da}svg .front{fill:none;stroke:#cf222e;stroke-width:1.5;stroke-dasharray:4 3}svg .bar{fill:#d0d7de}
"""


def _html_table(
    frame: pd.DataFrame,
    best_cols: list[str] | None = None,
    digits: int = 2,
    eligible: pd.Series | None = None,
    text: pd.DataFrame | None = None,
) -> str:
    """``frame`` as a table; the best value of each of ``best_cols`` in bold, among the ``eligible``
    rows only (all by default); ``text`` (same index) overrides how cells are shown."""
    pool = frame if eligible is None else frame[eligible.to_numpy(dtype=bool)]
    best = {c: pool[c].max() for c in (best_cols or []) if c in frame and len(pool)}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, r in frame.iterrows():
        tds = []
        ok = eligible is None or bool(eligible.loc[i])
        for c in frame.columns:
            v = r[c]
            cls = ' class="best"' if ok and c in best and isinstance(v, float) and v == best[c] else ""
            shown = text.at[i, c] if text is not None and c in text else _fmt(v, digits)
            tds.append(f"<td{cls}>{html.escape(shown)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _rank_heatmap(ranks: pd.DataFrame) -> str:
    """Methods x datasets ranks as an HTML table with a green (best) to grey colour scale."""
    n = max(len(ranks), 1)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["method", *ranks.columns])
    body = []
    for method, r in ranks.iterrows():
        cells = []
        for c in ranks.columns:
            v = r[c]
            shade = 0.0 if math.isnan(v) else 1 - (v - 1) / max(n - 1, 1)
            style = f' style="background:rgba(26,127,55,{0.55 * shade:.2f})"' if c != "mean rank" else ""
            cells.append(f"<td{style}>{_num(v, 1 if c == 'mean rank' else 0)}</td>")
        body.append(f"<tr><td>{html.escape(str(method))}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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
    return _html_table(frame, [*datasets, *groups, "mean", "PPT"], eligible=summ.complete, text=text)


def render_html(results: pd.DataFrame, study: Study) -> str:
    per = final_table(results, study)
    summ = summary_frame(results, study, per)
    sel = selection_frame(results, study)
    datasets = list(dict.fromkeys(per.dataset))
    groups = [g for g in GROUP_ORDER if g in summ.columns]
    cfg = study.cfg
    info = protocol(results, study, per)
    deviations = "".join(
        f"<li>{html.escape(m)}: {html.escape(d)}</li>" for m, devs in info["deviations"].items() for d in devs
    )
    deviations = f'<p class="note">Deviations from the reference implementation:</p><ul>{deviations}</ul>' if deviations else ""
    ppt_rank = summ.sort_values("ppt", ascending=False, kind="stable")[["method", "mean", "coverage", "params", "ppt"]]
    ppt_text = pd.DataFrame(
        {"mean": ppt_rank["mean"].map(_num), "ppt": ppt_rank.ppt.map(_num),
         "params": [HOLE if math.isnan(v) else _params_m(v) for v in ppt_rank.params]}, index=ppt_rank.index
    )  # fmt: skip
    sel_shown = sel.rename(
        columns={"val_accuracy": "val acc (%)", "trainable_params": "trainable", "weight_decay": "wd"}
    ).assign(lr=lambda f: f.lr.map("{:g}".format), wd=lambda f: f.wd.map("{:g}".format))
    sel_shown["trainable"] = sel_shown.trainable.map("{:,}".format)
    extra = _findings_html(study, study_findings(per, summ, sel, results, study))
    conv = _convergence_html(convergence_frame(results))
    more = (
        '<p class="note">Prediction diversity and ensembles of these methods: '
        '<a href="ensembles.html">ensembles.html</a>.</p>'
        if len(study.method_names()) >= 2
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(study.name)} · peft-vision-bench</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(study.name)}: PEFT methods on <code>{html.escape(cfg.backbone.model)}</code></h1>
<p class="note">Split: <code>{html.escape(info["split"])}</code> (after training on <code>{cfg.data.final_train}</code>).
Final seeds: {info["seeds"]}. Precision: {html.escape(info["precision"])}.</p>
<p class="note">Top-1 accuracy (%), mean ± std over the finished seeds; {html.escape(HOLES_NOTE)}
Configurations selected by accuracy on <code>{cfg.data.tune_eval}</code> (never on test).
Params exclude the classification head; PPT = M·exp(−log10(P/10<sup>7</sup>+1)). Best value per column (complete methods) in bold.</p>
{deviations}
{extra}
<h2>Test accuracy, group means, parameters and PPT</h2>
{_summary_html(summ, per, datasets, groups)}
<h2>Accuracy vs trainable parameters</h2>
<p class="note">Dashed red: the Pareto front (no method is both smaller and more accurate). Complete methods only.</p>
{_svg_scatter(summ)}
<h2>Ranks per data set</h2>
<p class="note">1 = best test accuracy on that data set among complete methods; sorted by mean rank. A method with a hole
shows the rank it would take among them and comes last, without a mean rank.</p>
{_rank_heatmap(rank_frame(summ, datasets))}
<h2>PPT ranking</h2>
{_html_table(ppt_rank.rename(columns={"params": "params (M)", "ppt": "PPT"}), text=ppt_text.rename(columns={"params": "params (M)", "ppt": "PPT"}))}
<h2>Tuning sensitivity</h2>
<p class="note">How much the validation accuracy moves over each method's hyper-parameter grid (max − min):
dots are data sets, bars their mean. A large spread means the method needs its tuning budget.</p>
{_svg_sensitivity(sel, study.method_names())}
<h2>Selected configurations</h2>
{_html_table(sel_shown)}
{conv}
<p class="note">{len(results)} cells in <code>results.parquet</code>; {int((results.status != 'ok').sum())} diverged.</p>
{more}
</body></html>
"""


def _findings_html(study: Study, findings: list[Finding]) -> str:
    up = upstream_text(study)
    return (f'<p class="note">{html.escape(up)}</p>' if up else "") + findings_html(findings)


def _convergence_html(conv: pd.DataFrame) -> str:
    if conv.empty or conv.final_train_accuracy.isna().all():
        return ""
    acc = conv.pivot(index="method", columns="dataset", values="final_train_accuracy")
    loss = conv.pivot(index="method", columns="dataset", values="final_train_loss")
    order = list(dict.fromkeys(conv.method))
    acc, loss = acc.loc[order, list(dict.fromkeys(conv.dataset))], loss.loc[order, list(dict.fromkeys(conv.dataset))]
    text = acc.combine(loss, lambda a, b: [HOLE if math.isnan(x) else f"{x:.0f} / {y:.2f}" for x, y in zip(a, b)])
    frame = acc.reset_index()
    return (
        "<h2>Convergence (final runs, last epoch)</h2>"
        '<p class="note">Training accuracy (%) / loss over the last epoch, training mode, mean over final seeds.</p>'
        + _html_table(frame, text=text.reset_index())
    )


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


def build_report(study: Study, tables: list[Path], out_dir: Path) -> pd.DataFrame:
    results = pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    per = final_table(results, study)
    write_parquet(out_dir / "results.parquet", results_table(results, per))
    summ = detail_columns(summary_frame(results, study, per), per)
    write_text(out_dir / "summary.csv", summ.to_csv(index=False, float_format="%.4f"))
    write_text(out_dir / "summary.md", render_markdown(results, study))
    write_text(out_dir / "index.html", render_html(results, study))
    return results
