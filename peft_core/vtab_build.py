"""Build a processed VTAB-1k data set from raw sources (``peft-core prepare-vtab --source-format ...``).

Writes ``<out>/<dataset>/{train800,val200,train800val200,test}.txt`` (lines
``images/<TFDS split>/<record index>.png label``), the images beside them and
``manifest.json``, from one of:

- ``tfds``: a TFDS prepared directory, ``<data_dir>/<builder>/<version>/`` with
  ``dataset_info.json`` and ``<name>-<split>.tfrecord-XXXXX-of-YYYYY`` shards
  (``--source`` is the data_dir or the version folder itself), read without
  TensorFlow (peft_core/tfrecord.py). A record's index is its position in shard
  order, then record order within its shard: the index TFDS slices select by
  (its file instructions count records over ``shardLengths``). TFDS may iterate
  a slice interleaved across shards, which changes the order of the lines, not
  which images a split holds. **These are the official VTAB-1k images**, given the
  TFDS version the reference code names (peft_core/vtab_splits.py; the manifest
  records the version found).
- the original archives, one data set each (peft_core/vtab_archives.py documents
  the layouts and cites the TFDS builders whose splits and labels they follow):
  ``cifar-binary`` (cifar100), ``svhn-mat`` (svhn), the image folders with their
  official split lists ``dtd-folder``, ``flowers102-folder``, ``pets-folder``,
  ``eurosat-folder``, ``resisc45-folder``, ``caltech101-folder``, ``sun397-folder``
  (peft_core/vtab_scenes.py: SUN397 with TFDS's split lists), and the arrays
  ``dsprites-npz`` (dsprites_loc / _ori), ``smallnorb-mat`` (smallnorb_azi / _ele).

The archives are in their distribution order (CIFAR, SVHN) or ordered by a
fixed rule (the others: sha256 of each file's name or record's index), which is
not TFDS's order (TFDS shuffles records when it prepares a data set), so the
archive formats give VTAB-1k-*style* splits (the same slices over another
order: other images), not the official ones; the manifest says so
(``official: false``) and states the order.

Images are stored at their native size (no resize: the cache step resizes),
as PNG written by Pillow with fixed options and no metadata, so the same inputs
give byte-identical files with the same Pillow and zlib; ``pixels_sha256`` in
the manifest hashes the decoded pixels of each split, independent of the PNG
encoder. ``image_encoding="source"`` (tfds and the image folders) instead stores
each record's or file's own encoded image bytes unchanged (``.jpg`` / ``.png`` by their magic number):
far smaller for the JPEG sets (sun397, retinopathy), and the pixels are those
of the official records as any decoder reads them; ``pixels_sha256`` then
hashes those bytes. Grayscale stays grayscale (the cache step converts to RGB, as the
reference preprocess tiles the channel); dsprites' 0/1 pixels are multiplied by
255 as the reference preprocess does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .manyshot import write_atomic
from .tfrecord import count_records, parse_example, read_records
from .vtab import SPLITS
from .vtab_archives import (
    RAW_PIXEL_FORMATS, Source, caltech_source, decode_image, dtd_source, eurosat_source, flowers_source, pets_source,
    resisc45_source, sha_file,
)  # fmt: skip
from .vtab_arrays import cifar_source, dsprites_source, smallnorb_source, svhn_source
from .vtab_scenes import sun397_source
from .vtab_splits import SPLIT_NAMES, TASK_ADAPTATION_COMMIT, TASK_ADAPTATION_REPO, TASKS, VtabTask
from .vtab_splits import resolve_split, resolved_slices, task_label

FORMAT = "peft-core vtab build v1"
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}
IMAGE_ENCODINGS = ("png", "source")


# ---------------------------------------------------------------- tfds


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))


def find_tfds_dir(data_dir: Path, task: VtabTask) -> Path:
    """``<data_dir>/<builder>/<highest version matching the reference pattern>``, or ``data_dir`` itself."""
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    base = data_dir / task.tfds_name
    versions = sorted((p for p in base.glob("*") if p.is_dir() and fnmatch.fnmatch(p.name, task.tfds_version)),
                      key=lambda p: _version_key(p.name))  # fmt: skip
    if not versions:
        raise InputError(f"{base}: no TFDS version folder matching {task.tfds_version} (the reference code's pin)")
    return versions[-1]


def _split_counts(info: dict, folder: Path) -> dict[str, list[int]]:
    """TFDS split name -> shard lengths: counted, and checked against dataset_info.json's shardLengths."""
    out = {}
    for split in info.get("splits", []):
        name = split["name"]
        shards = _shards(folder, name)
        declared = [int(n) for n in split.get("shardLengths", [])]
        if declared and len(declared) != len(shards):
            raise InputError(f"{folder}: split {name!r} has {len(shards)} shard files, "
                             f"dataset_info.json says {len(declared)}")  # fmt: skip
        lengths = [count_records(s) for s in shards]  # headers only: the indices must be exact
        if declared and declared != lengths:
            bad = next(i for i, (d, n) in enumerate(zip(declared, lengths, strict=True)) if d != n)
            raise InputError(f"{shards[bad]}: {lengths[bad]} records, dataset_info.json says {declared[bad]}")
        out[name] = lengths
    return out


