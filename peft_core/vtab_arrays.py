"""The archives of raw pixel records ``prepare-vtab`` reads (peft_core/vtab_archives.py has the image folders).

- ``cifar-binary`` (cifar100): ``cifar-100-binary/{train,test}.bin``, records of
  1 coarse + 1 fine label byte + 3072 pixel bytes (R, G, B planes of 32x32),
  read as bytes (no pickle).
- ``svhn-mat`` (svhn): ``{train,test}_32x32.mat`` (``X`` 32x32x3xN, ``y`` with
  10 meaning the digit 0), read with scipy.
- ``dsprites-npz`` (dsprites_loc, dsprites_ori): ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``
  (``imgs`` N x 64 x 64 of 0/1, ``latents_classes`` N x 6: color, shape, scale,
  orientation, x, y); TFDS's dsprites.py reads the same arrays (from the .hdf5
  copy) into its one split ``train``; the VTAB bins are vtab_splits.dsprites_label.
  The whole ``imgs`` array is loaded (about 3 GB), as TFDS does.
- ``smallnorb-mat`` (smallnorb_azi, smallnorb_ele): the ``.mat.gz`` files
  gunzipped, ``smallnorb-5x46789x9x18x6x2x96x96-training-{dat,info}.mat`` and
  ``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,info}.mat`` (NORB binary
  matrices, memory-mapped): as TFDS's smallnorb.py, training -> train, testing ->
  test, the image is the first camera's, elevation = info column 1, azimuth =
  info column 2 // 2.

(tensorflow/datasets, ``tensorflow_datasets/image/{dsprites,smallnorb}.py``.) The
CIFAR and SVHN files are read in their own (already mixed) record order; the
dSprites and smallNORB arrays, whose order is systematic (dSprites enumerates
its latents), by :data:`ARRAY_ORDER` (sha256 of each record's index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .vtab_archives import LAYOUTS, Source, _find, ordered_source, sha_file
from .vtab_splits import dsprites_label

# ---------------------------------------------------------------- records of raw pixels

CIFAR_RECORD = 2 + 3072


def cifar_source(path: Path, task, keep_encoded: bool = False) -> Source:
    _, files = _find(path, ("train.bin", "test.bin"), ("cifar-100-binary",), "cifar-binary")
    counts = {}
    for split, f in (("train", files["train.bin"]), ("test", files["test.bin"])):
        size = f.stat().st_size
        if size % CIFAR_RECORD:
            raise InputError(f"{f}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-100 records")
        counts[split] = size // CIFAR_RECORD

    def read(split: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray, int]]:
        with open(files[f"{split}.bin"], "rb") as f:
            for i in indices:
                f.seek(i * CIFAR_RECORD)
                rec = f.read(CIFAR_RECORD)
                pixels = np.frombuffer(rec[2:], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
                yield i, np.ascontiguousarray(pixels), rec[1]  # rec[0]: coarse label, rec[1]: fine label

    return Source(counts, read, False, {"files": {n: sha_file(p) for n, p in files.items()}})


def svhn_source(path: Path, task, keep_encoded: bool = False) -> Source:
    from scipy.io import loadmat

    _, files = _find(path, ("train_32x32.mat", "test_32x32.mat"), ("svhn",), "svhn-mat")
    data = {}
    for split in ("train", "test"):
        mat = loadmat(files[f"{split}_32x32.mat"])
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise InputError(f"{files[f'{split}_32x32.mat']}: X {x.shape} / y {y.shape} are not SVHN's 32x32x3xN / N")
        data[split] = (x, np.where(y == 10, 0, y).astype(np.int64))  # label 10 is the digit 0

    def read(split: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray, int]]:
        x, y = data[split]
        for i in indices:
            yield i, np.ascontiguousarray(x[:, :, :, i].astype(np.uint8)), int(y[i])

    counts = {s: len(y) for s, (_, y) in data.items()}
    return Source(counts, read, False, {"files": {n: sha_file(p) for n, p in files.items()}})


# ---------------------------------------------------------------- arrays of many records

ARRAY_ORDER = "each TFDS split's records by ascending sha256 of their index in the archive file (decimal, ASCII)"
DSPRITES_NPZ = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_COLUMNS = {"dsprites_loc": ("label_x_position", 4), "dsprites_ori": ("label_orientation", 3)}


def _array_source(fmt: str, arrays: dict[str, tuple[Callable, np.ndarray]], files: dict[str, Path]) -> Source:
    """TFDS split -> (index -> pixels, labels by index), in :data:`ARRAY_ORDER`."""
    splits = {s: [(str(i), (s, i), int(y)) for i, y in enumerate(labels)] for s, (_, labels) in arrays.items()}
    record = {"layout": LAYOUTS[fmt], "files": {n: sha_file(p) for n, p in files.items()}}
    return ordered_source(splits, lambda what: arrays[what[0]][0](what[1]), record, ARRAY_ORDER)


def dsprites_source(path: Path, task, keep_encoded: bool = False) -> Source:
    _, files = _find(path, (DSPRITES_NPZ,), ("dsprites-dataset",), "dsprites-npz")
    try:
        with np.load(files[DSPRITES_NPZ], allow_pickle=False) as npz:  # imgs: ~3 GB once decompressed
            imgs, classes = npz["imgs"], npz["latents_classes"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{files[DSPRITES_NPZ]}: no dSprites imgs / latents_classes arrays ({err})") from None
    if imgs.ndim != 3 or classes.shape != (len(imgs), 6):
        raise InputError(f"{files[DSPRITES_NPZ]}: imgs {imgs.shape} / latents_classes {classes.shape} "
                         "are not N x H x W / N x 6")  # fmt: skip
    attribute, column = DSPRITES_COLUMNS[task.label]  # latents: color, shape, scale, orientation, x, y (dsprites.py)
    labels = [dsprites_label(int(v), attribute, task.num_classes) for v in classes[:, column]]
    scale = np.uint8(task.image_scale)
    return _array_source("dsprites-npz", {"train": (lambda i: imgs[i] * scale, labels)}, files)


NORB_TYPES = {0x1E3D4C55: np.dtype("uint8"), 0x1E3D4C54: np.dtype("<i4")}  # smallnorb.py read_binary_matrix
NORB_FILES = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
              "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat"}  # fmt: skip


def norb_matrix(path: Path) -> np.ndarray:
    """A NORB binary matrix (little-endian: magic, ndim, max(3, ndim) dims, data), memory-mapped."""
    head = np.fromfile(path, dtype="<i4", count=2)
    if len(head) < 2 or int(head[0]) not in NORB_TYPES or not 1 <= head[1] <= 8:
        raise InputError(f"{path}: not a NORB binary matrix (magic {head[:1]})")
    dtype, ndim = NORB_TYPES[int(head[0])], int(head[1])
    dims = tuple(int(d) for d in np.fromfile(path, dtype="<i4", count=ndim, offset=8))
    offset = 8 + 4 * max(3, ndim)
    if path.stat().st_size != offset + int(np.prod(dims)) * dtype.itemsize:
        raise InputError(f"{path}: {path.stat().st_size} bytes, not the {dims} matrix its header declares")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dims)


def smallnorb_source(path: Path, task, keep_encoded: bool = False) -> Source:
    names = tuple(NORB_FILES[s].format(kind) for s in NORB_FILES for kind in ("dat", "info"))
    _, files = _find(path, names, ("smallnorb",), "smallnorb-mat")
    column = {"label_elevation": 1, "label_azimuth": 2}[task.label]  # info: instance, elevation, azimuth, lighting
    arrays = {}
    for split, pattern in NORB_FILES.items():
        dat, info = norb_matrix(files[pattern.format("dat")]), norb_matrix(files[pattern.format("info")])
        if dat.ndim != 4 or dat.shape[1] != 2 or info.shape != (len(dat), 4):
            raise InputError(f"{files[pattern.format('dat')]}: dat {dat.shape} / info {info.shape} "
                             "are not N x 2 x H x W / N x 4")  # fmt: skip
        labels = info[:, column] // (2 if column == 2 else 1)  # azimuth is stored as 0, 2, .., 34 (smallnorb.py)
        arrays[split] = (lambda i, dat=dat: np.ascontiguousarray(dat[i, 0]), labels)  # "image": the first camera
    return _array_source("smallnorb-mat", arrays, files)
