"""The original archives ``prepare-vtab`` reads besides TFDS, and the :class:`Source` every reader returns.

``--source`` is the folder an archive was extracted into, or the archive's top
folder itself (``dtd/``, ``cifar-100-binary/``, ...). Each format holds one
data set (dSprites and smallNORB: two VTAB-1k tasks each), read in the layout
it is distributed in (a missing file is refused in one line naming its path and
this layout). The formats of raw pixel records (CIFAR, SVHN, dSprites,
smallNORB) are in peft_core/vtab_arrays.py, the SUN397 tree (``sun397-folder``) in
peft_core/vtab_scenes.py; the other image folders are here:

- ``dtd-folder`` (dtd, ``dtd-r1.0.1.tar.gz``): ``dtd/images/<class>/<class>_NNNN.jpg``
  and ``dtd/labels/{train1,val1,test1}.txt`` (lines ``<class>/<file>.jpg``).
  As TFDS's dtd.py: fold 1, train1 -> train, val1 -> validation, test1 -> test;
  the label is the line's class folder, ids in the order of TFDS's
  ``dtd_key_attributes.txt`` (the 47 names, alphabetical: :data:`DTD_CLASSES`).
- ``flowers102-folder`` (flowers102): ``jpg/image_XXXXX.jpg`` (``102flowers.tgz``),
  ``imagelabels.mat`` (``labels``, 1..102 by image id) and ``setid.mat``
  (``trnid``, ``valid``, ``tstid``: image ids), side by side, or under
  ``flowers-102/`` (torchvision's folder). As TFDS's oxford_flowers102.py:
  trnid -> train, valid -> validation, tstid -> test, label = ``labels[id - 1] - 1``.
- ``pets-folder`` (pets): ``images/<Breed>_<n>.jpg`` (``images.tar.gz``) and
  ``annotations/{trainval,test}.txt`` (``annotations.tar.gz``; lines ``<Breed>_<n>
  <class id> <species> <breed id>``), side by side or under ``oxford-iiit-pet/``.
  As TFDS's oxford_iiit_pet.py: trainval -> train, test -> test, label = class id
  - 1, which is the breed's position in TFDS's ``_LABEL_CLASSES`` (the breed names
  sorted case-insensitively: :data:`PETS_CLASSES`); a line where the two disagree is refused.
- ``eurosat-folder`` (eurosat, ``EuroSAT.zip``): ``2750/<class>/<class>_<n>.jpg``
  (``EuroSAT/`` or ``EuroSAT_RGB/`` as other copies name the folder). TFDS's
  eurosat.py (config ``rgb``) puts all 27,000 images in ``train`` with the ids
  of its ``_LABELS`` (:data:`EUROSAT_CLASSES`); VTAB-1k slices that one split
  (peft_core/vtab_splits.py).
- ``resisc45-folder`` (resisc45, ``NWPU-RESISC45.rar``): ``NWPU-RESISC45/<class>/<class>_NNN.jpg``;
  as TFDS's resisc45.py: all in ``train``, ids of its ``_LABELS`` (:data:`RESISC45_CLASSES`).
- ``caltech101-folder`` (caltech101, ``101_ObjectCategories.tar.gz``):
  ``101_ObjectCategories/<class>/image_NNNN.jpg``, 102 folders. TFDS's caltech.py
  keeps ``BACKGROUND_Google`` (VTAB's 102 classes) and labels each image by its
  folder name lowercased, ids in ``caltech101_labels.txt`` order (those names,
  sorted); its ``train`` is 30 images per class drawn by ``np.random.choice`` over
  the file system's listing order (not reproducible), the rest ``test``. Here
  each class's first 30 images in :data:`ORDER` go to ``train``, the rest to
  ``test``: another split of the same sizes (the manifest says so).

(tensorflow/datasets, ``tensorflow_datasets/image_classification/<file>``.)

Order. TFDS shuffles records when it prepares a data set, and VTAB-1k takes
slices (``train[:800]``) of that order; the image-folder formats instead order
each TFDS split's images by :data:`ORDER` (ascending sha256 of the image's path
relative to its image folder, as the split list names it) and apply the same
slices. The order is fixed, mixes the classes (a sorted list would put 800
images of the first few classes in train800) and depends on neither directory
listing order nor a random generator, but it selects other images than TFDS's
order: VTAB-1k-*style* splits, not the official images (``official: false``).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

# an example: index within its TFDS split, pixels (H x W or H x W x 3 uint8) or encoded bytes, label
Reader = Callable[[str, list[int]], Iterator[tuple[int, "np.ndarray | bytes", int]]]
ORDER = "each TFDS split's images by ascending sha256 of their path relative to the image folder (UTF-8, as listed)"
LAYOUTS = {
    "cifar-binary": "cifar-100-binary/{train,test}.bin",
    "svhn-mat": "{train,test}_32x32.mat",
    "dtd-folder": "dtd/images/<class>/*.jpg, dtd/labels/{train1,val1,test1}.txt",
    "flowers102-folder": "jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat (or under flowers-102/)",
    "pets-folder": "images/*.jpg, annotations/{trainval,test}.txt (or under oxford-iiit-pet/)",
    "eurosat-folder": "2750/<class>/*.jpg (or EuroSAT/, EuroSAT_RGB/)",
    "resisc45-folder": "NWPU-RESISC45/<class>/*.jpg",
    "caltech101-folder": "101_ObjectCategories/<class>/*.jpg (102 folders, BACKGROUND_Google included)",
    "sun397-folder": "SUN397/<letter>/<class>[/<sub>]/*.jpg and TFDS's split lists sun397_tfds_{tr,va,te}.txt "
                     "(tensorflow_datasets/image_classification/) beside SUN397/",
    "dsprites-npz": "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
    "smallnorb-mat": "smallnorb-5x46789x9x18x6x2x96x96-training-{dat,info}.mat, "
                     "smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,info}.mat (the .mat.gz files, gunzipped)",
}
# no encoded images to keep (--image-encoding source)
RAW_PIXEL_FORMATS = ("cifar-binary", "svhn-mat", "dsprites-npz", "smallnorb-mat")

# TFDS's label names in id order (tensorflow_datasets/image_classification/...)
DTD_CLASSES = (  # dtd_key_attributes.txt
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
    "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
    "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
    "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged"
).split()
PETS_CLASSES = (  # oxford_iiit_pet.py _LABEL_CLASSES
    "Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman Bombay boxer "
    "British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter german_shorthaired "
    "great_pyrenees havanese japanese_chin keeshond leonberger Maine_Coon miniature_pinscher newfoundland "
    "Persian pomeranian pug Ragdoll Russian_Blue saint_bernard samoyed scottish_terrier shiba_inu Siamese "
    "Sphynx staffordshire_bull_terrier wheaten_terrier yorkshire_terrier"
).split()
EUROSAT_CLASSES = (  # eurosat.py _LABELS
    "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop Residential River SeaLake"
).split()
RESISC45_CLASSES = (  # resisc45.py _LABELS
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland cloud "
    "commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor "
    "industrial_area intersection island lake meadow medium_residential mobile_home_park mountain overpass "
    "palace parking_lot railway railway_station rectangular_farmland river roundabout runway sea_ice ship "
    "snowberg sparse_residential stadium storage_tank tennis_court terrace thermal_power_station wetland"
).split()


@dataclass(frozen=True)
class Source:
    counts: dict[str, int]  # TFDS split name -> number of records
    read: Reader  # (split, sorted indices) -> examples in index order
    official: bool
    record: dict  # what the manifest says about the source
    order: str = "archive order"  # how the records of a split are ordered (when not official)


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def decode_image(data: bytes, scale: int = 1) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16") else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return arr * np.uint8(scale) if scale != 1 else arr


def _missing(path: Path, fmt: str) -> InputError:
    return InputError(f"{path}: not found (--source-format {fmt} reads the extracted archive: {LAYOUTS[fmt]})")


def _find(path: Path, names: tuple[str, ...], subs: tuple[str, ...], fmt: str) -> tuple[Path, dict[str, Path]]:
    """The archive's top folder (``path/<sub>`` for the first sub that is a folder, else ``path``) and its files."""
    folder = next((path / s for s in subs if (path / s).is_dir()), path)
    files = {n: folder / n for n in names}
    for p in files.values():
        if not p.is_file():
            raise _missing(p, fmt)
    return folder, files


