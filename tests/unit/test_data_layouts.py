"""Data-set layouts beside VTAB-1k (ImageFolder, CSV) and image errors at cache-building time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peft_core.cli import main
from peft_core.data import build_cache, load_split
from peft_core.errors import InputError


def png(path: Path, value: int, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def test_imagefolder_labels_are_sorted_class_folders(tmp_path):
    split = tmp_path / "ds" / "train"
    png(split / "zebra" / "a.png", 200)
    png(split / "ant" / "b.png", 10)
    png(split / "ant" / "c.PNG", 20)
    (split / "ant" / "notes.txt").write_text("not an image")
    (split / "ant" / ".DS_Store").write_bytes(b"\0")
    assert build_cache(tmp_path, "ds", "train", 8, 2, tmp_path / "c.safetensors", layout="imagefolder").count == 3
    data = load_split(tmp_path / "c.safetensors")
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.images[:, 0, 0, 0].tolist() == [10, 20, 200]


def test_imagefolder_class_count_must_match(tmp_path):
    png(tmp_path / "ds" / "val" / "a" / "x.png", 1)
    with pytest.raises(InputError, match="1 class folders, expected 3"):
        build_cache(tmp_path, "ds", "val", 8, 3, tmp_path / "c.safetensors", layout="imagefolder")
    (tmp_path / "ds" / "val" / "b").mkdir()
    (tmp_path / "ds" / "val" / "c").mkdir()  # empty folders keep absent classes' labels in place
    assert build_cache(tmp_path, "ds", "val", 8, 3, tmp_path / "c.safetensors", layout="imagefolder").count == 1


def test_csv_layout(tmp_path):
    png(tmp_path / "ds" / "img" / "one.png", 1)
    png(tmp_path / "elsewhere" / "two.png", 2)
    (tmp_path / "ds" / "train.csv").write_text(
        f"path,label,comment\nimg/one.png,3,x\n{tmp_path / 'elsewhere' / 'two.png'},0,absolute path\n"
    )
    assert main(["cache", "--root", str(tmp_path), "--dataset", "ds", "--split", "train", "--size", "4",
                 "--num-classes", "4", "--out", str(tmp_path / "c.safetensors"), "--layout", "csv"]) == 0  # fmt: skip
    data = load_split(tmp_path / "c.safetensors")
    assert data.labels.tolist() == [3, 0] and data.images[:, 0, 0, 0].tolist() == [1, 2]


def test_csv_without_header_or_with_bad_label(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.csv").write_text("img/one.png,3\n")
    with pytest.raises(InputError, match="train.csv:1: expected a header"):
        build_cache(tmp_path, "ds", "train", 4, 4, tmp_path / "c.safetensors", layout="csv")
    (tmp_path / "ds" / "train.csv").write_text("path,label\na.png,3\nb.png,cat\n")
    with pytest.raises(InputError, match="train.csv:3: expected 'path,label'"):
        build_cache(tmp_path, "ds", "train", 4, 4, tmp_path / "c.safetensors", layout="csv")


def test_vtab_layout_is_the_default(tmp_path):
    png(tmp_path / "ds" / "images" / "a b.png", 7)
    (tmp_path / "ds" / "train800.txt").write_text("images/a b.png 1\n")
    assert build_cache(tmp_path, "ds", "train800", 4, 2, tmp_path / "c.safetensors").count == 1
    with pytest.raises(InputError, match="label 1 of .*a b.png outside 0..0"):
        build_cache(tmp_path, "ds", "train800", 4, 1, tmp_path / "c.safetensors")


@pytest.mark.parametrize("layout", ["vtab", "csv"])
def test_truncated_png_fails_at_cache_time_naming_the_path(tmp_path, capsys, layout):
    good = tmp_path / "ds" / "good.png"
    good.parent.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # a long IDAT to cut into
    Image.fromarray(noise).save(good)
    bad = tmp_path / "ds" / "bad.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    if layout == "vtab":
        (tmp_path / "ds" / "test.txt").write_text("good.png 0\nbad.png 1\n")
    else:
        (tmp_path / "ds" / "test.csv").write_text("path,label\ngood.png,0\nbad.png,1\n")
    argv = ["cache", "--root", str(tmp_path), "--dataset", "ds", "--split", "test", "--size", "8",
            "--num-classes", "2", "--out", str(tmp_path / "c.safetensors"), "--layout", layout]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"peft-core: error: {bad}: corrupt image (") and "\n" not in err
    assert not (tmp_path / "c.safetensors").exists()


def test_missing_image_fails_naming_the_path(tmp_path, capsys):
    png(tmp_path / "ds" / "train" / "a" / "x.png", 1)
    (tmp_path / "ds" / "train.csv").write_text("path,label\ntrain/a/x.png,0\ntrain/a/gone.png,0\n")
    argv = ["cache", "--root", str(tmp_path), "--dataset", "ds", "--split", "train", "--size", "8",
            "--num-classes", "1", "--out", str(tmp_path / "c.safetensors"), "--layout", "csv"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"peft-core: error: {tmp_path / 'ds' / 'train' / 'a' / 'gone.png'}: image file not found"


def test_unknown_layout(tmp_path):
    with pytest.raises(InputError, match="layout: 'lmdb' is not one of vtab, imagefolder, csv"):
        build_cache(tmp_path, "ds", "train", 8, 2, tmp_path / "c.safetensors", layout="lmdb")
