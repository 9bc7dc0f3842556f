"""FGVC (V-PEFT Bench's second image benchmark) from the official archives + VPT's split files.

``peft-core prepare-fgvc --source <dataset folder> --dataset cub200 --out data/fgvc``
reads the train/val/test JSON split files that VPT (Jia et al., ECCV 2022,
KMnP/vpt, ``src/data/datasets/json_dataset.py``) and V-PEFT Bench use, each
``{"<image path relative to the image folder>": <class id>, ...}``, from the
folder holding the extracted official archive, and writes our ``csv`` layout
(``<out>/<dataset>/{train,val,trainval,test}.csv``, paths relative to that
folder, no image copied) plus ``manifest.json`` (sha256 of every split file
read and written, the class-id mapping, counts). The image folder under the
dataset folder is VPT's: ``images/`` (CUB-200-2011, NABirds), ``Images/``
(Stanford Dogs), the folder itself (Oxford Flowers, Stanford Cars).

Deliberate difference from VPT's loader: VPT maps class ids to contiguous
labels *per split* (``sorted(set(anno.values()))`` of that split's file), so
a split that lacks a class would shift every later label. We map once, from
the sorted class ids of all three files together, and refuse a split whose
classes are not all in the training split. ``trainval`` (train + val) is for
the final runs, as in our VTAB-1k protocol; VPT's own final runs train on
``train`` only (recorded in config/fgvc.yaml).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .manyshot import csv_text, write_atomic

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FgvcSet:
    title: str
    image_dir: str  # under the dataset folder ("" = the folder itself)
    num_classes: int


FGVC: dict[str, FgvcSet] = {
    # names: the columns of V-PEFT Bench's FGVC table (config/published/vpeft_bench_fgvc.csv)
    "cub200": FgvcSet("CUB-200-2011", "images", 200),
    "nabirds": FgvcSet("NABirds", "images", 555),
    "flowers": FgvcSet("Oxford Flowers", "", 102),
    "stanford_dogs": FgvcSet("Stanford Dogs", "Images", 120),
    "stanford_cars": FgvcSet("Stanford Cars", "", 196),
}


def _read_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise InputError(f"{path}: split file not found (VPT's {path.name}, from its FGVC split archive)")
    try:
        anno = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a JSON split file ({err})") from None
    if not isinstance(anno, dict) or not anno:
        raise InputError(f"{path}: expected a non-empty {{image path: class id}} object")
    bad = next(((k, v) for k, v in anno.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad:
        raise InputError(f"{path}: class id of {bad[0]!r} is {bad[1]!r}, not an integer")
    return anno


def prepare_fgvc(source: Path, dataset: str, out: Path) -> Path:
    """Write ``<out>/<dataset>/`` from VPT's JSON files under ``source``; everything is checked first."""
    if dataset not in FGVC:
        raise InputError(f"--dataset: {dataset!r} is not one of {', '.join(FGVC)}")
    spec, source = FGVC[dataset], Path(source)
    image_dir = source / spec.image_dir if spec.image_dir else source
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: image folder not found (extract the official {spec.title} archive there)")
    annos = {s: _read_json(source / f"{s}.json") for s in SPLITS}
    ids = sorted(set().union(*(a.values() for a in annos.values())))
    if len(ids) != spec.num_classes:
        raise InputError(f"{source}: {len(ids)} class ids in the split files, {spec.title} has {spec.num_classes}")
    label = {c: i for i, c in enumerate(ids)}
    train_ids = set(annos["train"].values())
    for split in ("val", "test"):
        extra = sorted(set(annos[split].values()) - train_ids)
        if extra:
            raise InputError(f"{source / f'{split}.json'}: class {extra[0]} is not in train.json")
        shared = set(annos[split]) & set(annos["train"])
        if shared:
            raise InputError(f"{source / f'{split}.json'}: {len(shared)} images also in train.json, e.g. {min(shared)}")
    if set(annos["val"]) & set(annos["test"]):
        raise InputError(f"{source / 'test.json'}: images also in val.json")
    missing = [p for a in annos.values() for p in a if not (image_dir / p).is_file()]
    if missing:
        raise InputError(f"{image_dir / missing[0]}: image not found ({len(missing)} missing)")
    folder = Path(out) / dataset
    folder.mkdir(parents=True, exist_ok=True)

    def rows(anno: dict[str, int]) -> list[tuple[str, int]]:
        return [(os.path.relpath(os.path.abspath(image_dir / p), os.path.abspath(folder)), label[c]) for p, c in anno.items()]

    texts = {s: csv_text(rows(annos[s])) for s in SPLITS}
    texts["trainval"] = csv_text(rows(annos["train"]) + rows(annos["val"]))
    manifest = {
        "format": "peft-core fgvc v1",
        "dataset": dataset,
        "title": spec.title,
        "split_files": {f"{s}.json": hashlib.sha256((source / f"{s}.json").read_bytes()).hexdigest() for s in SPLITS},
        "images": {s: len(annos[s]) for s in SPLITS} | {"trainval": len(annos["train"]) + len(annos["val"])},
        "labels": "contiguous, from the sorted class ids of train, val and test together",
        "class_ids": ids,
        "files": {f"{s}.csv": hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
    }
    for split, text in texts.items():
        write_atomic(folder / f"{split}.csv", text)
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder
