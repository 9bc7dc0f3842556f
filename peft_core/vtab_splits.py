"""The official VTAB-1k splits and labels of the 19 tasks, as plain data plus pure functions.

Source: google-research/task_adaptation at commit
``d7630d3c43ba052b5a35546b312d9454a9f2c96b`` (2021-03-22), files
``task_adaptation/data/{cifar,caltech,dtd,oxford_flowers102,oxford_iiit_pet,svhn,
sun397,patch_camelyon,eurosat,resisc45,diabetic_retinopathy,clevr,dmlab,kitti,
dsprites,smallnorb}.py`` (each class's ``tfds_splits`` dict and ``preprocess_fn``)
and ``scripts/run_all_tasks.sh`` (which task of each data class VTAB runs:
``kitti(task="closest_vehicle_distance")``, ``clevr(task="count_all")``, ...).

A split is a TFDS slice string over the TFDS split names. Where the reference
code derives an offset from the TFDS split size (``train_count = 90 *
trainval_count // 100``) the string holds a named placeholder (``{cut}``) and
:attr:`VtabTask.cuts` says how it is computed, so that the size read from a
prepared data set's ``dataset_info.json`` gives the same slice the reference
code gives: cifar100 (50,000 train images) resolves to ``train[45000:45200]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TASK_ADAPTATION_COMMIT = "d7630d3c43ba052b5a35546b312d9454a9f2c96b"
TASK_ADAPTATION_REPO = "https://github.com/google-research/task_adaptation"
SPLIT_NAMES = ("train800", "val200", "train800val200", "test")


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: its TFDS builder, split slices, label and image handling."""

    tfds_name: str  # TFDS builder name (folder under the TFDS data_dir), config included
    tfds_version: str  # the version pattern the reference code asks for
    num_classes: int
    source: str  # task_adaptation/data/<file>.py (+ the task argument VTAB uses)
    splits: Mapping[str, str]  # train800 / val200 / train800val200 / test -> TFDS slice string
    # placeholder -> (TFDS split, percents, offset):
    # value = sum(p * num_examples(split) // 100 for p in percents) + offset
    cuts: Mapping[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)
    label: str = "label"  # see LABELS: a feature key, or a structured rule name
    image_scale: int = 1  # dsprites stores 0/1 pixels; the reference preprocess multiplies by 255


# cifar / caltech / pets / svhn / clevr: val200 from the head of the held-out tail of ``train``
_HELD = {"train800": "train[:800]", "val200": "train[{cut}:{cut200}]",
         "train800val200": "train[:800]+train[{cut}:{cut200}]", "test": "test"}  # fmt: skip
# dtd / flowers / sun397 / pcam / retinopathy / dmlab / kitti: TFDS has a validation split
_VAL = {"train800": "train[:800]", "val200": "validation[:200]",
        "train800val200": "train[:800]+validation[:200]", "test": "test"}  # fmt: skip


def _cut(pct: int) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``train_count = pct * num_examples("train") // 100``; val200 is ``train[train_count:train_count+200]``."""
    return {"cut": ("train", (pct,), 0), "cut200": ("train", (pct,), 200)}


_TRAIN_ONLY = {**_HELD, "test": "train[{test_start}:]"}  # eurosat / resisc45 / dsprites: one TFDS split