# ---------------------------------------------------------------- image folders

Item = tuple[str, Path, int]  # (path relative to the image folder, as listed; the file; label)


def _order_key(item: tuple) -> tuple[str, str]:
    return hashlib.sha256(item[0].encode()).hexdigest(), item[0]


def ordered_source(splits: dict[str, list[tuple]], fetch: Callable, record: dict, order: str) -> Source:
    """Records per TFDS split as ``(name, what fetch reads, label)``, each split in ascending sha256 of the names."""
    ordered = {split: sorted(items, key=_order_key) for split, items in splits.items()}

    def read(split: str, indices: list[int]) -> Iterator[tuple[int, np.ndarray | bytes, int]]:
        for i in indices:
            _, what, label = ordered[split][i]
            yield i, fetch(what), label

    return Source({s: len(v) for s, v in ordered.items()}, read, False, {**record, "order": order}, order)


def image_source(fmt: str, splits: dict[str, list[Item]], files: dict[str, Path], keep_encoded: bool,
                 extra: dict | None = None) -> Source:  # fmt: skip
    """Images listed per TFDS split, in :data:`ORDER`; ``files``: the split lists / metadata (sha256 recorded)."""
    for split, items in splits.items():
        dup = next((n for n, k in Counter(name for name, _, _ in items).items() if k > 1), None)
        if dup is not None:
            raise InputError(f"{items[0][1].parent}: {dup} is listed twice in TFDS split {split!r}")
        absent = next((p for _, p, _ in items if not p.is_file()), None)
        if absent is not None:
            raise _missing(absent, fmt)

    def fetch(path: Path) -> np.ndarray | bytes:
        data = path.read_bytes()
        try:
            return data if keep_encoded else decode_image(data)
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"{path}: not a readable image ({err})") from None

    record = {"layout": LAYOUTS[fmt], "files": {n: sha_file(p) for n, p in files.items()}, **(extra or {})}
    return ordered_source(splits, fetch, record, ORDER)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of a split list, blank and ``#`` comment lines skipped."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            yield n, line.strip()


