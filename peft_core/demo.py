"""The embedded demo: real and procedural data sets, and an upstream task.

Everything is made deterministically from fixed seeds, with no download:
``digits`` is scikit-learn's bundled handwritten-digits set (real data); the
others are rendered tasks that mirror VTAB's groups (texture classes for
*natural*, microscopy-like cell morphology for *specialized*, object counting
and orientation for *structured*). They are written in the processed
VTAB-1k folder format, so the loader that reads real VTAB-1k reads them.

The demo backbone is pre-trained on a separate upstream task (shape x colour
on textured backgrounds, :func:`upstream_task`) by ``peft-core pretrain-demo``
and saved as a local checkpoint that is then loaded like any real one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .results import write_text

SIZE = 32
N_TRAIN, N_VAL, N_TEST = 800, 200, 1000

# name -> (group, num_classes)
DATASETS: dict[str, tuple[str, int]] = {
    "digits": ("natural", 10),
    "textures": ("natural", 8),
    "cells": ("specialized", 4),
    "count": ("structured", 6),
    "orientation": ("structured", 8),
}

_yy, _xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _rng(name: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()) + salt)


def _colour(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 0.04) -> np.ndarray:
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    img[mask] = colour


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    dx, dy = _xx - cx, _yy - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == "triangle":
        return (v <= r * 0.7) & (v >= -r + 1.8 * np.abs(u))
    if kind == "cross":
        return ((np.abs(u) <= r) & (np.abs(v) <= r * 0.3)) | ((np.abs(v) <= r) & (np.abs(u) <= r * 0.3))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "bar":
        return (np.abs(u) <= r * 1.4) & (np.abs(v) <= max(r * 0.28, 1.0))
    raise ValueError(kind)


# ----------------------------------------------------------------- downstream tasks


def _digits(n_needed: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = _rng("digits").permutation(len(d.target))
    imgs = []
    for i in order:
        g = Image.fromarray((d.images[i] / 16.0 * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
        imgs.append(np.repeat(np.asarray(g)[:, :, None], 3, axis=2))
    return np.stack(imgs), d.target[order].astype(np.int64)


def _texture(rng: np.random.Generator, label: int) -> np.ndarray:
    freq = rng.uniform(2.5, 5.0) * 2 * np.pi / SIZE
    phase = rng.uniform(0, 2 * np.pi)
    jitter = rng.uniform(-0.15, 0.15)
    x = _xx * np.cos(jitter) + _yy * np.sin(jitter)
    y = -_xx * np.sin(jitter) + _yy * np.cos(jitter)
    if label == 0:
        t = np.sin(freq * y + phase) > 0
    elif label == 1:
        t = np.sin(freq * x + phase) > 0
    elif label == 2:
        t = np.sin(freq * (x + y) / np.sqrt(2) + phase) > 0
    elif label == 3:
        t = (np.sin(freq * x + phase) > 0) ^ (np.sin(freq * y + phase) > 0)
    elif label == 4:
        t = (np.sin(freq * x + phase) * np.sin(freq * y + phase)) > 0.55
    elif label == 5:
        cx, cy = rng.uniform(8, 24, 2)
        t = np.sin(freq * np.hypot(x - cx, y - cy) + phase) > 0
    elif label == 6:
        small = rng.normal(0, 1, (5, 5))
        from PIL import Image

        t = np.asarray(Image.fromarray(small.astype(np.float32)).resize((SIZE, SIZE), Image.BICUBIC)) > 0
    else:
        t = (np.sin(freq * x + phase) > 0.6) | (np.sin(freq * y + phase) > 0.6)
    a, b = _colour(rng), _colour(rng)
    while np.abs(a - b).sum() < 0.6:
        b = _colour(rng)
    img = np.where(t[:, :, None], a, b).astype(np.float32)
    return _finish(img, rng, 0.06)


def _cells(rng: np.random.Generator, label: int) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = np.array([0.93, 0.78, 0.85]) + rng.uniform(-0.08, 0.08, 3)
    stain = np.array([0.45, 0.2, 0.6]) + rng.uniform(-0.12, 0.12, 3)
    for _ in range(rng.integers(5, 10)):
        cx, cy = rng.uniform(3, SIZE - 3, 2)
        if label == 0:  # small round nuclei
            mask = _shape_mask("circle", cx, cy, rng.uniform(1.6, 2.4))
        elif label == 1:  # large round nuclei
            mask = _shape_mask("circle", cx, cy, rng.uniform(3.0, 4.0))
        elif label == 2:  # elongated
            mask = _shape_mask("bar", cx, cy, rng.uniform(2.0, 3.0), rng.uniform(0, np.pi))
        else:  # hollow (ring-shaped) nuclei
            mask = _shape_mask("ring", cx, cy, rng.uniform(2.8, 3.8))
        _paint(img, mask, np.clip(stain + rng.normal(0, 0.05, 3), 0, 1))
    return _finish(img, rng, 0.05)


def _count(rng: np.random.Generator, label: int) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = rng.uniform(0.35, 0.6)
    cells = rng.permutation(16)[: label + 1]  # non-overlapping 4x4 layout of slots
    for c in cells:
        cx = (c % 4) * 8 + 4 + rng.uniform(-1.2, 1.2)
        cy = (c // 4) * 8 + 4 + rng.uniform(-1.2, 1.2)
        kind = ("circle", "square", "triangle")[rng.integers(3)]
        _paint(img, _shape_mask(kind, cx, cy, rng.uniform(2.0, 3.0), rng.uniform(0, np.pi)), _colour(rng, 0.0, 1.0))
    return _finish(img, rng)


def _orientation(rng: np.random.Generator, label: int) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = _colour(rng, 0.0, 0.4)
    angle = (label + rng.uniform(-0.3, 0.3)) * np.pi / 8
    cx, cy = rng.uniform(11, 21, 2)
    _paint(img, _shape_mask("bar", cx, cy, rng.uniform(5.0, 7.5), angle), _colour(rng, 0.55, 1.0))
    return _finish(img, rng)


_RENDER: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "textures": _texture,
    "cells": _cells,
    "count": _count,
    "orientation": _orientation,
}


def _rendered(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(name)
    labels = np.arange(n) % DATASETS[name][1]
    rng.shuffle(labels)
    return np.stack([_RENDER[name](rng, int(y)) for y in labels]), labels.astype(np.int64)


def make_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [N, S, S, 3]) and labels of one demo data set, deterministic."""
    if name not in DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "digits":
        return _digits(N_TRAIN + N_VAL + N_TEST)
    return _rendered(name, N_TRAIN + N_VAL + N_TEST)


