"""`peft-core cache`: interpolation, streaming, content fingerprint, split hygiene."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peft_core.cli import main
from peft_core.data import build_cache, cache_fingerprint, decode_image, fingerprint_path, load_split
from peft_core.errors import InputError
from peft_core.hygiene import shared_images


def noise_png(path: Path, seed: int, shape: tuple[int, int] = (23, 17)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def vtab_split(base: Path, split: str, names: list[str], labels: list[int] | None = None) -> None:
    labels = labels or [0] * len(names)
    (base / f"{split}.txt").write_text("".join(f"{n} {y}\n" for n, y in zip(names, labels)))


def cache_argv(tmp_path: Path, split: str, *extra: str, out: str = "c.safetensors", layout: str = "vtab") -> list[str]:
    return ["cache", "--root", str(tmp_path), "--dataset", "ds", "--split", split, "--size", "8",
            "--num-classes", "2", "--out", str(tmp_path / out), "--layout", layout, *extra]  # fmt: skip


# --- interpolation ---------------------------------------------------------------------------------------


def test_bicubic_matches_the_reference_transform_exactly(tmp_path):
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    base = tmp_path / "ds"
    shapes = [(23, 17), (300, 200), (8, 8), (64, 129)]  # down, up and equal sizes, odd aspect ratios
    names = [noise_png(base / f"{i}.png", i, shape).name for i, shape in enumerate(shapes)]
    vtab_split(base, "test", names)
    size = 24
    ref = transforms.Compose([transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
                              transforms.ToTensor()])  # fmt: skip
    expected = torch.stack(
        [(ref(Image.open(base / n).convert("RGB")) * 255).round().byte() for n in names]
    )
    build_cache(tmp_path, "ds", "test", size, 1, tmp_path / "bicubic.safetensors")
    assert torch.equal(load_split(tmp_path / "bicubic.safetensors").images, expected)
    build_cache(tmp_path, "ds", "test", size, 1, tmp_path / "bilinear.safetensors", interpolation="bilinear")
    assert not torch.equal(load_split(tmp_path / "bilinear.safetensors").images, expected)


def test_unknown_interpolation(tmp_path):
    with pytest.raises(InputError, match="interpolation: 'cubic' is not one of bicubic, bilinear"):
        build_cache(tmp_path, "ds", "test", 8, 2, tmp_path / "c.safetensors", interpolation="cubic")
    with pytest.raises(SystemExit):
        main(cache_argv(tmp_path, "test", "--interpolation", "cubic"))


# --- streaming and atomic output -------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from peft_core.data import build_cache, load_split

    def peak_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

    root, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    build_cache(root, "ds", "warm", size, 2, root / "warm.safetensors")  # imports and PIL buffers
    before = peak_kib()
    assert build_cache(root, "ds", "big", size, 2, root / "big.safetensors").count == n
    print(peak_kib() - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_the_split(tmp_path):
    n, size = 1500, 128  # decoded split: 1500 * 3 * 128 * 128 bytes = 70 MiB
    base = tmp_path / "ds"
    noise_png(base / "a.png", 0)
    noise_png(base / "b.png", 1)
    vtab_split(base, "warm", ["a.png", "b.png"], [0, 1])
    vtab_split(base, "big", ["a.png", "b.png"] * (n // 2), [0, 1] * (n // 2))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), str(n), str(size)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    growth_mib = int(proc.stdout.split()[-1]) / 1024
    full_mib = n * 3 * size * size / 2**20
    assert growth_mib < full_mib / 5, f"peak RSS grew by {growth_mib:.1f} MiB for a {full_mib:.0f} MiB split"
    data = load_split(tmp_path / "big.safetensors")
    assert data.images.shape == (n, 3, size, size) and data.labels[:4].tolist() == [0, 1, 0, 1]


def test_the_cache_is_a_standard_safetensors_file(tmp_path):
    from safetensors import safe_open

    base = tmp_path / "ds"
    names = [noise_png(base / f"{i}.png", i).name for i in range(5)]
    vtab_split(base, "test", names, [0, 1, 1, 0, 1])
    build_cache(tmp_path, "ds", "test", 8, 2, tmp_path / "c.safetensors", interpolation="bilinear")
    data = load_split(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:  # the library's own reader
        assert f.metadata() == {"format": "peft-core cache v1", "interpolation": "bilinear"}
        assert torch.equal(f.get_tensor("images"), data.images)
        assert f.get_tensor("labels").tolist() == [0, 1, 1, 0, 1]
    expected = torch.stack([torch.from_numpy(decode_image(base / n, 8, "bilinear")) for n in names])
    assert torch.equal(data.images, expected)


def test_a_cache_must_be_named_safetensors(tmp_path):
    base = tmp_path / "ds"
    vtab_split(base, "test", [noise_png(base / "0.png", 0).name])
    with pytest.raises(InputError, match=r"c\.pt: a data cache is a \.safetensors file"):
        build_cache(tmp_path, "ds", "test", 8, 2, tmp_path / "c.pt")


def test_a_corrupt_image_mid_split_leaves_no_file(tmp_path, capsys):
    base = tmp_path / "ds"
    names = [noise_png(base / f"{i}.png", i, (64, 64)).name for i in range(6)]
    good = (base / names[3]).read_bytes()
    (base / names[3]).write_bytes(good[: len(good) // 2])
    vtab_split(base, "test", names)
    before = sorted(os.listdir(tmp_path))
    assert main(cache_argv(tmp_path, "test")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"peft-core: error: {base / names[3]}: corrupt image (") and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no cache, no sidecar, no temporary file


# --- content fingerprint ---------------------------------------------------------------------------------


def test_cli_writes_the_fingerprint_after_the_cache(tmp_path, capsys):
    base = tmp_path / "ds"
    vtab_split(base, "test", [noise_png(base / f"{i}.png", i).name for i in range(3)])
    assert main(cache_argv(tmp_path, "test")) == 0
    sidecar = fingerprint_path(tmp_path / "c.safetensors")
    assert sidecar == tmp_path / "c.safetensors.sha256"
    text = sidecar.read_text()
    assert len(text) == 65 and text.endswith("\n") and int(text, 16) >= 0
    assert sidecar.stat().st_mtime_ns >= (tmp_path / "c.safetensors").stat().st_mtime_ns
    assert text.strip() in capsys.readouterr().out


def test_fingerprint_is_of_the_content(tmp_path):
    base = tmp_path / "ds"
    names = [noise_png(base / f"{i}.png", i).name for i in range(4)]
    vtab_split(base, "a", names, [0, 1, 0, 1])
    shutil.copytree(base, tmp_path / "copy")  # the same images under other paths
    vtab_split(base, "b", names, [0, 1, 1, 1])  # one label changed
    one = build_cache(tmp_path, "ds", "a", 8, 2, tmp_path / "one.safetensors").sha256
    two = build_cache(tmp_path, "copy", "a", 8, 2, tmp_path / "two.safetensors").sha256
    other = build_cache(tmp_path, "ds", "b", 8, 2, tmp_path / "other.safetensors").sha256
    assert one == two != other
    for name, digest in [("one.safetensors", one), ("other.safetensors", other)]:  # recomputed from the file alone
        fingerprint_path(tmp_path / name).unlink()
        assert cache_fingerprint(tmp_path / name) == digest
        assert fingerprint_path(tmp_path / name).read_text() == digest + "\n"
    data = load_split(tmp_path / "one.safetensors")  # a cache written by plain torch.save, as before streaming
    torch.save({"images": data.images.clone(), "labels": data.labels.clone()}, tmp_path / "plain.pt")
    assert cache_fingerprint(tmp_path / "plain.pt") == one


def test_fingerprint_trusts_only_a_sidecar_not_older_than_the_cache(tmp_path):
    base = tmp_path / "ds"
    vtab_split(base, "a", [noise_png(base / "x.png", 0).name])
    digest = build_cache(tmp_path, "ds", "a", 8, 2, tmp_path / "c.safetensors").sha256
    cache, sidecar = tmp_path / "c.safetensors", fingerprint_path(tmp_path / "c.safetensors")
    sidecar.write_text("f" * 64 + "\n")
    t = cache.stat().st_mtime_ns
    os.utime(sidecar, ns=(t, t))
    assert cache_fingerprint(cache) == "f" * 64  # a fresh sidecar is read, not recomputed
    os.utime(sidecar, ns=(t - 10**9, t - 10**9))
    assert cache_fingerprint(cache) == digest  # a stale one is recomputed and rewritten
    assert sidecar.read_text() == digest + "\n"
    with pytest.raises(InputError, match="gone.pt: data cache not found"):
        cache_fingerprint(tmp_path / "gone.pt")


# --- split hygiene ---------------------------------------------------------------------------------------


def make_splits(root: Path, layout: str, overlap: str | None) -> None:
    """Splits 'val200' and 'test' of ``root/ds``; ``overlap``: None, 'path' (one file in both) or 'copy'."""
    base = root / "ds"
    val = [noise_png(base / "val200" / "a" / f"v{i}.png", i) for i in range(3)]
    test = [noise_png(base / "test" / "b" / f"t{i}.png", 10 + i) for i in range(3)]
    noise_png(base / "val200" / "b" / "v9.png", 9)
    noise_png(base / "test" / "a" / "t9.png", 19)
    if overlap == "copy":
        shutil.copy(val[1], test[2])
    elif overlap == "path" and layout == "imagefolder":
        test[2].unlink()
        test[2].symlink_to(val[1])  # the only way one file sits in two folder splits
    elif overlap == "path":
        test[2] = base / "test" / ".." / "val200" / "a" / "v1.png"  # another spelling of val[1]
    for split, paths in [("val200", val), ("test", test)]:
        rel = [p.relative_to(base) if ".." not in p.parts else Path(os.path.relpath(p, base)) for p in paths]
        if layout == "vtab":
            vtab_split(base, split, [str(r) for r in rel])
        elif layout == "csv":
            (base / f"{split}.csv").write_text("path,label\n" + "".join(f"{r},0\n" for r in rel))


@pytest.mark.parametrize("layout", ["vtab", "csv", "imagefolder"])
@pytest.mark.parametrize("overlap", ["path", "copy"])
def test_overlapping_splits_are_refused(tmp_path, capsys, layout, overlap):
    make_splits(tmp_path, layout, overlap)
    argv = cache_argv(tmp_path, "val200", "--disjoint-from", "test", layout=layout)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'val200' and 'test' share an image" in err and "v1.png" in err
    assert ("same file" in err) == (overlap == "path")
    assert not (tmp_path / "c.safetensors").exists()
    assert main(cache_argv(tmp_path, "test", "--disjoint-from", "val200", layout=layout)) == 2
    assert "'test' and 'val200' share an image" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["vtab", "csv", "imagefolder"])
def test_disjoint_splits_are_cached(tmp_path, layout):
    make_splits(tmp_path, layout, None)
    assert main(cache_argv(tmp_path, "val200", "--disjoint-from", "test", layout=layout)) == 0
    assert load_split(tmp_path / "c.safetensors").images.shape[0] == (4 if layout == "imagefolder" else 3)


def test_disjoint_from_itself_or_a_missing_split(tmp_path):
    make_splits(tmp_path, "vtab", None)
    with pytest.raises(InputError, match="--disjoint-from val200: that is the split being cached"):
        build_cache(tmp_path, "ds", "val200", 8, 2, tmp_path / "c.safetensors", disjoint_from=["val200"])
    with pytest.raises(InputError, match="train800.txt: split file not found"):
        build_cache(tmp_path, "ds", "val200", 8, 2, tmp_path / "c.safetensors", disjoint_from=["test", "train800"])


def test_shared_images_is_a_pure_check(tmp_path):
    a = [noise_png(tmp_path / f"a{i}.png", i) for i in range(3)]
    b = [noise_png(tmp_path / f"b{i}.png", 10 + i) for i in range(3)]
    same_size = tmp_path / "same_size.bin"  # as long as a[0], other bytes: hashed, not matched
    same_size.write_bytes(bytes(255 - x for x in a[0].read_bytes()))
    assert shared_images(a, b + [same_size]) is None
    assert shared_images([(p, 0) for p in a], [(b[0], 1), (a[2], 0)]) == (a[2], a[2])  # split_entries pairs
    shutil.copy(a[1], tmp_path / "copy.png")
    assert shared_images(a, [*b, tmp_path / "copy.png"]) == (a[1], tmp_path / "copy.png")
    with pytest.raises(InputError, match="gone.png: image file not found"):
        shared_images(a, [tmp_path / "gone.png"])


def test_cli_interpolation_choices_are_the_configs():
    from peft_core.cli import parser
    from peft_core.sections import INTERPOLATIONS

    cache = parser()._subparsers._group_actions[0].choices["cache"]
    action = next(a for a in cache._actions if a.dest == "interpolation")
    assert tuple(action.choices) == INTERPOLATIONS
