"""Two runs of one study side by side: how far their numbers and their findings' verdicts move.

A study run twice with the same config and code differs only by numerics: another CPU's
kernels, another thread count, or (the demo) a backbone pre-trained under either. This
script reads the two runs' report folders (``summary.csv`` and ``summary.md``, the files the
repository commits) and prints:

* each run's backbone checkpoint sha256 and torch (the report header's);
* per (data set, method): how many chose another configuration on validation, and the
  final test accuracy's absolute difference (median, 90th percentile, largest);
* per method: the Mean's difference, and Spearman's rho (scipy) between the two runs' Means;
* every finding's verdict in both runs, as the reports state them, flips marked.

A verdict that flips between two such runs is not established by either.

Example (the committed demo reports against a run of this checkout)::

    git worktree add /tmp/committed HEAD          # or any copy of the committed reports/demo
    snakemake --profile profiles/local
    python benchmarks/compare_runs.py /tmp/committed/reports/demo reports/demo
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

HEADER = re.compile(r"backbone checkpoint sha256 (\w+)\. Computed with torch (\S+) ")
VERDICT = re.compile(r"^- (holds|does not hold): (.*)$")


def tables(folder: Path, datasets: list[str]) -> dict:
    """One report folder's per-cell accuracies, Means, chosen configurations and findings."""
    summ = pd.read_csv(folder / "summary.csv").set_index("method")
    md = (folder / "summary.md").read_text()
    head = HEADER.search(md)
    part = md.split("## Findings", 1)[1].split("\n## ", 1)[0] if "## Findings" in md else ""
    found = [m.groups() for m in map(VERDICT.match, part.splitlines()) if m]
    return {
        "per": pd.Series({(d, m): summ.at[m, d] for m in summ.index for d in datasets}),
        "summ": summ["mean"].where(summ["complete"].astype(bool)),
        "chosen": pd.Series({(d, m): json.dumps(json.loads(summ.at[m, f"{d}:config"]), sort_keys=True)
                             for m in summ.index for d in datasets if isinstance(summ.at[m, f"{d}:config"], str)}),  # fmt: skip
        "findings": [(statement, verdict == "holds") for verdict, statement in found],
        "checkpoint": head.group(1) if head else "?",
        "torch": head.group(2) if head else "?",
    }


def compare(a: dict, b: dict) -> list[str]:
    """The printed lines (see the module docstring)."""
    from scipy.stats import spearmanr

    lines = [f"run {k}: backbone checkpoint {r['checkpoint']}, torch {r['torch']}" for k, r in (("A", a), ("B", b))] + [""]
    keys = a["per"].index.intersection(b["per"].index)
    absd = (b["per"][keys] - a["per"][keys]).dropna().abs()
    shared = a["chosen"].index.intersection(b["chosen"].index)
    other = int((a["chosen"][shared] != b["chosen"][shared]).sum())
    worst = absd.idxmax()
    lines += [f"(data set, method) pairs: {len(keys)}; another configuration chosen on validation: {other} of {len(shared)}",
              f"final test accuracy, |B - A| (points): median {absd.median():.1f}, 90th percentile {absd.quantile(0.9):.1f}, "
              f"largest {absd.max():.1f} ({worst[0]} / {worst[1]}: {a['per'][worst]:.1f} -> {b['per'][worst]:.1f}); "
              f"{int((absd > 5).sum())} of {len(absd)} move by more than 5", ""]  # fmt: skip
    methods = a["summ"].index.intersection(b["summ"].index)
    ma, mb = a["summ"][methods], b["summ"][methods]
    ok = ma.notna() & mb.notna()
    dm = (mb - ma)[ok].abs()
    rho = spearmanr(ma[ok], mb[ok]).statistic
    far = dm.idxmax()
    lines += [f"method Mean, |B - A| (points): median {dm.median():.2f}, largest {dm.max():.2f} "
              f"({far}: {ma[far]:.2f} -> {mb[far]:.2f}); "
              f"Spearman rho of the Means {rho:.2f} ({int(ok.sum())} methods)", ""]  # fmt: skip
    lines += ["| finding (as run A states it) | A | B | |", "|---|---|---|---|"]
    verdict = lambda holds: "holds" if holds else "does not hold"  # noqa: E731
    if len(a["findings"]) != len(b["findings"]):
        lines.append(f"(A states {len(a['findings'])} findings, B {len(b['findings'])}: compared in order)")
    for (text, ha), (_, hb) in zip(a["findings"], b["findings"]):
        lines.append(f"| {text} | {verdict(ha)} | {verdict(hb)} | {'FLIPS' if ha != hb else ''} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="run A's report folder (summary.csv, summary.md)")
    p.add_argument("b", type=Path, help="run B's report folder")
    args = p.parse_args(argv)
    for folder in (args.a, args.b):
        for name in ("summary.csv", "summary.md"):
            if not (folder / name).is_file():
                p.error(f"{folder / name}: no such file (a report folder holds summary.csv and summary.md)")
    first = pd.read_csv(args.a / "summary.csv", nrows=0).columns
    datasets = [c[: -len(":config")] for c in first if c.endswith(":config")]
    need = {"method", "mean", "complete", *datasets, *(f"{d}:config" for d in datasets)}
    for folder in (args.a, args.b):
        missing = sorted(need - set(pd.read_csv(folder / "summary.csv", nrows=0).columns))
        if missing or not datasets:
            p.error(f"{folder / 'summary.csv'}: not a study summary (missing columns: {', '.join(missing) or '<data set>:config'})")
    print("\n".join(compare(tables(args.a, datasets), tables(args.b, datasets))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
