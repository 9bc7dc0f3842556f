"""Image data sets on disk, decoded once into a tensor cache.

Layouts of the data-set directory ``<root>/<dataset>`` (``layout`` argument):

- ``vtab`` (processed VTAB-1k): ``<split>.txt``, one ``relative/path label``
  per line (paths relative to the data-set directory);
- ``imagefolder``: ``<split>/<class_name>/<image>``; labels are the indices of
  the sorted class folder names, which must number exactly ``num_classes``
  (keep an empty folder for a class a split lacks, or labels would shift);
- ``csv``: ``<split>.csv`` with a ``path,label`` header (paths relative to the
  data-set directory or absolute; other columns are ignored).

:func:`build_cache` decodes and resizes (bicubic by default, as the reference
protocol) every image once into ``uint8[N, 3, S, S]`` plus ``int64`` labels,
a safetensors file that :func:`load_split` reads (it also reads small
``torch.save`` dicts, as tests write them); training jobs load that file and
slice batches on the device. It streams: one decoded image in memory at a
time. A missing or corrupt image fails here, with its path, never
mid-training, and leaves no cache behind. Beside the cache, ``<cache>.sha256``
holds its content fingerprint (:func:`cache_fingerprint`). Split hygiene
(``disjoint_from``) refuses a split that shares an image with another.
"""

from __future__ import annotations

import csv
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .sections import INTERPOLATIONS  # PIL resampling filters (``PIL.Image.Resampling`` members, lower case)
from .errors import InputError
from .hygiene import shared_images
from .results import _atomic, write_text

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


def decode_image(path: Path, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """One image file -> C-contiguous ``uint8[3, size, size]`` (RGB, resized with PIL's ``interpolation``)."""
    from PIL import Image, UnidentifiedImageError

    resample = _resample(interpolation)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), resample)
            return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError too
        raise InputError(f"{path}: corrupt image ({' '.join(str(err).split())})") from None


def _resample(interpolation: str):
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return Image.Resampling[interpolation.upper()]


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


@dataclass(frozen=True)
class CacheInfo:
    count: int  # images in the cache
    sha256: str  # content fingerprint, see :func:`cache_fingerprint`


def build_cache(
    root: str | Path,
    dataset: str,
    split: str,
    size: int,
    num_classes: int,
    out: str | Path,
    layout: str = "vtab",
    interpolation: str = "bicubic",
    disjoint_from: Sequence[str] = (),
) -> CacheInfo:
    """Decode one split into ``out`` and its fingerprint into ``<out>.sha256``; returns count and fingerprint.

    ``interpolation`` defaults to bicubic because the reference protocol
    resizes the processed VTAB-1k PNGs with ``transforms.Resize((224, 224),
    interpolation=bicubic)`` on PIL images (OSU-MLB/ViT_PEFT_Vision,
    data/dataset/vtab_processed.py); on a PIL image that is PIL's own resize,
    which :func:`decode_image` calls, so the pixels are the same.

    Before anything is decoded, every split named in ``disjoint_from`` (same
    data set and layout) must share no image with this one, by path or by
    content (see :func:`peft_core.hygiene.shared_images`).

    Images are decoded one at a time and written straight into the final file
    (a safetensors file whose header is written first), so memory stays flat
    in the number of images; the fingerprint is computed in
    the same pass. The cache is written to a temporary name and renamed, then
    the sidecar: a failed run leaves neither, a killed one no file under the
    final name.
    """
    base = Path(root) / dataset
    if Path(out).suffix != ".safetensors":
        raise InputError(f"{out}: a data cache is a .safetensors file (name it <split>.safetensors)")
    _resample(interpolation)
    source, entries = split_entries(base, split, num_classes, layout)
    for path, label in entries:
        if not 0 <= label < num_classes:
            raise InputError(f"{source}: label {label} of {path} outside 0..{num_classes - 1}")
    for other in disjoint_from:
        if other == split:
            raise InputError(f"--disjoint-from {other}: that is the split being cached")
        _, other_entries = split_entries(base, other, num_classes, layout)
        hit = shared_images(entries, other_entries)
        if hit is not None:
            how = "(the same file)" if hit[0].resolve() == hit[1].resolve() else f"(same bytes as {hit[1]})"
            raise InputError(f"{base}: splits {split!r} and {other!r} share an image: {hit[0]} {how}")

    out = Path(out)
    sidecar = fingerprint_path(out)
    sidecar.unlink(missing_ok=True)
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        digest = _stream_cache(Path(tmp), entries, size, interpolation)

    _atomic(out, write)
    write_text(sidecar, digest + "\n")
    return CacheInfo(len(entries), digest)


