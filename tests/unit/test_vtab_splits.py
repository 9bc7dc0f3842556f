"""The VTAB-1k split definitions and structured-task labels (peft_core/vtab_splits.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_core.vtab import DATASETS
from peft_core.vtab_splits import (
    SPLIT_NAMES,
    TASKS,
    clevr_count_label,
    clevr_distance_label,
    dsprites_label,
    kitti_distance_label,
    parse_slices,
    resolve_split,
    resolved_slices,
    slice_indices,
    task_label,
)

CONFIG = Path(__file__).resolve().parents[2] / "config" / "vtab1k.yaml"


def test_names_and_classes_match_the_config_and_the_checker():
    datasets = yaml.safe_load(CONFIG.read_text())["datasets"]
    assert {k: v["num_classes"] for k, v in datasets.items()} == {k: t.num_classes for k, t in TASKS.items()}
    assert list(TASKS) == list(DATASETS)
    assert all(set(t.splits) == set(SPLIT_NAMES) for t in TASKS.values())


def test_slice_indices():
    assert slice_indices("train[45000:45200]", 50000) == range(45000, 45200)
    assert slice_indices("train[:800]", 50000) == range(800)
    assert slice_indices("test", 10) == range(10)
    assert slice_indices("train[-5:]", 10) == range(5, 10)
    assert slice_indices("test[50%:]", 24300) == range(12150, 24300)
    assert slice_indices("train[:800]", 500) == range(500)  # clipped, as TFDS
    with pytest.raises(ValueError):
        slice_indices("train[:800]+test", 10)
    with pytest.raises(ValueError):
        parse_slices("train[1:2:3]")


# TFDS sizes of the cited versions where an offset depends on them (dataset_info.json's shardLengths)
OFFICIAL = {
    "cifar100": ({"train": 50000, "test": 10000}, "train[45000:45200]", "test"),
    "caltech101": ({"train": 3060, "test": 6084}, "train[2754:2954]", "test"),
    "pets": ({"train": 3680, "test": 3669}, "train[2944:3144]", "test"),
    "svhn": ({"train": 73257, "test": 26032}, "train[65931:66131]", "test"),
    "eurosat": ({"train": 27000}, "train[16200:16400]", "train[21600:]"),
    "resisc45": ({"train": 31500}, "train[18900:19100]", "train[25200:]"),
    "clevr_count": ({"train": 70000, "validation": 15000}, "train[63000:63200]", "validation"),
    "dsprites_loc": ({"train": 737280}, "train[589824:590024]", "train[663552:]"),
    "smallnorb_ele": ({"train": 24300, "test": 24300}, "test[:200]", "test[50%:]"),
    "dtd": ({"train": 1880, "validation": 1880, "test": 1880}, "validation[:200]", "test"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_resolved_offsets(name):
    counts, val200, test = OFFICIAL[name]
    s = resolved_slices(TASKS[name], counts)
    assert s["train800"] == "train[:800]"
    assert (s["val200"], s["test"]) == (val200, test)
    assert s["train800val200"] == f"train[:800]+{val200}"
    parts = resolve_split(s["train800val200"], counts)
    assert sum(len(r) for _, r in parts) == 1000


def test_clevr_labels():
    assert [clevr_count_label(n) for n in range(3, 11)] == list(range(8))
    # depth is the 3rd pixel coordinate; the nearest object decides; thresholds 0, 8, 8.5, 9, 9.5, 10
    assert clevr_distance_label([1.0, 2.0, 7.9]) == 0
    assert clevr_distance_label([0, 0, 12.0, 0, 0, 8.2]) == 1
    assert clevr_distance_label([0, 0, 9.0]) == 2  # 9.0 is not above 9.0
    assert clevr_distance_label([0, 0, 9.7]) == 4
    assert clevr_distance_label([0, 0, 50.0]) == 5
    feats = {"objects/size": [0, 1, 1, 0], "objects/pixel_coords": [0, 0, 9.2] * 4}
    assert task_label(TASKS["clevr_count"], feats) == 1
    assert task_label(TASKS["clevr_dist"], feats) == 3


def test_kitti_closest_vehicle_distance():
    # types: 0 Car, 1 Van, 2 Truck, 3 Pedestrian...; locations (x, y, z) per object
    assert kitti_distance_label([0], [0, 0, 5.0]) == 0
    assert kitti_distance_label([3, 1], [0, 0, 2.0, 0, 0, 10.0]) == 1  # the pedestrian does not count
    assert kitti_distance_label([2], [0, 0, 30.0]) == 2
    assert kitti_distance_label([3, 5], [0, 0, 3.0, 0, 0, 4.0]) == 3  # no vehicle: 1000 -> class 3
    assert kitti_distance_label([], []) == 3
    with pytest.raises(ValueError):
        kitti_distance_label([0, 1], [0, 0, 1.0])


def test_dsprites_and_smallnorb_labels():
    assert [dsprites_label(v, "label_x_position") for v in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [dsprites_label(v, "label_orientation") for v in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]
    assert sorted({dsprites_label(v, "label_orientation") for v in range(40)}) == list(range(16))
    assert task_label(TASKS["dsprites_ori"], {"label_orientation": [39], "label_x_position": [0]}) == 15
    assert task_label(TASKS["smallnorb_azi"], {"label_azimuth": [17], "label_elevation": [8]}) == 17
    assert task_label(TASKS["smallnorb_ele"], {"label_azimuth": [17], "label_elevation": [8]}) == 8
    assert task_label(TASKS["dmlab"], {"label": [5]}) == 5
