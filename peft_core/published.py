"""Ours vs a published table, like with like.

``PUBLISHED_AS`` maps each of our methods to the published row that ran the same
thing, with the hyper-parameter values that row fixed (the reference study ran
its Pfeiffer adapter once per init, as separate rows; we tune ``adapter`` over
all three inits). A data set is compared only where our selected configuration
has those values; where it never does, the published number is shown with a
"not comparable" note instead of a difference.

One mapping per published table (``MAPPINGS``): ``PUBLISHED_AS`` for the
reference study's (Mai et al.), ``VPEFT_AS`` for V-PEFT Bench's VTAB-1k and
FGVC tables, ``NEWER_AS`` for the newer methods' own papers
(config/published/newer_methods_vtab1k.csv); :func:`mapping_for` picks the one
whose row names the table uses.

Published means come in two kinds that are never mixed: the mean of the 19
VTAB-1k tasks and the mean of the three group means (natural, specialized,
structured), which weighs the 7, 4 and 8 tasks differently. A table with a
``mean_kind`` column (``tasks19`` or ``groups``) says which one its ``mean_acc``
is. Per-task numbers, where a row has them, are always compared task by task;
a row with only a reported mean is compared with the same kind of mean of ours,
over all 19 tasks, and never otherwise.
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


# Our method -> V-PEFT Bench's row (arXiv 2402.02242; config/published/vpeft_bench_{vtab1k,fgvc}.csv,
# from its README at commit c188fad2930f). Its rows are copied from each method's own paper, so
# a row is mapped only where our method at the fixed values has the same structure and its
# trainable count rounds to the row's params column (tests/unit/test_report_published.py):
#   adapter b=8 156,768 = 0.16M, adaptformer b=8 0.16M, ssf 0.21M, bitfit 0.10M, hydra r=2 0.28M
#   (head counted), dtl r=2 0.04M, last r=18 0.66M, lst reduction 8 2.38M, prefix 10 0.36M
#   (FGVC, head counted). Not mapped: LoRA (its row adapts q and v with separate A and B; ours
#   shares one A over q, k, v: the same 294,912 parameters at rank 8, a different function),
#   FacT (its 0.07M is not our fact_tk at any grid rank: 0.03/0.09/0.37M), RepAdapter (0.22M vs
#   our 0.24M at bottleneck 8), GPS (its 0.22M is not our 83,712 (k + 1) at k = 1: 0.17M, 0.21M
#   with the mean head; k = 2 is 0.25M), NOAH (a mean of searched subnets; its released CIFAR-100 subnet is 0.32M, 0.40M with the head,
#   against 0.43M, tests/methods/test_noah.py). SCT: K = 96
#   is 111,744 = 0.11M, its row.
VPEFT_AS: dict[str, PublishedAs] = {
    "linear": PublishedAs("Linear probing"),
    "full": PublishedAs("Full fine-tuning"),  # VPT's full fine-tuning, tuned over lr like ours
    "bitfit": PublishedAs("BitFit"),
    "ssf": PublishedAs("SSF", {"init": ("normal",)}),  # SSF's code: scale ~ N(1, 0.02), shift ~ N(0, 0.02)
    # the row's adapter (NOAH's table) is 12 bottleneck-8 adapters after the MLP, as our Pfeiffer adapter
    "adapter": PublishedAs("Adapter", {"bottleneck": (8,)}),
    "adaptformer": PublishedAs("AdaptFormer", {"bottleneck": (8,)}),  # 0.16M: bottleneck 8, not in our grid
    "vpt_shallow": PublishedAs("VPT-Shallow"),  # prompt length tuned per data set there and here
    "vpt_deep": PublishedAs("VPT-Deep"),
    "hydra": PublishedAs("Hydra", {"rank": (2,)}),
    "dtl": PublishedAs("DTL", {"rank": (2,), "beta": (100.0,)}),
    "last": PublishedAs("LAST", {"rank": (18,)}),  # our reading of the paper: no code to compare with
    "lst": PublishedAs("LST", {"reduction": (8,)}),
    "prefix": PublishedAs("Prefix Tuning", {"length": (10,)}),
    "sct": PublishedAs("SCT", {"channels": (96,), "init": ("trunc_normal",)}),
}

# Our method -> the row of config/published/newer_methods_vtab1k.csv (each method's own paper, or
# the paper that quotes it; the `source` column says which). RLRR: our default is the official code's
# (288,768 + the mean VTAB head = 0.33M, the row's params). SNELL: the only row with per-task numbers
# is SNELL-16 (rank 16; the sparsity ratio is tuned per task there and here). SPT-LoRA and
# SPT-Adapter: group means only (so compared only on all 19 tasks, as a mean of group means).
# Not mapped: GLoRA (per-task numbers quoted by PACE's table, which states neither the GLoRA configuration
# nor its parameter count), Mona (no VTAB-1k numbers found), ARC (its numbers are quoted from RLRR's table
# for a setting not pinned down here), Adapter+ (second-hand group means of an unknown bottleneck setting).
NEWER_AS: dict[str, PublishedAs] = {
    "rlrr": PublishedAs("RLRR"),
    "snell": PublishedAs("SNELL-16", {"rank": (16,)}),
    "spt_lora": PublishedAs("SPT-LoRA"),
    "spt_adapter": PublishedAs("SPT-Adapter"),
}

#: published table -> its mapping; :func:`mapping_for` chooses by the rows a table has
MAPPINGS: dict[str, dict[str, PublishedAs]] = {
    "mai2025": PUBLISHED_AS,
    "vpeft_bench": VPEFT_AS,
    "newer_methods": NEWER_AS,
}

#: what a table's ``mean_acc`` averages (its ``mean_kind`` column)
MEAN_KINDS = {"tasks19": "the 19-task mean", "groups": "the mean of the three group means"}


def mapping_for(published: pd.DataFrame) -> dict[str, PublishedAs]:
    """The mapping most of whose rows the table has (ties: the reference study's)."""
    rows = set(published["method"])
    hits = {name: len({to.row for to in m.values()} & rows) for name, m in MAPPINGS.items()}
    best = max(hits, key=lambda name: hits[name])
    return MAPPINGS[best] if hits[best] else {}


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
    mapping: dict[str, PublishedAs] | None = None,
) -> pd.DataFrame:
    """Ours vs published mean test accuracy per method, over the data sets both have where our
    selected configuration is what the published row ran.

    ``per`` (method, dataset, config: compact JSON of the selected configuration) says what we
    selected; ``tuned`` (method -> hparam -> values our grid tried) explains the notes. A method
    whose mapping fixes hyper-parameters is never compared without ``per``. ``mapping``:
    our method -> published row; by default the one :func:`mapping_for` picks for the table.
    """
    mapping = mapping_for(published) if mapping is None else mapping
    pub = published.set_index("method")
    chosen = {} if per is None else {(r.method, r.dataset): _config(r.config) for r in per.itertuples()}
    rows = []
    for _, r in summ.iterrows():
        to = mapping.get(r.method)
        if to is None or to.row not in pub.index:
            continue
        have = [d for d in datasets if d in pub.columns and d in r and not math.isnan(r[d]) and not pd.isna(pub.loc[to.row, d])]
        if not have:
            reported = _reported_mean(r, pub.loc[to.row], to, chosen)
            if reported is not None:
                rows.append(reported)
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