def fingerprint_path(cache: str | Path) -> Path:
    """The sidecar beside a cache: ``<cache>.sha256``, one line holding the hex digest."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".sha256")


def _content_hash(n: int, size: int):
    """The fingerprint's hash, primed with the shapes and dtypes; then image bytes, then labels (int64 LE)."""
    return hashlib.sha256(f"peft-core cache v1 images uint8 {n},3,{size},{size} labels int64 {n}\n".encode())


def _stream_cache(tmp: Path, entries: list[tuple[Path, int]], size: int, interpolation: str) -> str:
    """Write the cache into ``tmp`` image by image as a safetensors file; returns the content fingerprint.

    The safetensors format is a little-endian u64 header length, a JSON header
    (dtype, shape and byte range of each tensor) and the raw tensor bytes; the
    header is known before any image is decoded, so every image is written
    where it belongs as soon as it is decoded, and nothing larger than one
    image is held in memory.
    """
    n = len(entries)
    labels = np.array([label for _, label in entries], dtype="<i8")
    n_img = n * 3 * size * size
    header = {
        "images": {"dtype": "U8", "shape": [n, 3, size, size], "data_offsets": [0, n_img]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [n_img, n_img + labels.nbytes]},
        "__metadata__": {"format": "peft-core cache v1", "interpolation": interpolation},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    h = _content_hash(n, size)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for path, _ in entries:
            buf = decode_image(path, size, interpolation).tobytes()
            f.write(buf)
            h.update(buf)
        f.write(labels.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()


def _read_cache(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A cache's tensors: a safetensors file (what :func:`build_cache` writes) or a
    ``torch.save`` dict (small test caches); memory-mapped where asked."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise InputError(f"{path}: not a readable data cache ({err})") from None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def cache_fingerprint(path: str | Path) -> str:
    """The content fingerprint of a cache (hex sha256 of its shapes, dtypes, image and label bytes).

    Read from the ``<path>.sha256`` sidecar when it exists and is not older than
    the cache; otherwise computed from the cache chunk by chunk and the sidecar
    written. Equal content gives equal fingerprints whatever wrote the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data cache not found")
    sidecar = fingerprint_path(path)
    if sidecar.is_file() and sidecar.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        text = sidecar.read_text().strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
    obj = _read_cache(path, mmap=True)
    images, labels = obj["images"], obj["labels"]
    n, size = labels.shape[0], images.shape[-1]
    if images.dtype != torch.uint8 or labels.dtype != torch.int64 or tuple(images.shape) != (n, 3, size, size):
        raise InputError(f"{path}: not a data cache (images {images.dtype} {tuple(images.shape)}, labels {labels.dtype})")
    h = _content_hash(n, size)
    for i in range(0, n, 256):
        h.update(images[i : i + 256].contiguous().numpy().data)
    h.update(labels.numpy().astype("<i8").tobytes())
    digest = h.hexdigest()
    write_text(sidecar, digest + "\n")
    return digest


def load_split(path: str | Path, device: torch.device | str = "cpu") -> Split:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data cache not found")
    obj = _read_cache(path)
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
