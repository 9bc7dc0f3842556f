"""`peft-core prepare-manyshot` on a fabricated miniature source: sizes, stratification, nesting, determinism."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peft_core.cli import main
from peft_core.config import load_study
from peft_core.errors import InputError
from peft_core.manyshot import FULL, Source, parse_size, prepare, stratified_order


def _fabricate(root: Path, per_class=(30, 20, 10), n_test=9) -> Path:
    """<root>/toy/{train,test}.csv over tiny PNGs; class sizes unequal on purpose."""
    base = root / "toy"
    (base / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    k = 0
    for split, counts in (("train", per_class), ("test", [n_test // len(per_class)] * len(per_class))):
        for label, n in enumerate(counts):
            for _ in range(n):
                name = f"img/{k:04d}.png"
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(base / name)
                rows[split].append((name, label))
                k += 1
    for split, r in rows.items():
        with (base / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(r)
    return root


def _read(path: Path) -> list[tuple[str, int]]:
    with path.open() as f:
        return [(r["path"], int(r["label"])) for r in csv.DictReader(f)]


def test_sizes_are_stratified_nested_disjoint_and_deterministic(tmp_path):
    src = Source(_fabricate(tmp_path / "raw"), "toy", "csv", 3)
    fractions = {20: 0.2, 40: 0.2, FULL: 0.1}
    a = prepare(src, tmp_path / "a", (20, 40, FULL), fractions, seed=0)
    b = prepare(src, tmp_path / "b", (20, 40, FULL), fractions, seed=0)
    assert [p.name for p in a] == ["toy_20", "toy_40", "toy_full"]
    for pa, pb in zip(a, b):  # byte-identical, manifest's source paths aside
        for name in ("train.csv", "val.csv", "trainval.csv", "test.csv"):
            assert (pa / name).read_bytes() == (pb / name).read_bytes()
    sets = {}
    for folder, n in zip(a, (20, 40, 60)):
        train, val, trainval, test = (_read(folder / f"{s}.csv") for s in ("train", "val", "trainval", "test"))
        assert len(trainval) == n and sorted(train + val) == sorted(trainval) and not set(train) & set(val)
        assert len(val) == round(fractions[20 if n == 20 else 40 if n == 40 else FULL] * n)
        counts = Counter(y for _, y in trainval)  # each class its share within one image: 1/2, 1/3, 1/6
        assert all(abs(counts[c] - n * share) <= 1 for c, share in enumerate((0.5, 1 / 3, 1 / 6)))
        assert len(set(y for _, y in val)) == 3 or len(val) < 3
        assert (folder / "test.csv").read_bytes() == (a[-1] / "test.csv").read_bytes()
        assert all((folder / p).resolve().is_file() for p, _ in trainval + test)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["images"]["trainval"] == n and manifest["seed"] == 0
        assert set(manifest["files"]) == {"train.csv", "val.csv", "trainval.csv", "test.csv"}
        sets[n] = {(folder / p).resolve() for p, _ in trainval}
    assert sets[20] <= sets[40] <= sets[60]  # nested
    c = prepare(src, tmp_path / "c", (20,), {20: 0.2}, seed=1)[0]
    assert (c / "trainval.csv").read_bytes() != (a[0] / "trainval.csv").read_bytes()  # the seed matters


def test_order_does_not_depend_on_listing_order():
    entries = [(f"x/{i}.png", i % 3) for i in range(30)]
    order = stratified_order(entries, seed=0)
    rev = list(reversed(entries))
    assert [entries[i] for i in order] == [rev[i] for i in stratified_order(rev, seed=0)]


def test_bad_inputs_name_the_field_or_path(tmp_path):
    root = _fabricate(tmp_path / "raw")
    src = Source(root, "toy", "csv", 3)
    with pytest.raises(InputError, match="--sizes: 100 images asked for"):
        prepare(src, tmp_path / "o", (100,), {100: 0.1})
    assert not (tmp_path / "o").exists()  # checked before anything is written
    with pytest.raises(InputError, match="outside 0..1"):
        prepare(Source(root, "toy", "csv", 2), tmp_path / "o", (20,), {20: 0.2})
    (root / "toy" / "img" / "0000.png").unlink()
    with pytest.raises(InputError, match="image not found"):
        prepare(src, tmp_path / "o", (20,), {20: 0.2})
    with pytest.raises(InputError, match="--sizes"):
        parse_size("ten")


def test_cli_writes_subsets_and_a_study_shares_their_test_cache(tmp_path, capsys):
    root = _fabricate(tmp_path / "raw")
    out = tmp_path / "manyshot"
    rc = main(["prepare-manyshot", "--source", str(root), "--dataset", "toy", "--num-classes", "3",
               "--out", str(out), "--sizes", "20,full", "--val-fraction", "0.2"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "toy_20: {num_classes: 3, group: natural, layout: csv, test_cache_from: toy_full}" in printed
    cfg = {
        "study": "ms",
        "data": {"root": str(out), "image_size": 32, "tune_train": "train", "tune_eval": "val",
                 "final_train": "trainval", "final_eval": "test"},  # fmt: skip
        "backbone": {"model": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "vit.safetensors")},
        "datasets": {
            "toy_20": {"num_classes": 3, "group": "natural", "layout": "csv", "test_cache_from": "toy_full"},
            "toy_full": {"num_classes": 3, "group": "natural", "layout": "csv"},
        },
        "methods": {"linear": {}},
    }
    study = load_study(cfg)  # the workflow's cache paths: the subset's own train, the full set's test
    assert study.split_cache("toy_20", "train") == "results/ms/cache/toy_20/train_32px_bicubic.safetensors"
    assert study.split_cache("toy_20", "test") == "results/ms/cache/toy_full/test_32px_bicubic.safetensors"
    (out / "toy_20" / "test.csv").write_text("path,label\n")
    with pytest.raises(InputError, match=r"datasets\.toy_20\.test_cache_from: .* differ"):
        load_study(cfg)
    cfg["datasets"]["toy_20"]["test_cache_from"] = "nope"
    with pytest.raises(InputError, match=r"datasets\.toy_20\.test_cache_from: 'nope'"):
        load_study(cfg)