TASKS: dict[str, VtabTask] = {
    "cifar100": VtabTask("cifar100", "3.*.*", 100, "cifar.py (num_classes=100)", _HELD, _cut(90)),
    "caltech101": VtabTask("caltech101", "3.*.*", 102, "caltech.py", _HELD, _cut(90)),
    "dtd": VtabTask("dtd", "3.*.*", 47, "dtd.py", _VAL),
    "flowers102": VtabTask("oxford_flowers102", "2.*.*", 102, "oxford_flowers102.py", _VAL),
    "pets": VtabTask("oxford_iiit_pet", "3.*.*", 37, "oxford_iiit_pet.py", _HELD, _cut(80)),
    "svhn": VtabTask("svhn_cropped", "3.*.*", 10, "svhn.py", _HELD, _cut(90)),
    "sun397": VtabTask("sun397/tfds", "4.*.*", 397, "sun397.py (config='tfds')", _VAL),
    "patch_camelyon": VtabTask("patch_camelyon", "2.*.*", 2, "patch_camelyon.py", _VAL),
    "eurosat": VtabTask("eurosat/rgb", "2.*.*", 10, "eurosat.py (subset='rgb')", _TRAIN_ONLY,
                        {**_cut(60), "test_start": ("train", (60, 20), 0)}),  # fmt: skip
    "resisc45": VtabTask("resisc45", "3.*.*", 45, "resisc45.py", _TRAIN_ONLY,
                         {**_cut(60), "test_start": ("train", (60, 20), 0)}),  # fmt: skip
    "retinopathy": VtabTask("diabetic_retinopathy_detection/btgraham-300", "3.*.*", 5,
                            "diabetic_retinopathy.py (config='btgraham-300')", _VAL),  # fmt: skip
    # CLEVR's TFDS "test" has no labels: the reference code tests on "validation"
    "clevr_count": VtabTask("clevr", "3.*.*", 8, "clevr.py (task='count_all')",
                            {**_HELD, "test": "validation"}, _cut(90), label="clevr_count"),  # fmt: skip
    "clevr_dist": VtabTask("clevr", "3.*.*", 6, "clevr.py (task='closest_object_distance')",
                           {**_HELD, "test": "validation"}, _cut(90), label="clevr_distance"),  # fmt: skip
    "dmlab": VtabTask("dmlab", "2.0.1", 6, "dmlab.py", _VAL),
    "kitti": VtabTask("kitti", "3.1.0", 4, "kitti.py (task='closest_vehicle_distance')", _VAL,
                      label="kitti_distance"),  # fmt: skip
    "dsprites_loc": VtabTask("dsprites", "2.*.*", 16, "dsprites.py (label_x_position, num_classes=16)",
                             _TRAIN_ONLY, {**_cut(80), "test_start": ("train", (80, 10), 0)},
                             label="dsprites_loc", image_scale=255),  # fmt: skip
    "dsprites_ori": VtabTask("dsprites", "2.*.*", 16, "dsprites.py (label_orientation, num_classes=16)",
                             _TRAIN_ONLY, {**_cut(80), "test_start": ("train", (80, 10), 0)},
                             label="dsprites_ori", image_scale=255),  # fmt: skip
    "smallnorb_azi": VtabTask("smallnorb", "2.*.*", 18, "smallnorb.py (label_azimuth)",
                              {"train800": "train[:800]", "val200": "test[:200]",
                               "train800val200": "train[:800]+test[:200]", "test": "test[50%:]"},
                              label="label_azimuth"),  # fmt: skip
    "smallnorb_ele": VtabTask("smallnorb", "2.*.*", 9, "smallnorb.py (label_elevation)",
                              {"train800": "train[:800]", "val200": "test[:200]",
                               "train800val200": "train[:800]+test[:200]", "test": "test[50%:]"},
                              label="label_elevation"),  # fmt: skip
}


# ---------------------------------------------------------------- slices

_PART = re.compile(r"^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _bound(text: str | None, n: int, default: int) -> int:
    if text is None:
        return default
    if text.endswith("%"):  # TFDS's default "closest" rounding: int(round(pct * n / 100))
        value = int(round(float(text[:-1]) * n / 100.0))
    else:
        value = int(text)
    if value < 0:
        value += n
    return max(0, min(n, value))


def parse_slices(spec: str) -> list[tuple[str, str | None, str | None]]:
    """``"train[:800]+validation[:200]"`` -> ``[("train", None, "800"), ("validation", None, "200")]``."""
    parts = []
    for part in spec.replace(" ", "").split("+"):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"{spec!r}: {part!r} is not a TFDS slice (split[start:stop])")
        parts.append((m.group(1), m.group(2), m.group(3)))
    return parts


def slice_indices(spec: str, n: int) -> range:
    """The record indices of one TFDS slice (no ``+``) of a split with ``n`` records.

    ``slice_indices("train[45000:45200]", 50000) == range(45000, 45200)``; percents
    round as TFDS does by default (``int(round(pct * n / 100))``); bounds are clipped.
    """
    parts = parse_slices(spec)
    if len(parts) != 1:
        raise ValueError(f"{spec!r}: one slice expected, got {len(parts)} (use resolve_split)")
    _, start, stop = parts[0]
    return range(_bound(start, n, 0), _bound(stop, n, n))