def _listed(path: Path, fmt: str, subs: tuple[str, ...], lists: dict[str, str], parse, what: str,
            keep_encoded: bool) -> Source:  # fmt: skip
    """Split lists (TFDS split -> file below the top folder) naming images below ``images/``.

    ``parse(line) -> (image path below images/, label)``, or None for a line that is not ``what``.
    """
    folder, files = _find(path, tuple(lists.values()), subs, fmt)
    splits = {}
    for split, name in lists.items():
        splits[split] = []
        for n, line in _lines(files[name]):
            parsed = parse(line)
            if parsed is None:
                raise InputError(f"{files[name]}:{n}: {line!r} is not {what}")
            splits[split].append((parsed[0], folder / "images" / parsed[0], parsed[1]))
    return image_source(fmt, splits, files, keep_encoded)


_DTD_IDS = {c: i for i, c in enumerate(DTD_CLASSES)}
_PETS_IDS = {c: i for i, c in enumerate(PETS_CLASSES)}


def _dtd_line(line: str) -> tuple[str, int] | None:
    cls = line.split("/")[0]
    return (line, _DTD_IDS[cls]) if "/" in line and cls in _DTD_IDS else None


def dtd_source(path: Path, task, keep_encoded: bool = False) -> Source:
    lists = {"train": "labels/train1.txt", "validation": "labels/val1.txt", "test": "labels/test1.txt"}
    what = "<class>/<file>.jpg of one of DTD's 47 classes"
    return _listed(path, "dtd-folder", ("dtd",), lists, _dtd_line, what, keep_encoded)