def _shards(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.glob(f"*-{split}.tfrecord-*-of-*"), key=lambda p: p.name)
    if not files:
        raise InputError(f"{folder}: no {split} TFRecord shards (*-{split}.tfrecord-XXXXX-of-YYYYY)")
    return files


def tfds_source(path: Path, task: VtabTask, keep_encoded: bool = False) -> Source:
    folder = find_tfds_dir(path, task)
    info_path = folder / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{info_path}: unreadable dataset_info.json ({err})") from None
    if info.get("fileFormat", "tfrecord") != "tfrecord":
        raise InputError(f"{info_path}: file format {info['fileFormat']!r}; only tfrecord shards are read")
    shard_lengths = _split_counts(info, folder)

    def read(split: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray | bytes, int]]:
        offset, pending = 0, list(indices)
        for shard, n in zip(_shards(folder, split), shard_lengths[split], strict=True):
            local = [i - offset for i in pending if offset <= i < offset + n]
            for j, data in read_records(shard, local):
                features = parse_example(data)
                if "image" not in features or len(features["image"]) != 1:
                    raise InputError(f"{shard}: record {j} has no single 'image' feature")
                image = features["image"][0]
                try:
                    label = task_label(task, features)
                except (KeyError, ValueError) as err:
                    raise InputError(f"{shard}: record {j}: no {task.label} label ({err}); another data set?") from None
                yield offset + j, image if keep_encoded else decode_image(image, task.image_scale), label
            offset += n

    record = {"tfds_dir": str(folder), "tfds_name": task.tfds_name, "tfds_version": folder.name,
              "dataset_info_sha256": sha_file(info_path),
              "shards": {s: [p.name for p in _shards(folder, s)] for s in shard_lengths}}  # fmt: skip
    return Source({s: sum(v) for s, v in shard_lengths.items()}, read, True, record)


ARCHIVE_OPENERS = {"cifar-binary": cifar_source, "svhn-mat": svhn_source, "dtd-folder": dtd_source,
                   "flowers102-folder": flowers_source, "pets-folder": pets_source,
                   "eurosat-folder": eurosat_source, "resisc45-folder": resisc45_source,
                   "caltech101-folder": caltech_source, "sun397-folder": sun397_source,
                   "dsprites-npz": dsprites_source, "smallnorb-mat": smallnorb_source}  # fmt: skip
# the data sets each archive format holds (dSprites and smallNORB: two VTAB-1k tasks each)
ARCHIVE_DATASETS = {"cifar-binary": ("cifar100",), "svhn-mat": ("svhn",), "dtd-folder": ("dtd",),
                    "flowers102-folder": ("flowers102",), "pets-folder": ("pets",), "eurosat-folder": ("eurosat",),
                    "resisc45-folder": ("resisc45",), "caltech101-folder": ("caltech101",),
                    "sun397-folder": ("sun397",),
                    "dsprites-npz": ("dsprites_loc", "dsprites_ori"),
                    "smallnorb-mat": ("smallnorb_azi", "smallnorb_ele")}  # fmt: skip
OPENERS = {"tfds": tfds_source, **ARCHIVE_OPENERS}
SOURCE_FORMATS = tuple(OPENERS)


# ---------------------------------------------------------------- the build


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, **PNG_OPTIONS)  # a fresh image: no info, no metadata chunks
    os.replace(tmp, path)


def _suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    raise InputError(f"encoded image is neither PNG nor JPEG (starts {data[:4]!r}): use --image-encoding png")


def _store(folder: Path, stem: str, image: np.ndarray | bytes) -> tuple[str, bytes]:
    """Write one image; returns its path relative to ``folder`` and its digest for ``pixels_sha256``."""
    if isinstance(image, bytes):
        rel = stem + _suffix(image)
        tmp = folder / f"{rel}.tmp"
        tmp.write_bytes(image)
        os.replace(tmp, folder / rel)
        return rel, hashlib.sha256(image).digest()
    _write_png(folder / f"{stem}.png", image)
    return f"{stem}.png", hashlib.sha256(f"{image.shape}\n".encode() + image.tobytes()).digest()


