"""Ours vs a published table, like with like.

``PUBLISHED_AS`` maps each of our methods to the published row that ran the same
thing, with the hyper-parameter values that row fixed (the reference study ran
its Pfeiffer adapter once per init, as separate rows; we tune ``adapter`` over
all three inits). A data set is compared only where our selected configuration
has those values; where it never does, the published number is shown with a
"not comparable" note instead of a difference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class PublishedAs:
    row: str  # the published table's method name
    requires: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # hparam (or lr, weight_decay) -> allowed values


# Our method -> the row of the reference study (Mai et al., CVPR 2025; config/published/mai2025_vtab1k.csv)
# that ran it, and what that row's grid fixed (seed-codebase/experiment/config/method/*.yml).
PUBLISHED_AS: dict[str, PublishedAs] = {
    "linear": PublishedAs("linear"),
    "full": PublishedAs("full", {"lr": (0.001, 0.01)}),  # its grid: lr {1e-3, 1e-2} only
    "bitfit": PublishedAs("bitfit"),
    "ln": PublishedAs("ln"),
    "difffit": PublishedAs("difffit"),
    "ssf": PublishedAs("ssf", {"init": ("normal",)}),
    "lora": PublishedAs("lora"),
    "fact_tt": PublishedAs("fact_tt"),
    "fact_tk": PublishedAs("fact_tk"),
    # Pfeiffer adapter: lora_p_adapter.yml is adapter_init lora_xavier only (rand_p_adapter and
    # zero_adapter, the xavier and zero inits, are not in the published table).
    "adapter": PublishedAs("lora_p_adapter", {"init": ("lora_xavier",)}),
    "houlsby": PublishedAs("rand_h_adapter", {"init": ("xavier",)}),
    "adaptformer": PublishedAs("adaptformer", {"init": ("lora_kaiming",)}),
    "convpass": PublishedAs("convpass"),  # its grid tunes both conv inits, like ours
    "repadapter": PublishedAs("repadapter"),
    "vpt_shallow": PublishedAs("vpt_shallow"),
    "vpt_deep": PublishedAs("vpt_deep"),
}


def _config(text: Any) -> dict[str, Any]:
    return json.loads(text) if isinstance(text, str) and text not in ("", "mixed") else {}


def _matches(config: dict[str, Any], requires: dict[str, tuple[Any, ...]]) -> bool:
    return all(k in config and config[k] in allowed for k, allowed in requires.items())


def _values(vals: Any) -> str:
    return "{" + ", ".join(str(v) for v in sorted(vals, key=str)) + "}"


def published_frame(
    summ: pd.DataFrame,
    published: pd.DataFrame,
    datasets: list[str],
    per: pd.DataFrame | None = None,
    tuned: dict[str, dict[str, set]] | None = None,
) -> pd.DataFrame:
    """Ours vs published mean test accuracy per method, over the data sets both have where our
    selected configuration is what the published row ran.

    ``per`` (method, dataset, config: compact JSON of the selected configuration) says what we
    selected; ``tuned`` (method -> hparam -> values our grid tried) explains the notes. A method
    whose mapping fixes hyper-parameters is never compared without ``per``.
    """
    pub = published.set_index("method")
    chosen = {} if per is None else {(r.method, r.dataset): _config(r.config) for r in per.itertuples()}
    rows = []
    for _, r in summ.iterrows():
        to = PUBLISHED_AS.get(r.method)
        if to is None or to.row not in pub.index:
            continue
        have = [d for d in datasets if d in pub.columns and d in r and not math.isnan(r[d])]
        if not have:
            continue
        same = [d for d in have if _matches(chosen.get((r.method, d), {}), to.requires)] if to.requires else have
        grid = (tuned or {}).get(r.method, {})
        fixed = ", ".join(f"{k}={'/'.join(map(str, v))}" for k, v in to.requires.items())
        over = "; ".join(f"{k} ∈ {_values(grid[k])}" for k in to.requires if grid.get(k))
        wider = any(set(grid.get(k, ())) - set(to.requires[k]) for k in to.requires)
        note = ""
        if not same:
            note = f"not comparable: published ran {fixed} only" + (f", ours tuned over {over}" if over else "")
            note += "; our selection unknown" if per is None else ""
        elif len(same) < len(have) or wider:
            note = f"compared where ours selected {fixed}" + (f" (ours tuned over {over})" if over else "")
        cols = same or have
        ours = sum(float(r[d]) for d in same) / len(same) if same else math.nan
        theirs = float(pub.loc[to.row, cols].astype(float).mean())
        rows.append({"method": r.method, "published_as": to.row, "datasets": len(same), "ours": ours,
                     "published": theirs, "diff": ours - theirs, "note": note})  # fmt: skip
    return pd.DataFrame(rows)


def tuned_values(results: pd.DataFrame) -> dict[str, dict[str, set]]:
    """Method -> hyper-parameter (``hp_*`` columns, lr, weight_decay) -> the values its tuning cells tried."""
    tune = results[results.stage == "tune"]
    out: dict[str, dict[str, set]] = {}
    for method, g in tune.groupby("method"):
        cols = {c[3:]: c for c in g.columns if c.startswith("hp_")} | {"lr": "lr", "weight_decay": "weight_decay"}
        out[method] = {k: {v for v in g[c].dropna().tolist()} for k, c in cols.items() if g[c].notna().any()}
    return out
