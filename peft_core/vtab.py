"""The VTAB-1k benchmark as data, and a check of a processed VTAB-1k root.

``check_root`` looks at ``<root>/<dataset>/<split>.txt`` for the 19 data sets
before any job is submitted: split files present and parseable, sizes
(train800 = 800, val200 = 200, train800val200 = 1000, test > 0), labels within
the class count, train800 / val200 disjoint and together train800val200, test
disjoint from train800val200, and the referenced image files present (a
deterministic sample per split, or all of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .data import read_split_file
from .errors import InputError

# name -> (group, number of classes), in the reference study's order
DATASETS: dict[str, tuple[str, int]] = {
    "cifar100": ("natural", 100),
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "flowers102": ("natural", 102),
    "pets": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
# split -> required number of lines (None: any positive number)
SPLITS: dict[str, int | None] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": None}
SAMPLE = 25  # image files checked per split unless every file is checked


@dataclass(frozen=True)
class Problem:
    dataset: str
    split: str  # "-" for the data set as a whole
    what: str


@dataclass(frozen=True)
class SplitStatus:
    """What was found for one split: its line count (None if unreadable) and its problems."""

    count: int | None
    problems: tuple[Problem, ...]


def resolve_datasets(names: Iterable[str] | None) -> list[str]:
    """The requested data sets (all 19 if none), unknown names rejected."""
    names = list(names) if names else list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise InputError(f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(DATASETS)})")
    return names


def check_split(base: Path, dataset: str, split: str, full: bool) -> tuple[SplitStatus, list[tuple[str, int]]]:
    """One split file: presence, size, labels, image files. Returns its status and entries."""
    try:
        entries = read_split_file(base / f"{split}.txt")
    except InputError as err:
        return SplitStatus(None, (Problem(dataset, split, str(err)),)), []
    problems = []
    want = SPLITS[split]
    if want is not None and len(entries) != want:
        problems.append(Problem(dataset, split, f"{len(entries)} lines, expected {want}"))
    n_cls = DATASETS[dataset][1]
    bad = [(rel, y) for rel, y in entries if not 0 <= y < n_cls]
    if bad:
        example = f"{bad[0][0]} {bad[0][1]}"
        problems.append(Problem(dataset, split, f"{len(bad)} labels outside 0..{n_cls - 1}, e.g. {example}"))
    missing = [rel for rel in _sample([rel for rel, _ in entries], full) if not (base / rel).is_file()]
    if missing:
        checked = "of all" if full else f"of {min(SAMPLE, len(entries))} sampled"
        problems.append(Problem(dataset, split, f"{len(missing)} image files missing ({checked}), e.g. {missing[0]}"))
    return SplitStatus(len(entries), tuple(problems)), entries


def _sample(paths: list[str], full: bool) -> list[str]:
    """Every path, or ``SAMPLE`` evenly spaced ones (first and last included): deterministic."""
    if full or len(paths) <= SAMPLE:
        return paths
    return [paths[round(i * (len(paths) - 1) / (SAMPLE - 1))] for i in range(SAMPLE)]


def check_overlaps(dataset: str, entries: dict[str, list[tuple[str, int]]]) -> list[Problem]:
    """train800 + val200 = train800val200, and test shares no image with training data."""
    paths = {split: {rel for rel, _ in e} for split, e in entries.items() if e}
    problems = []
    if {"train800", "val200"} <= paths.keys():
        both = paths["train800"] & paths["val200"]
        if both:
            problems.append(Problem(dataset, "val200", f"{len(both)} images also in train800, e.g. {min(both)}"))
        if "train800val200" in paths and paths["train800"] | paths["val200"] != paths["train800val200"]:
            problems.append(Problem(dataset, "train800val200", "not the union of train800 and val200"))
    if "test" in paths:
        train = set().union(*(paths.get(s, set()) for s in ("train800", "val200", "train800val200")))
        leak = paths["test"] & train
        if leak:
            problems.append(Problem(dataset, "test", f"{len(leak)} images also in training splits, e.g. {min(leak)}"))
    return problems


def check_dataset(root: Path, dataset: str, full: bool = False) -> tuple[dict[str, SplitStatus], list[Problem]]:
    """Every split of one data set; returns per-split status and all problems."""
    base = root / dataset
    if not base.is_dir():
        return {}, [Problem(dataset, "-", f"{base}: folder not found")]
    statuses, entries = {}, {}
    for split in SPLITS:
        statuses[split], entries[split] = check_split(base, dataset, split, full)
    problems = [p for s in statuses.values() for p in s.problems] + check_overlaps(dataset, entries)
    return statuses, problems


def render(rows: list[tuple[str, dict[str, SplitStatus], list[Problem]]]) -> str:
    """A fixed-width table (one row per data set, line counts per split) plus one line per problem."""
    head = f"{'dataset':<15} {'classes':>7} " + " ".join(f"{s:>14}" for s in SPLITS) + "  status"
    lines = [head, "-" * len(head)]
    for name, statuses, problems in rows:
        counts = [_count(statuses.get(s)) for s in SPLITS]
        status = "ok" if not problems else f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        lines.append(f"{name:<15} {DATASETS[name][1]:>7} " + " ".join(f"{c:>14}" for c in counts) + f"  {status}")
    problems = [p for _, _, ps in rows for p in ps]
    if problems:
        lines += ["", "problems:"] + [f"  {p.dataset}/{p.split}: {p.what}" for p in problems]
    return "\n".join(lines)


def _count(status: SplitStatus | None) -> str:
    if status is None or status.count is None:
        return "missing"
    return str(status.count)


def check_root(root: str | Path, datasets: Iterable[str] | None = None, full: bool = False) -> tuple[str, int]:
    """Check a processed VTAB-1k root; returns the report text and the number of problems."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--root {root}: folder not found")
    rows = [(name, *check_dataset(root, name, full)) for name in resolve_datasets(datasets)]
    return render(rows), sum(len(p) for _, _, p in rows)