def build(source_format: str, source: str | Path, dataset: str, out: str | Path, image_encoding: str = "png") -> Path:
    """Write ``<out>/<dataset>/`` (split files, images, manifest.json); returns that folder."""
    if source_format not in OPENERS:
        raise InputError(f"--source-format: {source_format!r} is not one of {', '.join(SOURCE_FORMATS)}")
    if dataset not in TASKS:
        raise InputError(f"--dataset: {dataset!r} is not a VTAB-1k data set ({', '.join(TASKS)})")
    only = ARCHIVE_DATASETS.get(source_format)
    if only and dataset not in only:
        raise InputError(f"--source-format {source_format} holds {' / '.join(only)} only, not {dataset}")
    if image_encoding not in IMAGE_ENCODINGS:
        raise InputError(f"--image-encoding: {image_encoding!r} is not one of {', '.join(IMAGE_ENCODINGS)}")
    task = TASKS[dataset]
    keep = image_encoding == "source"
    raw = source_format in RAW_PIXEL_FORMATS
    if keep and (raw or task.image_scale != 1):
        why = "the archive holds raw pixels" if raw else f"{dataset}'s pixels are rescaled"
        raise InputError(f"--image-encoding source: not for {source_format} / {dataset} ({why}); use png")
    source = Path(source)
    if not source.exists():
        raise InputError(f"--source {source}: not found")
    src = OPENERS[source_format](source, task, keep)
    try:
        slices = resolved_slices(task, src.counts)
        parts = {split: resolve_split(slices[split], src.counts) for split in SPLIT_NAMES}
    except KeyError as err:
        raise InputError(f"{source}: {err.args[0]}") from None
    for split in ("train800", "val200", "train800val200"):
        got = sum(len(r) for _, r in parts[split])
        if got != SPLITS[split]:
            raise InputError(f"{source}: {split} = {slices[split]} has {got} images (counts {src.counts})")
    folder = Path(out) / dataset
    wanted: dict[str, set[int]] = {}
    for split_parts in parts.values():
        for name, r in split_parts:
            wanted.setdefault(name, set()).update(r)
    stored: dict[tuple[str, int], tuple[str, bytes, int]] = {}  # (split, index) -> (path, digest, label)
    for name in sorted(wanted):
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
        for i, image, label in src.read(name, sorted(wanted[name])):
            if not 0 <= label < task.num_classes:
                raise InputError(f"{source}: {name} record {i}: label {label} outside 0..{task.num_classes - 1}")
            stored[name, i] = (*_store(folder, f"images/{name}/{i:06d}", image), label)
    texts, pixel_sha = {}, {}
    for split, split_parts in parts.items():
        keys = [(name, i) for name, r in split_parts for i in r]
        missing = [k for k in keys if k not in stored]
        if missing:
            raise InputError(f"{source}: {len(missing)} records of {split} were not found, e.g. {missing[0]}")
        texts[split] = "".join(f"{stored[k][0]} {stored[k][2]}\n" for k in keys)
        pixel_sha[split] = hashlib.sha256(b"".join(stored[k][1] for k in keys)).hexdigest()
    for split, text in texts.items():
        write_atomic(folder / f"{split}.txt", text)
    manifest = _manifest(task, dataset, source_format, src, slices, texts, pixel_sha, keep)
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


def _manifest(task, dataset, source_format, src, slices, texts, pixel_sha, keep) -> dict:
    import PIL

    order = ("TFDS record order (shards in order, records in order): the official VTAB-1k images"
             if src.official else
             f"{src.order}, not TFDS's: VTAB-1k-style splits (the official slices over another order), "
             "not the official images")  # fmt: skip
    return {
        "format": FORMAT,
        "dataset": dataset,
        "num_classes": task.num_classes,
        "source_format": source_format,
        "source": src.record,
        "official": src.official,
        "order": order,
        "source_counts": src.counts,  # records per TFDS split (or archive file)
        "splits": {s: {"slice": slices[s], "images": texts[s].count("\n")} for s in SPLIT_NAMES},
        "labels": f"{task.label} (task_adaptation/data/{task.source})",
        "task_adaptation": {"repo": TASK_ADAPTATION_REPO, "commit": TASK_ADAPTATION_COMMIT,
                            "file": f"task_adaptation/data/{task.source.split(' ')[0]}"},  # fmt: skip
        "image_encoding": "source: each record's or file's encoded image bytes, unchanged" if keep else
                          f"PNG (Pillow {PIL.__version__}, compress_level=6, no metadata); grayscale kept as L",
        "pixels_sha256_of": "the stored encoded bytes" if keep else "the decoded pixels (shape + bytes)",
        "pixel_transform": "none" if task.image_scale == 1 else f"x{task.image_scale} (0/1 pixels, as the reference preprocess)",
        "resize": "none: images stored at their native size (the cache step resizes)",
        "files": {f"{s}.txt": hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
        "pixels_sha256": pixel_sha,
    }
