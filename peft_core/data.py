"""Image data sets on disk, decoded once into a tensor cache.

Layouts of the data-set directory ``<root>/<dataset>`` (``layout`` argument):

- ``vtab`` (processed VTAB-1k): ``<split>.txt``, one ``relative/path label``
  per line (paths relative to the data-set directory);
- ``imagefolder``: ``<split>/<class_name>/<image>``; labels are the indices of
  the sorted class folder names, which must number exactly ``num_classes``
  (keep an empty folder for a class a split lacks, or labels would shift);
- ``csv``: ``<split>.csv`` with a ``path,label`` header (paths relative to the
  data-set directory or absolute; other columns are ignored).

:func:`build_cache` decodes and resizes every image once into
``uint8[N, 3, S, S]`` plus ``int64`` labels; training jobs load that file and
slice batches on the device. A missing or corrupt image fails here, with its
path, never mid-training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .results import write_torch

LAYOUTS = ("vtab", "imagefolder", "csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
MEANS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "inception": ((0.5,) * 3, (0.5,) * 3)}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]


def read_split_file(path: Path) -> list[tuple[str, int]]:
    """Parse ``relative/path label`` lines (the path may contain spaces)."""
    if not path.is_file():
        raise InputError(f"{path}: split file not found")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel, _, label = line.rstrip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise InputError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
        entries.append((rel, int(label)))
    if not entries:
        raise InputError(f"{path}: split file is empty")
    return entries


def decode_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError too
        raise InputError(f"{path}: corrupt image ({' '.join(str(err).split())})") from None


def read_imagefolder_split(split_dir: Path, num_classes: int) -> list[tuple[Path, int]]:
    """``<split_dir>/<class_name>/<image>`` -> (image path, index of the class in sorted order)."""
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: split folder not found")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) != num_classes:
        raise InputError(
            f"{split_dir}: {len(classes)} class folders, expected {num_classes} "
            "(labels are the sorted folder indices; keep an empty folder for an absent class)"
        )
    entries = [
        (img, label)
        for label, name in enumerate(classes)
        for img in sorted((split_dir / name).iterdir())
        if img.suffix.lower() in IMAGE_SUFFIXES and not img.name.startswith(".")
    ]
    if not entries:
        raise InputError(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return entries


def read_csv_split(path: Path) -> list[tuple[str, int]]:
    """A ``path,label`` CSV (header required) -> (path as written, label)."""
    if not path.is_file():
        raise InputError(f"{path}: split file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise InputError(f"{path}:1: expected a header with columns 'path' and 'label', got {reader.fieldnames}")
        entries = []
        for row in reader:
            rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not rel or not label.lstrip("-").isdigit():
                got = f"{row['path']!r},{row['label']!r}"
                raise InputError(f"{path}:{reader.line_num}: expected 'path,label', got {got}")
            entries.append((rel, int(label)))
    if not entries:
        raise InputError(f"{path}: split file is empty")
    return entries


def split_entries(
    base: Path, split: str, num_classes: int, layout: str = "vtab"
) -> tuple[Path, list[tuple[Path, int]]]:
    """The listing (file or folder) of one split and its (image path, label) pairs."""
    if layout == "vtab":
        source = base / f"{split}.txt"
        return source, [(base / rel, label) for rel, label in read_split_file(source)]
    if layout == "csv":
        source = base / f"{split}.csv"
        return source, [(base / rel, label) for rel, label in read_csv_split(source)]
    if layout == "imagefolder":
        return base / split, read_imagefolder_split(base / split, num_classes)
    raise InputError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")


def build_cache(
    root: str | Path, dataset: str, split: str, size: int, num_classes: int, out: str | Path, layout: str = "vtab"
) -> int:
    """Decode one split into ``out`` (written atomically); returns the image count."""
    source, entries = split_entries(Path(root) / dataset, split, num_classes, layout)
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    for i, (path, label) in enumerate(entries):
        if not 0 <= label < num_classes:
            raise InputError(f"{source}: label {label} of {path} outside 0..{num_classes - 1}")
        images[i] = decode_image(path, size)
        labels[i] = label
    write_torch(Path(out), {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    return len(entries)


def load_split(path: str | Path, device: torch.device | str = "cpu") -> Split:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data cache not found")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return Split(obj["images"].to(device), obj["labels"].to(device))


def to_float(images: torch.Tensor, normalize: str) -> torch.Tensor:
    """uint8 -> float in [0, 1], then optional mean/std normalisation."""
    x = images.float().div_(255.0)
    if normalize != "none":
        mean, std = MEANS[normalize]
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
    return x
