"""Many-shot subsets by training-set size: ``peft-core prepare-manyshot``.

The many-shot part of Mai et al. (CVPR 2025) trains on growing subsets of a
data set's full training set (its code: ``utils/global_var.py``
``CIFAR_VAL_SPLIT`` / ``RESISC_VAL_SPLIT``: CIFAR-100 at 500, 1k, 5k, 10k and
all images; RESISC45 at 225 ... 9,000 and all), each size carving its own
validation part (20 % or 10 %, per size) for selection, and reports on the
official test set. This module builds those subsets, in the ``csv`` layout
the loader reads (``<out>/<dataset>_<size>/{train,val,trainval,test}.csv``):

* **Size** ``N`` counts train + val (as VTAB-1k's 1000 = 800 + 200); ``val``
  is ``round(fraction * N)`` of them, ``trainval`` all ``N``; ``test`` is the
  source's test split, byte-identical for every size (so one decoded test
  cache can serve them all, see ``DatasetSpec.test_cache_from``).
* **Stratified, nested, seeded, version-independent.** Within each class the
  images are ranked by ``sha256(seed, path)``; all images are then ordered by
  ``(rank + 0.5) / class size`` (ties by class index, then rank), which
  interleaves the classes in proportion to their sizes. A subset is a prefix
  of that order: every class holds its share within one image, and a smaller
  subset is contained in every larger one (less noise along a many-shot
  curve). Its validation part is the prefix's first ``round(fraction * N)``
  images, so it is stratified as well. No random-number generator is
  involved, so the lists do not depend on numpy's or Python's version.
* **Recorded.** ``manifest.json`` in each output folder holds the sha256 of
  every split file written, of the source listings read, the seed, size,
  validation fraction and per-class counts; the same inputs give
  byte-identical files.

Presets give the reference's sizes and fractions; Clevr-count has none in the
reference's code (its README runs Clevr-distance), so its preset is our
choice (1k, 5k, 10k and all, with CIFAR-100's fractions) and is marked so in
the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .data import split_entries
from .errors import InputError

FULL = "full"


@dataclass(frozen=True)
class Preset:
    sizes: tuple[int | str, ...]
    val_fraction: dict[int | str, float]
    source: str  # where the sizes and fractions come from


PRESETS: dict[str, Preset] = {
    "cifar100": Preset(
        (500, 1000, 5000, 10000, FULL),
        {500: 0.2, 1000: 0.2, 5000: 0.1, 10000: 0.1, FULL: 0.1},
        "reference code utils/global_var.py CIFAR_VAL_SPLIT",
    ),
    "resisc45": Preset(
        (225, 450, 900, 2250, 4500, 9000, FULL),
        {225: 0.2, 450: 0.2, 900: 0.1, 2250: 0.1, 4500: 0.1, 9000: 0.1, FULL: 0.1},
        "reference code utils/global_var.py RESISC_VAL_SPLIT",
    ),
    "clevr_count": Preset(
        (1000, 5000, 10000, FULL),
        {1000: 0.2, 5000: 0.1, 10000: 0.1, FULL: 0.1},
        "ours (the reference code has no Clevr-count sizes; CIFAR-100's fractions)",
    ),
}


def parse_size(text: str) -> int | str:
    """``500``, ``1k``, ``10k`` or ``full``."""
    t = text.strip().lower()
    if t == FULL:
        return FULL
    mult = 1000 if t.endswith("k") else 1
    digits = t[:-1] if t.endswith("k") else t
    if not digits.isdigit() or int(digits) * mult < 2:
        raise InputError(f"--sizes: {text!r} is not a training-set size (e.g. 500, 1k, full)")
    return int(digits) * mult


def size_name(size: int | str) -> str:
    if size == FULL:
        return FULL
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def _rank_key(seed: int, path: str) -> str:
    return hashlib.sha256(f"peft-core manyshot v1\0{seed}\0{path}".encode()).hexdigest()


def stratified_order(entries: list[tuple[str, int]], seed: int) -> list[int]:
    """Indices of ``entries`` in the nested stratified order (see the module docstring)."""
    by_class: dict[int, list[int]] = {}
    for i, (path, label) in enumerate(entries):
        by_class.setdefault(label, []).append(i)
    keyed = []
    for label, idx in by_class.items():
        ranked = sorted(idx, key=lambda i: (_rank_key(seed, entries[i][0]), i))
        n = len(ranked)
        keyed += [((r + 0.5) / n, label, r, i) for r, i in enumerate(ranked)]
    return [k[-1] for k in sorted(keyed)]


def subset_splits(order: list[int], size: int | str, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) indices of one size: a prefix of ``order``, its first part validation."""
    n = len(order) if size == FULL else size
    if n > len(order):
        raise InputError(f"--sizes: {n} images asked for, the source's training split has {len(order)}")
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise InputError(f"--val-fraction: {fraction} of {n} leaves no validation or no training image")
    prefix = order[:n]
    return prefix[n_val:], prefix[:n_val]