def _mat_ids(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable .mat file ({err})") from None
    if key not in mat:
        raise InputError(f"{path}: no {key!r} array (have {sorted(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[key]).reshape(-1).astype(np.int64)


def flowers_source(path: Path, task, keep_encoded: bool = False) -> Source:
    folder, files = _find(path, ("imagelabels.mat", "setid.mat"), ("flowers-102",), "flowers102-folder")
    labels = _mat_ids(files["imagelabels.mat"], "labels")
    splits = {}
    for split, key in (("train", "trnid"), ("validation", "valid"), ("test", "tstid")):
        ids = _mat_ids(files["setid.mat"], key)
        bad = ids[(ids < 1) | (ids > len(labels))]
        if len(bad):
            raise InputError(f"{files['setid.mat']}: {key} holds image id {bad[0]}, outside 1..{len(labels)}")
        names = [f"image_{i:05d}.jpg" for i in ids]
        splits[split] = [(n, folder / "jpg" / n, int(labels[i - 1]) - 1) for n, i in zip(names, ids, strict=True)]
    return image_source("flowers102-folder", splits, files, keep_encoded)


def _pets_line(line: str) -> tuple[str, int] | None:
    fields = line.split()
    breed = fields[0].rsplit("_", 1)[0]
    if len(fields) != 4 or not fields[1].isdigit() or _PETS_IDS.get(breed, -1) != int(fields[1]) - 1:
        return None
    return f"{fields[0]}.jpg", _PETS_IDS[breed]


def pets_source(path: Path, task, keep_encoded: bool = False) -> Source:
    lists = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
    what = "'<Breed>_<n> <class id> <species> <breed id>' with the class id of Breed in TFDS's list"
    return _listed(path, "pets-folder", ("oxford-iiit-pet",), lists, _pets_line, what, keep_encoded)


def _class_folders(root: Path, fmt: str, classes: list[str], keep_encoded: bool, train_per_class: int = 0) -> Source:
    """``<root>/<class>/*.jpg`` for the classes in label order: all in TFDS's one split ``train``, or, with
    ``train_per_class``, each class's first that many in :data:`ORDER` in ``train`` and the rest in ``test``."""
    splits: dict[str, list[Item]] = {"train": [], "test": []} if train_per_class else {"train": []}
    for label, cls in enumerate(classes):
        if not (root / cls).is_dir():
            raise _missing(root / cls, fmt)
        items = sorted(((f"{cls}/{p.name}", p, label) for p in (root / cls).glob("*.jpg")), key=_order_key)
        if len(items) < max(1, train_per_class):
            raise InputError(f"{root / cls}: {len(items)} *.jpg images, too few "
                             f"(--source-format {fmt}: {LAYOUTS[fmt]})")  # fmt: skip
        cut = train_per_class or len(items)
        splits["train"] += items[:cut]
        if train_per_class:
            splits["test"] += items[cut:]
    listing = sorted(name for items in splits.values() for name, _, _ in items)
    per_class = Counter(name.split("/")[0] for name in listing)
    extra = {"listing_sha256": hashlib.sha256("".join(f"{n}\n" for n in listing).encode()).hexdigest(),
             "images_per_class": {cls: per_class[cls] for cls in classes}}  # fmt: skip
    if train_per_class:
        extra["train"] = f"each class's first {train_per_class} images in the order above; the rest: test"
    return image_source(fmt, splits, {}, keep_encoded, extra)


def eurosat_source(path: Path, task, keep_encoded: bool = False) -> Source:
    root, _ = _find(path, (), ("2750", "EuroSAT", "EuroSAT_RGB"), "eurosat-folder")
    return _class_folders(root, "eurosat-folder", EUROSAT_CLASSES, keep_encoded)


def resisc45_source(path: Path, task, keep_encoded: bool = False) -> Source:
    root, _ = _find(path, (), ("NWPU-RESISC45",), "resisc45-folder")
    return _class_folders(root, "resisc45-folder", RESISC45_CLASSES, keep_encoded)


CALTECH_TRAIN_PER_CLASS = 30  # caltech.py _TRAIN_POINTS_PER_CLASS


def caltech_source(path: Path, task, keep_encoded: bool = False) -> Source:
    """Labels: caltech101_labels.txt is the 102 folder names lowercased (BACKGROUND_Google included), sorted."""
    root, _ = _find(path, (), ("101_ObjectCategories",), "caltech101-folder")
    classes = sorted((d.name for d in root.iterdir() if d.is_dir()), key=str.lower)
    if len(classes) != task.num_classes:
        raise InputError(f"{root}: {len(classes)} class folders, not Caltech-101's {task.num_classes} "
                         f"(101 and BACKGROUND_Google; {LAYOUTS['caltech101-folder']})")  # fmt: skip
    return _class_folders(root, "caltech101-folder", classes, keep_encoded, CALTECH_TRAIN_PER_CLASS)