def cut_values(task: VtabTask, counts: Mapping[str, int]) -> dict[str, int]:
    """The placeholders' values from the TFDS split sizes, as the reference code computes them."""
    values = {}
    for name, (split, pcts, offset) in task.cuts.items():
        if split not in counts:
            raise KeyError(f"TFDS split {split!r} is needed for {name!r}; have {sorted(counts)}")
        values[name] = sum(p * counts[split] // 100 for p in pcts) + offset
    return values


def resolved_slices(task: VtabTask, counts: Mapping[str, int]) -> dict[str, str]:
    """Each VTAB-1k split's slice string with the offsets filled in (``train[45000:45200]``)."""
    values = cut_values(task, counts)
    return {split: spec.format(**values) for split, spec in task.splits.items()}


def resolve_split(spec: str, counts: Mapping[str, int]) -> list[tuple[str, range]]:
    """A resolved slice string (``+`` allowed) -> ``[(TFDS split, record indices), ...]``."""
    out = []
    for name, start, stop in parse_slices(spec):
        if name not in counts:
            raise KeyError(f"{spec!r}: TFDS split {name!r} not in the source (have {sorted(counts)})")
        n = counts[name]
        out.append((name, range(_bound(start, n, 0), _bound(stop, n, n))))
    return out


# ---------------------------------------------------------------- labels of the structured tasks

CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)  # clevr.py _closest_object_preprocess_fn
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)  # kitti.py _closest_vehicle_distance_pp
KITTI_VEHICLE_TYPES = 3  # objects/type < 3: Car, Van, Truck
DSPRITES_VALUES = {"label_x_position": 32, "label_orientation": 40}  # TFDS ClassLabel sizes


def _bin(thresholds: Sequence[float], value: float) -> int:
    """``tf.reduce_max(tf.where((thrs - value) < 0))``: the last threshold below ``value``."""
    below = [i for i, t in enumerate(thresholds) if t - value < 0]
    if not below:
        raise ValueError(f"{value} is not above the first threshold {thresholds[0]}")
    return below[-1]


def clevr_count_label(num_objects: int) -> int:
    """``count_all``: number of objects - 3 (CLEVR scenes hold 3..10 objects: 8 classes)."""
    return num_objects - 3


def clevr_distance_label(pixel_coords: Sequence[float]) -> int:
    """``closest_object_distance``: the smallest depth (3rd of each object's pixel_coords), binned."""
    depths = list(pixel_coords)[2::3]
    return _bin(CLEVR_DIST_THRESHOLDS, min(depths))


def kitti_distance_label(types: Sequence[int], locations: Sequence[float]) -> int:
    """``closest_vehicle_distance``: z of the nearest Car/Van/Truck (1000 if none), binned; 4 classes."""
    zs = list(locations)[2::3]
    if len(zs) != len(types):
        raise ValueError(f"{len(types)} object types but {len(zs)} locations")
    vehicle_z = [z for t, z in zip(types, zs, strict=True) if t < KITTI_VEHICLE_TYPES] + [1000.0]
    return _bin(KITTI_DIST_THRESHOLDS, min(vehicle_z))


def dsprites_label(value: int, attribute: str, num_classes: int = 16) -> int:
    """``floordiv(value, num_original / num_classes)`` in float32, as dsprites.py (32 -> 16, 40 -> 16)."""
    factor = float(DSPRITES_VALUES[attribute]) / num_classes
    return int(float(value) // factor)


def _first(features: Mapping[str, Sequence], key: str) -> int:
    values = features.get(key)
    if values is None or len(values) != 1:
        raise ValueError(f"feature {key!r}: one value expected, got {values!r}")
    return int(values[0])


def task_label(task: VtabTask, features: Mapping[str, Sequence]) -> int:
    """The VTAB label of one decoded TFDS example (feature key -> list of values)."""
    rule = task.label
    # TFDS flattens a Sequence of objects into one list per field ("objects/size": n values,
    # "objects/pixel_coords": 3n); an absent key is an empty sequence
    if rule == "clevr_count":
        return clevr_count_label(len(features.get("objects/size", ())))
    if rule == "clevr_distance":
        return clevr_distance_label(features.get("objects/pixel_coords", ()))
    if rule == "kitti_distance":
        return kitti_distance_label(features.get("objects/type", ()), features.get("objects/location", ()))
    if rule == "dsprites_loc":
        return dsprites_label(_first(features, "label_x_position"), "label_x_position", task.num_classes)
    if rule == "dsprites_ori":
        return dsprites_label(_first(features, "label_orientation"), "label_orientation", task.num_classes)
    return _first(features, rule)