def csv_text(rows: list[tuple[str, int]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    w.writerows(rows)
    return buf.getvalue()


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Source:
    root: Path  # folder holding <dataset>/ in `layout`
    dataset: str
    layout: str
    num_classes: int
    train_split: str = "train"
    test_split: str = "test"


def _read(source: Source, split: str) -> tuple[Path, list[tuple[Path, int]]]:
    listing, entries = split_entries(Path(source.root) / source.dataset, split, source.num_classes, source.layout)
    bad = [(p, y) for p, y in entries if not 0 <= y < source.num_classes]
    if bad:
        raise InputError(f"{listing}: label {bad[0][1]} of {bad[0][0]} is outside 0..{source.num_classes - 1}")
    missing = [p for p, _ in entries if not Path(p).is_file()]
    if missing:
        raise InputError(f"{listing}: image not found: {missing[0]} ({len(missing)} missing)")
    return listing, entries


def _listing_sha(listing: Path) -> str:
    if listing.is_dir():  # imagefolder: the sorted file names and sizes stand for it
        names = sorted(str(p.relative_to(listing)) for p in listing.rglob("*") if p.is_file())
        return _sha("\n".join(names))
    return _sha(listing.read_bytes())


def prepare(
    source: Source,
    out: Path,
    sizes: tuple[int | str, ...],
    val_fraction: dict[int | str, float],
    seed: int = 0,
    name: str | None = None,
    preset_source: str = "command line",
) -> list[Path]:
    """Write one csv-layout folder per size under ``out``; returns them. Checks everything first."""
    name = name or source.dataset
    train_listing, train = _read(source, source.train_split)
    test_listing, test = _read(source, source.test_split)
    shared = {os.path.realpath(p) for p, _ in train} & {os.path.realpath(p) for p, _ in test}
    if shared:
        raise InputError(f"{test_listing}: {len(shared)} images also in {train_listing}, e.g. {sorted(shared)[0]}")
    rel = [(str(p), y) for p, y in train]
    order = stratified_order(rel, seed)
    plans = {size: subset_splits(order, size, val_fraction[size]) for size in sizes}  # every size checked first
    out = Path(out)
    written = []
    for size, (tr, va) in plans.items():
        folder = out / f"{name}_{size_name(size)}"
        folder.mkdir(parents=True, exist_ok=True)

        def rows(idx: list[int] | None, entries=train, folder=folder) -> list[tuple[str, int]]:
            chosen = entries if idx is None else [entries[i] for i in idx]
            return [(os.path.relpath(os.path.abspath(p), os.path.abspath(folder)), y) for p, y in chosen]

        texts = {
            "train": csv_text(rows(tr)),
            "val": csv_text(rows(va)),
            "trainval": csv_text(rows(va + tr)),  # the prefix, in order
            "test": csv_text(rows(None, entries=test)),
        }
        n = len(tr) + len(va)
        manifest = {
            "format": "peft-core manyshot v1",
            "dataset": source.dataset,
            "size": size,
            "images": {"train": len(tr), "val": len(va), "trainval": n, "test": len(test)},
            "val_fraction": val_fraction[size],
            "sizes_from": preset_source,
            "seed": seed,
            "order": "per class sha256(seed, path) rank, classes interleaved by (rank + 0.5) / class size",
            "per_class_trainval": {str(k): v for k, v in sorted(Counter(train[i][1] for i in tr + va).items())},
            "source": {
                "root": str(source.root),
                "layout": source.layout,
                "train": {"listing": str(train_listing), "sha256": _listing_sha(train_listing)},
                "test": {"listing": str(test_listing), "sha256": _listing_sha(test_listing)},
            },
            "files": {f"{s}.csv": _sha(t) for s, t in texts.items()},
        }
        for split, text in texts.items():
            write_atomic(folder / f"{split}.csv", text)
        write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        written.append(folder)
    return written


def config_entries(folders: list[Path], num_classes: int, group: str, test_cache_from: str | None = None) -> str:
    """The ``datasets:`` lines of a study config for the folders written."""
    lines = []
    for folder in folders:
        extra = f", test_cache_from: {test_cache_from}" if test_cache_from and folder.name != test_cache_from else ""
        lines.append(f"  {folder.name}: {{num_classes: {num_classes}, group: {group}, layout: csv{extra}}}")
    return "\n".join(lines)
