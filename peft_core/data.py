"""Datasets in the processed VTAB-1k folder format, decoded once into a tensor cache.

Layout: ``<root>/<dataset>/<split>.txt``, one ``relative/path label`` per line
(paths relative to ``<root>/<dataset>``). :func:`build_cache` decodes and
resizes every image once into ``uint8[N, 3, S, S]`` plus ``int64`` labels;
training jobs load that file and slice batches on the device. A missing or
corrupt image fails here, with its path, never mid-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .results import write_torch

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
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{path}: corrupt image ({err})") from None


def build_cache(root: str | Path, dataset: str, split: str, size: int, num_classes: int, out: str | Path) -> int:
    """Decode one split into ``out`` (written atomically); returns the image count."""
    base = Path(root) / dataset
    entries = read_split_file(base / f"{split}.txt")
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    for i, (rel, label) in enumerate(entries):
        if not 0 <= label < num_classes:
            raise InputError(f"{base / (split + '.txt')}: label {label} of {rel} outside 0..{num_classes - 1}")
        images[i] = decode_image(base / rel, size)
        labels[i] = label
    save_atomic({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, Path(out))
    return len(entries)


def save_atomic(obj: object, out: Path) -> None:
    write_torch(out, obj)


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