def _write_images(out: Path, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """``out/images/NNNNN.png`` for each image; returns the VTAB split-file lines ``<path> <label>``."""
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, y) in enumerate(zip(images, labels)):
        rel = f"images/{i:05d}.png"
        Image.fromarray(img).save(out / rel, optimize=False, compress_level=1)
        lines.append(f"{rel} {int(y)}")
    return lines


def _write_split(out: Path, split: str, lines: list[str]) -> None:
    write_text(out / f"{split}.txt", "\n".join(lines) + "\n")


def write_vtab_folder(name: str, root: str | Path) -> Path:
    """Write one data set as ``<root>/<name>/{images/*.png, train800, val200, train800val200, test}.txt``."""
    images, labels = make_dataset(name)
    out = Path(root) / name
    lines = _write_images(out, images, labels)
    splits = {
        "train800": lines[:N_TRAIN],
        "val200": lines[N_TRAIN : N_TRAIN + N_VAL],
        "train800val200": lines[: N_TRAIN + N_VAL],
        "test": lines[N_TRAIN + N_VAL :],
    }
    for split, rows in splits.items():
        _write_split(out, split, rows)
    # the preparation record the caches' data-source records point at (peft_core/provenance.py)
    manifest = {"format": "peft-core demo generator v1", "dataset": name, "image_size": SIZE,
                "images": {split: len(rows) for split, rows in splits.items()}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def colour_shift(images: np.ndarray, name: str) -> np.ndarray:
    """A synthetic distribution shift: recolour strokes and background, with stripes on half the images.

    Pixel brightness is the figure mask (the demo's ``digits`` are light strokes
    on black): the figure gets a random bright colour, the background a random
    dark colour or two-colour stripes. Labels are unchanged.
    """
    rng = _rng(name, salt=1)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        mask = img.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
        if rng.random() < 0.5:
            f, a = rng.uniform(1.5, 4) * 2 * np.pi / SIZE, rng.uniform(0, np.pi)
            t = np.sin(f * (_xx * np.cos(a) + _yy * np.sin(a))) > 0
            bg = np.where(t[:, :, None], _colour(rng, 0, 0.45), _colour(rng, 0, 0.45))
        else:
            bg = np.broadcast_to(_colour(rng, 0, 0.45), (SIZE, SIZE, 3))
        out[i] = _finish(bg * (1 - mask) + _colour(rng, 0.55, 1.0) * mask, rng)
    return out


def write_shifted_folder(name: str, root: str | Path, split: str = "test") -> Path:
    """Write the colour-shifted final test images of ``name`` as ``<root>/{images/*.png, <split>.txt}``."""
    images, labels = make_dataset(name)
    images, labels = colour_shift(images[N_TRAIN + N_VAL :], name), labels[N_TRAIN + N_VAL :]
    out = Path(root)
    _write_split(out, split, _write_images(out, images, labels))
    return out


# ----------------------------------------------------------------- upstream task

UPSTREAM_SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
#: attribute -> number of classes. The upstream model predicts all of them at once
#: (one softmax per attribute over slices of a single head), as a multi-task
#: stand-in for ImageNet's many visual concepts: shape, colour, size, position,
#: background kind and the orientation of the background's pattern.
UPSTREAM_ATTRIBUTES: dict[str, int] = {
    "shape": len(UPSTREAM_SHAPES),
    "hue": 8,
    "size": 3,
    "position": 4,
    "background": 4,
    "bg_orientation": 4,
}
#: label of an attribute that an image does not have (flat and blocky backgrounds have no orientation)
NO_LABEL = -100


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _upstream_background(rng: np.random.Generator, kind: int, orientation: int) -> np.ndarray:
    c1, c2 = _colour(rng, 0.0, 0.6), _colour(rng, 0.0, 0.6)
    angle = (orientation + rng.uniform(0.1, 0.9)) * np.pi / 4
    u = _xx * np.cos(angle) + _yy * np.sin(angle)
    if kind == 0:  # flat
        return np.broadcast_to(c1, (SIZE, SIZE, 3))
    if kind == 1:  # linear gradient
        g = ((u / SIZE + 0.7) / 1.4)[:, :, None]
        return c1 * g + c2 * (1 - g)
    if kind == 2:  # grating
        f = rng.uniform(2, 5) * 2 * np.pi / SIZE
        return np.where((np.sin(f * u + rng.uniform(0, 2 * np.pi)) > 0)[:, :, None], c1, c2)
    blocks = rng.uniform(0, 0.6, (4, 4, 3)).astype(np.float32)  # 4 x 4 colour blocks
    return np.kron(blocks, np.ones((SIZE // 4, SIZE // 4, 1), np.float32))


def upstream_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """One upstream image and its label for each of :data:`UPSTREAM_ATTRIBUTES`."""
    shape, hue, size, pos, kind, orient = (int(rng.integers(n)) for n in UPSTREAM_ATTRIBUTES.values())
    img = np.array(_upstream_background(rng, kind, orient), dtype=np.float32)
    r = (3.0, 5.0, 7.0)[size] * rng.uniform(0.9, 1.1)
    cx = (8 if pos % 2 == 0 else 24) + rng.uniform(-3, 3)
    cy = (8 if pos < 2 else 24) + rng.uniform(-3, 3)
    mask = _shape_mask(UPSTREAM_SHAPES[shape], cx, cy, r, rng.uniform(0, np.pi))
    _paint(img, mask, _hsv((hue + rng.uniform(-0.3, 0.3)) / 8, rng.uniform(0.6, 1), rng.uniform(0.75, 1)))
    labels = [shape, hue, size, pos, kind, orient if kind in (1, 2) else NO_LABEL]
    return _finish(img, rng), labels


def upstream_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` upstream images (uint8 [n, S, S, 3]) and labels (int64 [n, len(UPSTREAM_ATTRIBUTES)]).

    Distinct from every downstream set: no digits, textures of other families,
    no cell-like blobs, no bars at fixed angles (shapes are rotated at random).
    """
    rng = np.random.default_rng(10_000 + seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((n, len(UPSTREAM_ATTRIBUTES)), np.int64)
    for i in range(n):
        images[i], labels[i] = upstream_scene(rng)
    return images, labels


def upstream_metadata(path: str | Path) -> dict[str, object] | None:
    """The upstream accuracies stored in a demo checkpoint's header; None for other files.

    Reads the safetensors header only (8-byte length, then JSON), so reports need no torch.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__", {})
    if "upstream" in meta:
        up = json.loads(meta["upstream"])
        return {"accuracy": up["accuracy"], "images": up.get("images")}
    if "upstream_accuracy" not in meta:  # not a demo checkpoint
        return None
    acc = json.loads(meta["upstream_accuracy"])  # written by an older demo
    return {"accuracy": acc if isinstance(acc, dict) else {"mean": float(acc)}, "images": None}
