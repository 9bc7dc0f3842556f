"""``peft-core prepare-vtab`` on a tiny fake processed VTAB-1k root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peft_core.cli import main
from peft_core.vtab import DATASETS

N_TEST = 30
REFERENCE_README = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "README.md"


def fake_dataset(root: Path, name: str) -> None:
    """Correct split files over empty placeholder image files (existence is what is checked)."""
    n_cls = DATASETS[name][1]
    base = root / name
    (base / "images").mkdir(parents=True)
    lines = {"train800": range(800), "val200": range(800, 1000), "test": range(1000, 1000 + N_TEST)}
    lines["train800val200"] = range(1000)
    for i in range(1000 + N_TEST):
        (base / "images" / f"{i:04d}.jpg").touch()
    for split, ids in lines.items():
        (base / f"{split}.txt").write_text("".join(f"images/{i:04d}.jpg {i % n_cls}\n" for i in ids))


@pytest.fixture
def root(tmp_path) -> Path:
    for name in ("eurosat", "kitti"):
        fake_dataset(tmp_path, name)
    return tmp_path


def check(root: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["prepare-vtab", "--root", str(root), "--datasets", "eurosat", "kitti", *extra])
    return rc, capsys.readouterr().out


def reference_table() -> list[tuple[str, str, int]]:
    """(data set, group, classes) as ../shared/reference/README.md lists them, in its order."""
    if not REFERENCE_README.is_file():
        pytest.skip(f"reference README not found at {REFERENCE_README} (../shared/reference)")
    text = " ".join(REFERENCE_README.read_text().split())
    listing = text.split("19 datasets (classes):", 1)[1].split(" - ", 1)[0]
    rows = []
    for group, names in re.findall(r"(Natural|Specialized|Structured): ([^;]*)", listing):
        rows += [(name, group.lower(), int(n)) for name, n in re.findall(r"(\w+) \((\d+)\)", names)]
    assert len(rows) == 19, listing  # the parse itself
    return rows


def test_the_table_is_the_reference_studys():
    assert [(name, group, n) for name, (group, n) in DATASETS.items()] == reference_table()


def test_class_counts_bound_the_labels(tmp_path, capsys):
    """A data set's class count from the table is what labels are checked against (sun397: 0..396)."""
    fake_dataset(tmp_path, "sun397")  # labels i % 397: 0..396 all used
    assert main(["prepare-vtab", "--root", str(tmp_path), "--datasets", "sun397"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["sun397", "397"]
    val = tmp_path / "sun397" / "val200.txt"
    val.write_text(val.read_text().replace("images/0800.jpg 6\n", "images/0800.jpg 397\n"))
    assert main(["prepare-vtab", "--root", str(tmp_path), "--datasets", "sun397"]) == 1
    assert "sun397/val200: 1 labels outside 0..396, e.g. images/0800.jpg 397" in capsys.readouterr().out


def test_a_correct_root_passes(root, capsys):
    rc, out = check(root, capsys, "--full")
    assert rc == 0, out
    assert "eurosat" in out and "kitti" in out and "problems:" not in out
    assert out.splitlines()[0].split() == ["dataset", "classes", "train800", "val200", "train800val200", "test", "status"]
    assert out.splitlines()[2].split() == ["eurosat", "10", "800", "200", "1000", str(N_TEST), "ok"]


def test_every_kind_of_problem_is_listed_and_fails(root, capsys):
    (root / "eurosat" / "images" / "0000.jpg").unlink()  # first line of train800: always in the sample
    (root / "eurosat" / "test.txt").unlink()
    val = root / "kitti" / "val200.txt"
    val.write_text(val.read_text().replace("images/0800.jpg 0", "images/0800.jpg 4"))
    tr = root / "kitti" / "train800.txt"
    tr.write_text("".join(tr.read_text().splitlines(keepends=True)[:-1]))
    rc, out = check(root, capsys)
    assert rc == 1
    assert "eurosat/train800: 1 image files missing (of 25 sampled), e.g. images/0000.jpg" in out
    assert "eurosat/train800val200: 1 image files missing" in out
    assert f"eurosat/test: {root / 'eurosat' / 'test.txt'}: split file not found" in out
    assert "kitti/val200: 1 labels outside 0..3, e.g. images/0800.jpg 4" in out
    assert "kitti/train800: 799 lines, expected 800" in out
    assert "kitti/train800val200: not the union of train800 and val200" in out
    assert out.splitlines()[2].split()[5] == "missing"


def test_leak_between_splits(root, capsys):
    test = root / "eurosat" / "test.txt"
    test.write_text(test.read_text() + "images/0005.jpg 5\n")
    rc, out = check(root, capsys)
    assert rc == 1 and "eurosat/test: 1 images also in training splits, e.g. images/0005.jpg" in out


def test_sampled_check_misses_what_full_check_finds(root, capsys):
    (root / "kitti" / "images" / "0001.jpg").unlink()  # not among the evenly spaced sample
    assert check(root, capsys)[0] == 0
    rc, out = check(root, capsys, "--full")
    assert rc == 1 and "kitti/train800: 1 image files missing (of all), e.g. images/0001.jpg" in out


def test_default_is_all_19_and_absent_ones_are_reported(root, capsys):
    rc = main(["prepare-vtab", "--root", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"cifar100/-: {root / 'cifar100'}: folder not found" in out
    assert sum(line.endswith("  ok") for line in out.splitlines()) == 2
    # every data set of the reference table gets a row (with its class count), in the table's order
    table = reference_table() if REFERENCE_README.is_file() else [(n, g, k) for n, (g, k) in DATASETS.items()]
    names = {name for name, _, _ in table}
    rows = [line.split()[:2] for line in out.splitlines()[2:] if line.split() and line.split()[0] in names]
    assert rows == [[name, str(n)] for name, _, n in table]


def test_unknown_data_set_and_missing_root_are_input_errors(root, tmp_path, capsys):
    assert main(["prepare-vtab", "--root", str(root), "--datasets", "imagenet"]) == 2
    assert "--datasets: unknown imagenet" in capsys.readouterr().err
    assert main(["prepare-vtab", "--root", str(tmp_path / "nope")]) == 2
    assert "folder not found" in capsys.readouterr().err
