"""`peft-core prepare-fgvc` on a fabricated miniature CUB tree: VPT's JSON split files -> our csv layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from peft_core.cli import main
from peft_core.errors import InputError
from peft_core.fgvc import FGVC, prepare_fgvc


def _fabricate(root, n_classes=200):
    """A CUB-like folder: images/<class>/<img>.jpg and train/val/test.json (class ids 1-based, as CUB's)."""
    rng = np.random.default_rng(0)
    annos = {"train": {}, "val": {}, "test": {}}
    for c in range(1, n_classes + 1):
        for split, k in (("train", 2), ("val", 1), ("test", 1)):
            for j in range(k):
                rel = f"{c:03d}.class/{split}_{j}.jpg"
                (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(root / "images" / rel)
                annos[split][rel] = c
    for split, anno in annos.items():
        (root / f"{split}.json").write_text(json.dumps(anno))
    return root


def _rows(path):
    with path.open() as f:
        return [(r["path"], int(r["label"])) for r in csv.DictReader(f)]


def test_splits_labels_and_manifest(tmp_path):
    src = _fabricate(tmp_path / "CUB_200_2011")
    folder = prepare_fgvc(src, "cub200", tmp_path / "fgvc")
    train, val, trainval, test = (_rows(folder / f"{s}.csv") for s in ("train", "val", "trainval", "test"))
    assert (len(train), len(val), len(test)) == (400, 200, 200) and trainval == train + val
    assert {y for _, y in train} == set(range(200))  # contiguous 0..199 from CUB's 1..200
    assert all((folder / p).resolve().is_file() for p, _ in trainval + test)
    (p, y), rel = test[0], "001.class/test_0.jpg"
    assert p.endswith(rel) and y == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["class_ids"][:2] == [1, 2] and set(manifest["files"]) == {"train.csv", "val.csv", "trainval.csv", "test.csv"}
    again = prepare_fgvc(src, "cub200", tmp_path / "again")
    for name in ("train.csv", "test.csv", "manifest.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()  # byte-identical


def test_bad_inputs_name_the_path(tmp_path):
    src = _fabricate(tmp_path / "CUB_200_2011")
    (src / "Images").mkdir()  # Stanford Dogs' image folder, so the check reaches the class count
    with pytest.raises(InputError, match="Stanford Dogs has 120"):
        prepare_fgvc(src, "stanford_dogs", tmp_path / "o")
    val = json.loads((src / "val.json").read_text())
    (src / "val.json").write_text(json.dumps({**val, "001.class/train_0.jpg": 1}))
    with pytest.raises(InputError, match=r"val\.json: 1 images also in train\.json"):
        prepare_fgvc(src, "cub200", tmp_path / "o")
    (src / "val.json").write_text("{not json")
    with pytest.raises(InputError, match=r"val\.json: not a JSON split file"):
        prepare_fgvc(src, "cub200", tmp_path / "o")
    (src / "val.json").write_text(json.dumps(val))
    (src / "images" / "001.class" / "val_0.jpg").unlink()
    with pytest.raises(InputError, match="val_0.jpg: image not found"):
        prepare_fgvc(src, "cub200", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert main(["prepare-fgvc", "--source", str(tmp_path / "nope"), "--dataset", "cub200", "--out", str(tmp_path / "o")]) != 0


def test_config_matches_the_published_table():
    import pandas as pd
    import yaml

    from peft_core.config import load_study

    from ..workflow.smk import REPO

    cfg = yaml.safe_load((REPO / "config" / "fgvc.yaml").read_text())
    load_study(REPO / "config" / "fgvc.yaml")
    table = pd.read_csv(REPO / cfg["published"])
    assert list(cfg["datasets"]) == [c for c in table.columns if c in FGVC] == list(FGVC)
    assert {n: s["num_classes"] for n, s in cfg["datasets"].items()} == {n: s.num_classes for n, s in FGVC.items()}
