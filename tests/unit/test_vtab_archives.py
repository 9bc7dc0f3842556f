"""``prepare-vtab --source-format <data set>-folder`` on fabricated miniature extracted archives.

Each case writes the archive's layout as distributed (tiny JPEGs, the split
lists / .mat metadata in their real format) with just enough images for the
VTAB-1k slices (800 / 200 and a small test split), builds it, runs the checker
and checks the labels, the documented order, the manifest and determinism
through one shared check.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peft_core.cli import main, parser
from peft_core.errors import InputError
from peft_core.vtab import check_root
from peft_core.vtab_archives import DTD_CLASSES, EUROSAT_CLASSES, ORDER, PETS_CLASSES, RESISC45_CLASSES
from peft_core.vtab_arrays import ARRAY_ORDER, DSPRITES_NPZ, NORB_FILES
from peft_core.vtab_build import SOURCE_FORMATS, build
from peft_core.vtab_scenes import SUN397_CLASSES, SUN397_LABELS_SHA256, SUN397_LISTS
from peft_core.vtab_splits import resolve_split

Listing = dict[str, list[tuple[str, int, int]]]  # TFDS split -> [(name as listed, label, colour)]


def _jpeg(value: int, _cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 (a cache)
    if value not in _cache:
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        _cache[value] = buf.getvalue()
    return _cache[value]


def _colour(i: int) -> int:
    return 7 * i % 256  # neighbours differ by 7: a decoded JPEG (error <= 3) names its file


def _write_images(folder: Path, listing: Listing) -> None:
    for items in listing.values():
        for name, _, colour in items:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(_jpeg(colour))


def fake_dtd(root: Path) -> tuple[Path, Listing]:
    """``dtd/images/<class>/<class>_NNNN.jpg`` + ``dtd/labels/{train1,val1,test1}.txt`` (sorted, as shipped)."""
    sizes = {"train": ("train1", 800), "validation": ("val1", 200), "test": ("test1", 9)}
    listing, i = {}, 0
    for split, (_, n) in sizes.items():
        items = []
        for _ in range(n):
            cls = DTD_CLASSES[i % 47]
            items.append((f"{cls}/{cls}_{i:04d}.jpg", i % 47, _colour(i)))
            i += 1
        listing[split] = sorted(items)
    _write_images(root / "dtd/images", listing)
    (root / "dtd/labels").mkdir()
    for split, (name, _) in sizes.items():
        (root / f"dtd/labels/{name}.txt").write_text("".join(f"{n}\n" for n, _, _ in listing[split]))
    return root, listing


def fake_flowers(root: Path) -> tuple[Path, Listing]:
    """``jpg/image_XXXXX.jpg``, ``imagelabels.mat`` (labels 1..102), ``setid.mat`` (trnid / valid / tstid)."""
    from scipy.io import savemat

    n = 1010
    labels = (np.arange(n) * 5 % 102 + 1).reshape(1, -1)  # by image id - 1
    ids = np.random.default_rng(0).permutation(np.arange(1, n + 1))
    setid = {"trnid": ids[:800], "valid": ids[800:1000], "tstid": ids[1000:]}
    listing = {split: [(f"image_{i:05d}.jpg", int(labels[0, i - 1]) - 1, _colour(i)) for i in setid[key]]
               for split, key in (("train", "trnid"), ("validation", "valid"), ("test", "tstid"))}  # fmt: skip
    _write_images(root / "jpg", listing)
    savemat(root / "imagelabels.mat", {"labels": labels})
    savemat(root / "setid.mat", {k: v.reshape(1, -1) for k, v in setid.items()})
    return root, listing


def fake_pets(root: Path) -> tuple[Path, Listing]:
    """``images/<Breed>_<n>.jpg`` + ``annotations/{trainval,test}.txt`` (``name class_id species breed_id``)."""
    listing, lines = {}, {}
    for split, (start, n) in (("train", (0, 1000)), ("test", (1000, 8))):
        items = [(f"{PETS_CLASSES[i % 37]}_{i}.jpg", i % 37, _colour(i)) for i in range(start, start + n)]
        listing[split] = sorted(items)
        lines[split] = "".join(f"{name[:-4]} {y + 1} {1 + (name[0].islower())} {y // 2 + 1}\n"
                               for name, y, _ in listing[split])  # fmt: skip
    _write_images(root / "oxford-iiit-pet/images", listing)
    (root / "oxford-iiit-pet/annotations").mkdir()
    (root / "oxford-iiit-pet/annotations/trainval.txt").write_text(lines["train"])
    (root / "oxford-iiit-pet/annotations/test.txt").write_text(lines["test"])
    return root, listing


def _fake_class_folders(folder: Path, classes: list[str], n: int) -> Listing:
    items = [(f"{classes[i % len(classes)]}/{classes[i % len(classes)]}_{i + 1}.jpg", i % len(classes), _colour(i))
             for i in range(n)]  # fmt: skip
    listing = {"train": items}
    _write_images(folder, listing)
    return listing


def fake_eurosat(root: Path) -> tuple[Path, Listing]:
    """``2750/<class>/<class>_<n>.jpg``: 1340 images, so that 60% holds train800 (804) and test = train[80%:]."""
    return root, _fake_class_folders(root / "2750", EUROSAT_CLASSES, 1340)


def fake_resisc45(root: Path) -> tuple[Path, Listing]:
    """``NWPU-RESISC45/<class>/<class>_NNN.jpg``; ``--source`` given as that folder itself."""
    return root / "NWPU-RESISC45", _fake_class_folders(root / "NWPU-RESISC45", RESISC45_CLASSES, 1350)


def fake_caltech(root: Path) -> tuple[Path, Listing]:
    """``101_ObjectCategories/<class>/image_NNNN.jpg``: 102 folders of 31 images (train: 30 per class)."""
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"c{k:02d}" for k in range(97)]
    labels = {name: i for i, name in enumerate(sorted(folders, key=str.lower))}  # background_google < c00 < faces
    listing, i = {"train": [], "test": []}, 0
    for name in folders:
        items = []
        for k in range(31):
            items.append((f"{name}/image_{k + 1:04d}.jpg", labels[name], _colour(i)))
            i += 1
        items.sort(key=_sha_order)
        listing["train"] += items[:30]
        listing["test"] += items[30:]
    _write_images(root / "101_ObjectCategories", listing)
    return root, listing


# a few SUN397 folders, sub-folder classes included, with their ids in TFDS's sun397_labels.txt (line number - 1)
SUN397_FEW = {"/a/abbey": 0, "/c/car_interior/backseat": 78, "/c/car_interior/frontseat": 79,
              "/t/track/outdoor": 360, "/y/youth_hostel": 396}  # fmt: skip


def fake_sun397(root: Path) -> tuple[Path, Listing]:
    """``SUN397/<letter>/<class>[/<sub>]/sun_*.jpg`` + TFDS's ``sun397_tfds_{tr,va,te}.txt`` beside ``SUN397/``
    (lines ``/<letter>/...jpg``, in no particular order); one image in the tree is in no list."""
    classes = list(SUN397_FEW)
    listing, i = {}, 0
    for split, n in (("train", 800), ("validation", 200), ("test", 9)):
        items = []
        for _ in range(n):
            cls = classes[i % len(classes)]
            items.append((f"{cls[1:]}/sun_{i:06d}.jpg", SUN397_FEW[cls], _colour(i)))
            i += 1
        listing[split] = items
    _write_images(root / "SUN397", listing)
    (root / "SUN397/a/abbey/sun_unlisted.jpg").write_bytes(_jpeg(1))  # in the archive, in no split list
    rng = np.random.default_rng(0)
    for split, name in SUN397_LISTS.items():
        lines = [f"/{listing[split][k][0]}\n" for k in rng.permutation(len(listing[split]))]
        (root / name).write_text("".join(lines))
    return root, listing


def fake_dsprites(root: Path) -> tuple[Path, Listing]:
    """The npz with 2000 records of 0/1 pixels (the real one: 737,280 of 64x64) and latents_classes N x 6."""
    n = 2000
    root.mkdir(parents=True)
    classes = np.zeros((n, 6), dtype=np.int64)
    classes[:, 3], classes[:, 4] = np.arange(n) % 40, np.arange(n) * 3 % 32  # orientation, x position
    imgs = np.zeros((n, 4, 4), dtype=np.uint8)
    imgs[1::2] = 1
    np.savez_compressed(root / DSPRITES_NPZ, imgs=imgs, latents_classes=classes)
    return root, {"train": [(str(i), int(classes[i, 4]) // 2, 255 * (i % 2)) for i in range(n)]}  # 32 -> 16 bins


def _norb_matrix(path: Path, array: np.ndarray) -> None:
    magic = {np.uint8: 0x1E3D4C55, np.int32: 0x1E3D4C54}[array.dtype.type]
    dims = list(array.shape) + [1] * (3 - array.ndim)
    head = np.array([magic, array.ndim, *dims], dtype="<i4").tobytes()
    path.write_bytes(head + array.astype(array.dtype.newbyteorder("<")).tobytes())


def fake_smallnorb(root: Path) -> tuple[Path, Listing]:
    """NORB binary matrices: dat N x 2 x H x W uint8, info N x 4 int32 (instance, elevation, azimuth, lighting)."""
    listing, start = {}, 0
    root.mkdir(parents=True)
    kinds = (("train", "5x46789x9x18x6x2x96x96-training", 800), ("test", "5x01235x9x18x6x2x96x96-testing", 400))
    for split, kind, n in kinds:
        i = np.arange(start, start + n)
        dat = np.zeros((n, 2, 4, 4), dtype=np.uint8)
        dat[:, 0] = (7 * i % 256).astype(np.uint8)[:, None, None]  # the first camera's image
        dat[:, 1] = 99
        info = np.stack([i % 10, i % 9, 2 * (i % 18), i % 6], axis=1).astype(np.int32)
        _norb_matrix(root / f"smallnorb-{kind}-dat.mat", dat)
        _norb_matrix(root / f"smallnorb-{kind}-info.mat", info)
        listing[split] = [(str(k), int(i[k] % 9), _colour(int(i[k]))) for k in range(n)]  # elevation
        start += n
    return root, listing


@dataclass(frozen=True)
class Case:
    fmt: str
    dataset: str
    fake: Callable[[Path], tuple[Path, Listing]]
    slices: dict[str, str]  # the resolved VTAB-1k slices expected in the manifest
    top: str  # the archive's top folder below the fabricated root
    lists: tuple[str, ...]  # split / metadata files (below ``top``) whose sha256 the manifest records
    remove: str  # what to delete below the fabricated root, for the missing-file message
    error: str = "{target}: not found"  # how that message starts


CASES = [
    Case("dtd-folder", "dtd", fake_dtd, {"val200": "validation[:200]", "test": "test"},
         "dtd", ("labels/train1.txt", "labels/val1.txt", "labels/test1.txt"), "dtd/labels/val1.txt"),  # fmt: skip
    Case("flowers102-folder", "flowers102", fake_flowers, {"val200": "validation[:200]", "test": "test"},
         "", ("imagelabels.mat", "setid.mat"), "setid.mat"),  # fmt: skip
    Case("pets-folder", "pets", fake_pets, {"val200": "train[800:1000]", "test": "test"}, "oxford-iiit-pet",
         ("annotations/trainval.txt", "annotations/test.txt"), "oxford-iiit-pet/annotations/test.txt"),  # fmt: skip
    Case("eurosat-folder", "eurosat", fake_eurosat, {"val200": "train[804:1004]", "test": "train[1072:]"},
         "2750", (), "2750/Highway"),  # fmt: skip
    Case("resisc45-folder", "resisc45", fake_resisc45, {"val200": "train[810:1010]", "test": "train[1080:]"},
         "NWPU-RESISC45", (), "NWPU-RESISC45/ship"),  # fmt: skip
    Case("caltech101-folder", "caltech101", fake_caltech, {"val200": "train[2754:2954]", "test": "test"},
         "101_ObjectCategories", (), "101_ObjectCategories/Faces_easy",
         "{target.parent}: 101 class folders"),  # fmt: skip
    Case("sun397-folder", "sun397", fake_sun397, {"val200": "validation[:200]", "test": "test"},
         "", tuple(SUN397_LISTS.values()), "sun397_tfds_va.txt"),  # fmt: skip
    Case("dsprites-npz", "dsprites_loc", fake_dsprites, {"val200": "train[1600:1800]", "test": "train[1800:]"},
         "", (DSPRITES_NPZ,), DSPRITES_NPZ),  # fmt: skip
    Case("smallnorb-mat", "smallnorb_ele", fake_smallnorb, {"val200": "test[:200]", "test": "test[50%:]"}, "",
         tuple(f"smallnorb-5x{k}-{t}.mat" for k in ("46789x9x18x6x2x96x96-training", "01235x9x18x6x2x96x96-testing")
               for t in ("dat", "info")), "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat"),  # fmt: skip
]


def _sha_order(item: tuple) -> str:
    return hashlib.sha256(item[0].encode()).hexdigest()  # names are unique: no ties


def _tree(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.fmt for c in CASES])
def test_folder_archive_builds_checked_ordered_and_deterministic(case, tmp_path):
    root, listing = case.fake(tmp_path / "src")
    folder = build(case.fmt, root, case.dataset, tmp_path / "a")
    text, problems = check_root(tmp_path / "a", [case.dataset], full=True)
    assert problems == 0, text

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["official"] is False and manifest["source_format"] == case.fmt
    order = ARRAY_ORDER if case.fmt in ("dsprites-npz", "smallnorb-mat") else ORDER
    assert manifest["source"]["order"] == order and manifest["order"].startswith(order)
    assert "not the official images" in manifest["order"]
    assert {s: manifest["splits"][s]["slice"] for s in case.slices} == case.slices
    top = tmp_path / "src" / case.top
    assert manifest["source"]["files"] == {n: hashlib.sha256((top / n).read_bytes()).hexdigest() for n in case.lists}

    # the documented order: each TFDS split by sha256 of the listed name; labels follow the images
    counts = {split: len(items) for split, items in listing.items()}
    assert manifest["source_counts"] == counts
    ordered = {s: sorted(items, key=_sha_order) for s, items in listing.items()}
    for split in ("train800", "val200", "test"):
        want = [(f"images/{name}/{i:06d}.png", ordered[name][i][1])
                for name, r in resolve_split(manifest["splits"][split]["slice"], counts) for i in r]  # fmt: skip
        got = [(p, int(y)) for p, y in (line.split() for line in (folder / f"{split}.txt").read_text().splitlines())]
        assert got == want, split
        for rel, _ in (want[0], want[-1]):
            name, i = rel.split("/")[1], int(rel.split("/")[2][:6])
            with Image.open(folder / rel) as img:
                pixel = img.getpixel((1, 1))
                assert abs(int(np.ravel(pixel)[0]) - ordered[name][i][2]) <= 3 and img.info == {}
    assert len({y for _, y in want}) > 1  # the order mixes classes

    build(case.fmt, root, case.dataset, tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # byte-identical, manifest included

    target = tmp_path / "src" / case.remove
    if target.is_dir():
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(InputError) as err:
        build(case.fmt, root, case.dataset, tmp_path / "c")
    message = str(err.value)
    assert "\n" not in message and message.startswith(case.error.format(target=target))
    assert "--source-format" in message or case.fmt == "caltech101-folder"


def test_sun397_labels_membership_encodings_and_missing_lists(tmp_path):
    # the ids: TFDS's sun397_labels.txt, the 397 folders sorted (its sha256, as TFDS ships it)
    assert len(SUN397_CLASSES) == 397 and list(SUN397_CLASSES) == sorted(SUN397_CLASSES)
    assert hashlib.sha256("".join(f"{c}\n" for c in SUN397_CLASSES).encode()).hexdigest() == SUN397_LABELS_SHA256
    assert all(SUN397_CLASSES[i] == c for c, i in SUN397_FEW.items())

    root, listing = fake_sun397(tmp_path / "src")
    ordered = {s: sorted(items, key=_sha_order) for s, items in listing.items()}
    gif = root / "SUN397" / ordered["train"][0][0]  # train800's first image: GIF data named .jpg, as some SUN397 files
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), ordered["train"][0][2], dtype=np.uint8)).save(buf, format="GIF")
    gif.write_bytes(buf.getvalue())
    folder = build("sun397-folder", root, "sun397", tmp_path / "a", image_encoding="source")
    assert check_root(tmp_path / "a", ["sun397"], full=True)[1] == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["decoded_to_png"] == [ordered["train"][0][0]]
    assert manifest["source_counts"] == {"train": 800, "validation": 200, "test": 9}  # sun_unlisted.jpg: in none

    # split membership: each VTAB-1k split holds exactly its TFDS split's listed images, with their folders' ids
    lines = {s: (folder / f"{s}.txt").read_text().split("\n")[:-1] for s in ("train800", "val200", "test")}
    for split, tfds_split, n in (("train800", "train", 800), ("val200", "validation", 200), ("test", "test", 9)):
        assert len(lines[split]) == n
        for k, line in enumerate(lines[split]):
            rel, label = line.split()
            name, want = ordered[tfds_split][k][:2]
            assert int(label) == want and rel.startswith(f"images/{tfds_split}/{k:06d}.")
            if rel.endswith(".jpg"):  # the file's own bytes
                assert (folder / rel).read_bytes() == (root / "SUN397" / name).read_bytes()
    assert lines["train800"][0].split()[0] == "images/train/000000.png"  # the GIF, decoded to PNG
    assert {int(line.split()[1]) for line in lines["train800"]} == set(SUN397_FEW.values())

    build("sun397-folder", root, "sun397", tmp_path / "b", image_encoding="source")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # byte-identical rerun

    # a line naming a folder that is not one of the 397
    test_list = root / SUN397_LISTS["test"]
    text = test_list.read_text()
    test_list.write_text("/a/abbey_ruins/sun_000001.jpg\n" + text)
    with pytest.raises(InputError, match=r"sun397_tfds_te.txt:1: '/a/abbey_ruins/sun_000001.jpg' is not "):
        build("sun397-folder", root, "sun397", tmp_path / "c")
    # the split lists missing: one line naming each
    test_list.unlink()
    (root / SUN397_LISTS["train"]).unlink()
    with pytest.raises(InputError) as err:
        build("sun397-folder", root / "SUN397", "sun397", tmp_path / "c")  # --source SUN397/: the lists inside it
    message = str(err.value)
    missing = f"{root / 'SUN397' / SUN397_LISTS['train']}, {root / 'SUN397' / SUN397_LISTS['validation']}, "
    assert "\n" not in message and message.startswith(missing + f"{root / 'SUN397' / SUN397_LISTS['test']}: not found")
    with pytest.raises(InputError) as err:
        build("sun397-folder", root, "sun397", tmp_path / "c")
    message = str(err.value)
    assert message.startswith(f"{root / SUN397_LISTS['train']}, {root / SUN397_LISTS['test']}: not found (")
    assert "\n" not in message and "--source-format sun397-folder" in message
    assert "sun397_tfds_{tr,va,te}.txt" in message


def test_cli_builds_dtd_keeping_the_jpeg_bytes(tmp_path, capsys):
    root, listing = fake_dtd(tmp_path / "src")
    rc = main(["prepare-vtab", "--source-format", "dtd-folder", "--source", str(root / "dtd"), "--dataset", "dtd",
               "--out", str(tmp_path / "out"), "--image-encoding", "source", "--full"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dtd" in out and "ok" in out
    first = (tmp_path / "out/dtd/train800.txt").read_text().split()[0]
    name = sorted(listing["train"], key=_sha_order)[0][0]
    assert first == "images/train/000000.jpg"
    assert (tmp_path / "out/dtd" / first).read_bytes() == (root / "dtd/images" / name).read_bytes()


def test_refusals(tmp_path, capsys):
    root, listing = fake_pets(tmp_path / "pets")
    with pytest.raises(InputError, match="pets only"):
        build("pets-folder", root, "dtd", tmp_path / "out")
    trainval = root / "oxford-iiit-pet/annotations/trainval.txt"
    text = trainval.read_text()
    trainval.write_text(text.replace("Abyssinian_0 1 ", "Abyssinian_0 2 ", 1))  # class id of another breed
    with pytest.raises(InputError, match=r"trainval.txt:1: 'Abyssinian_0 2 .*class id"):
        build("pets-folder", root, "pets", tmp_path / "out")
    trainval.write_text(text)
    image = root / "oxford-iiit-pet/images" / listing["train"][5][0]
    image.unlink()  # listed, not there
    with pytest.raises(InputError, match=f"^{image}: not found"):
        build("pets-folder", root, "pets", tmp_path / "out")
    image.write_bytes(b"not an image")
    with pytest.raises(InputError, match=f"^{image}: not a readable image"):
        build("pets-folder", root, "pets", tmp_path / "out")
    with pytest.raises(InputError, match="holds dsprites_loc / dsprites_ori only"):
        build("dsprites-npz", root, "pets", tmp_path / "out")
    with pytest.raises(InputError, match="raw pixels"):
        build("smallnorb-mat", root, "smallnorb_azi", tmp_path / "out", image_encoding="source")
    (tmp_path / "norb").mkdir()
    for pattern in NORB_FILES.values():
        for kind in ("dat", "info"):  # a header declaring 5 bytes of data, and none
            (tmp_path / "norb" / pattern.format(kind)).write_bytes(np.array([0x1E3D4C55, 1, 5, 1, 1], "<i4").tobytes())
    with pytest.raises(InputError, match="bytes, not the"):
        build("smallnorb-mat", tmp_path / "norb", "smallnorb_azi", tmp_path / "out")
    assert main(["prepare-vtab", "--source-format", "eurosat-folder", "--source", str(tmp_path / "pets"),
                 "--dataset", "eurosat", "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "AnnualCrop: not found" in err and "2750/<class>/*.jpg" in err


def test_cli_choices_are_the_builders_formats():
    sub = next(a for a in parser()._subparsers._group_actions if "prepare-vtab" in (a.choices or {}))
    action = next(a for a in sub.choices["prepare-vtab"]._actions if a.dest == "source_format")
    assert tuple(action.choices) == SOURCE_FORMATS