def vtab_mean(values: dict[str, float], kind: str) -> float:
    """Our mean over the 19 VTAB-1k tasks, of ``kind`` ``tasks19`` or ``groups`` (:data:`MEAN_KINDS`)."""
    from .vtab import DATASETS

    if set(values) != set(DATASETS):
        raise ValueError(f"a VTAB-1k mean needs all 19 tasks, got {len(values)}")
    if kind == "tasks19":
        return sum(values.values()) / len(values)
    if kind == "groups":
        groups = {g: [values[d] for d, (gg, _) in DATASETS.items() if gg == g] for g in ("natural", "specialized", "structured")}
        return sum(sum(v) / len(v) for v in groups.values()) / 3
    raise ValueError(f"mean_kind must be one of {sorted(MEAN_KINDS)}, not {kind!r}")


def _reported_mean(r: pd.Series, row: pd.Series, to: PublishedAs, chosen: dict) -> dict | None:
    """Ours vs a row that reports only a mean: the same kind of mean, over all 19 tasks, or a note why not."""
    from .vtab import DATASETS

    kind, theirs = row.get("mean_kind"), row.get("mean_acc")
    if pd.isna(theirs) or kind not in MEAN_KINDS:
        return None  # no number, or a mean of unknown kind: never compared
    base = {"method": r.method, "published_as": to.row, "published": float(theirs)}
    ours = {d: float(r[d]) for d in DATASETS if d in r and not pd.isna(r[d])}
    same = all(_matches(chosen.get((r.method, d), {}), to.requires) for d in DATASETS) if to.requires else True
    if len(ours) < len(DATASETS) or not same:
        why = f"ours has {len(ours)} of the 19 tasks" if len(ours) < len(DATASETS) else "our selection is not the published configuration on every task"
        return base | {"datasets": 0, "ours": math.nan, "diff": math.nan,
                       "note": f"not comparable: published reports only {MEAN_KINDS[kind]}; {why}"}  # fmt: skip
    mine = vtab_mean(ours, kind)
    return base | {"datasets": len(ours), "ours": mine, "diff": mine - float(theirs),
                   "note": f"published reports only {MEAN_KINDS[kind]}; ours likewise"}  # fmt: skip


def tuned_values(results: pd.DataFrame) -> dict[str, dict[str, set]]:
    """Method -> hyper-parameter (``hp_*`` columns, lr, weight_decay) -> the values its tuning cells tried."""
    tune = results[results.stage == "tune"]
    out: dict[str, dict[str, set]] = {}
    for method, g in tune.groupby("method"):
        cols = {c[3:]: c for c in g.columns if c.startswith("hp_")} | {"lr": "lr", "weight_decay": "weight_decay"}
        out[method] = {k: {v for v in g[c].dropna().tolist()} for k, c in cols.items() if g[c].notna().any()}
    return out
