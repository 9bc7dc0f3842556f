"""What the study cost, and what changed since the previous report.

``cost_frame``: per method, over all its cells (tuning and final), from the columns every
cell records in ``metrics.json`` (``wall_time_s``, ``peak_memory_mb``, ``images_per_s``,
``device``, ``precision``).

``keep_history`` keeps the previous ``results.parquet`` under ``<results>/history/``
(Snakemake deletes a rule's outputs before it runs, so the report folder can not hold it):
``results.last.parquet`` is the table of the latest report, ``results.prev.parquet`` the one
before it that had other cells. ``changes`` compares the current table with that baseline:
cells trained since (new cell ids, or the same id retrained: a different wall time) and
how each method's test accuracy moved per data set and on average.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd

from .results import write_parquet

LAST, PREV = "results.last.parquet", "results.prev.parquet"


def _one_or_mixed(values: pd.Series) -> str:
    seen = sorted({str(v) for v in values.dropna()})
    return "unknown" if not seen else seen[0] if len(seen) == 1 else "mixed (" + ", ".join(seen) + ")"


def cost_frame(results: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Per method: cells, device, precision, mean s per cell, total hours, peak MB, median images/s."""
    cols = ["method", "cells", "device", "precision", "s_per_cell", "total_h", "peak_memory_mb", "images_per_s"]
    if results.empty:
        return pd.DataFrame(columns=cols)
    g = results.groupby("method", sort=False)
    out = pd.DataFrame({
        "cells": g.size(),
        "device": g.device.agg(_one_or_mixed),
        "precision": g.precision.agg(_one_or_mixed) if "precision" in results else "unknown",
        "s_per_cell": g.wall_time_s.mean(),
        "total_h": g.wall_time_s.sum() / 3600,
        "peak_memory_mb": g.peak_memory_mb.max(),
        "images_per_s": g.images_per_s.median(),
    })  # fmt: skip
    order = [m for m in (methods or []) if m in out.index] + [m for m in out.index if m not in (methods or [])]
    return out.loc[order].rename_axis("method").reset_index()[cols]


def keep_history(results: pd.DataFrame, history: Path) -> pd.DataFrame | None:
    """Record ``results`` as the latest table; return the baseline to compare it with (or None)."""
    last, prev = history / LAST, history / PREV
    if last.is_file():
        before = pd.read_parquet(last)
        if _fingerprint(before) != _fingerprint(results):
            history.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(last, prev)
    write_parquet(last, results)
    return pd.read_parquet(prev) if prev.is_file() else None


def _fingerprint(frame: pd.DataFrame) -> set[tuple]:
    cols = [c for c in ("cell", "wall_time_s", "accuracy") if c in frame]
    return {tuple(r) for r in frame[cols].astype(str).itertuples(index=False)}


def retrained(results: pd.DataFrame, before: pd.DataFrame) -> pd.DataFrame:
    """Cells trained since ``before``: ``why`` is ``new`` (a new cell id) or ``retrained`` (same id,
    another run: its wall time differs, e.g. after its data or checkpoint changed)."""
    old = before.drop_duplicates("cell").set_index("cell").wall_time_s
    why = [("new" if c not in old.index else "retrained" if not math.isclose(w, old[c]) else "")
           for c, w in zip(results.cell, results.wall_time_s)]  # fmt: skip
    out = results.assign(why=why)
    return out[out.why != ""][["dataset", "method", "stage", "seed", "cell", "why"]].reset_index(drop=True)


def _final_means(results: pd.DataFrame) -> pd.Series:
    f = results[(results.stage == "final") & (results.status == "ok")]
    return f.groupby(["method", "dataset"], sort=False).accuracy.mean() * 100


def changes(results: pd.DataFrame, before: pd.DataFrame | None, methods: list[str] | None = None) -> dict:
    """``{"baseline": bool, "cells": retrained frame, "moves": per method, mean test accuracy before,
    after and delta over the data sets both have, and the largest per-data-set move}``."""
    if before is None:
        return {"baseline": False, "cells": pd.DataFrame(), "moves": pd.DataFrame()}
    now, then = _final_means(results), _final_means(before)
    rows = []
    for m in [m for m in (methods or []) if m in now.index.get_level_values(0)] or list(dict.fromkeys(results.method)):
        a = now.get(m, pd.Series(dtype=float))
        b = then.get(m, pd.Series(dtype=float)) if m in then.index.get_level_values(0) else pd.Series(dtype=float)
        both = [d for d in a.index if d in b.index]
        delta = (a[both] - b[both]) if both else pd.Series(dtype=float)
        worst = delta.abs().idxmax() if len(delta) and delta.abs().max() > 1e-9 else None
        rows.append({"method": m, "datasets": len(both), "before": b[both].mean() if both else math.nan,
                     "after": a[both].mean() if both else math.nan, "delta": delta.mean() if both else math.nan,
                     "largest_move": f"{worst} {delta[worst]:+.2f}" if worst is not None else "",
                     "new_datasets": len([d for d in a.index if d not in b.index])})  # fmt: skip
    moves = pd.DataFrame(rows)
    return {"baseline": True, "cells": retrained(results, before), "moves": moves}
