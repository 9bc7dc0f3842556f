"""Data commands: the demo's generated data and backbone, split caches, and the preparation of VTAB-1k, many-shot and FGVC trees from raw sources.

Part of the ``peft-core`` command line (:mod:`peft_core.cli` builds the parser).
Heavy imports (torch, timm) happen inside the commands that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from . import model_from_json


def cmd_make_demo_data(a) -> int:
    from ..demo import write_vtab_folder

    out = write_vtab_folder(a.dataset, a.root)
    print(f"wrote {out}")
    return 0


def cmd_pretrain_demo(a) -> int:
    from ..pretrain import pretrain_demo

    from ..sections import BackboneConfig

    backbone = model_from_json(BackboneConfig, a.backbone_json, "backbone")
    pretrain_demo(backbone, a.out, threads=a.threads)
    return 0


def cmd_cache(a) -> int:
    from ..data import build_cache
    from ..provenance import source_path, source_record, write_source

    source_path(a.out).unlink(missing_ok=True)  # never a stale record beside a new cache
    info = build_cache(a.root, a.dataset, a.split, a.size, a.num_classes, a.out, layout=a.layout,
                       interpolation=a.interpolation, disjoint_from=a.disjoint_from)  # fmt: skip
    suffix = {"vtab": ".txt", "csv": ".csv"}.get(a.layout, "")
    write_source(a.out, source_record(Path(a.root) / a.dataset / f"{a.split}{suffix}", a.layout, a.size, a.interpolation))
    print(f"{a.out}: {info.count} images, content sha256 {info.sha256} (also in {a.out}.sha256)")
    return 0


def cmd_prepare_vtab(a) -> int:
    from ..vtab import check_root

    if a.source_format:  # build one data set from raw sources, then check it
        from ..vtab_build import build

        missing = [f for f, v in (("--source", a.source), ("--dataset", a.dataset), ("--out", a.out)) if not v]
        if missing:
            raise InputError(f"--source-format needs {', '.join(missing)}")
        print(f"wrote {build(a.source_format, a.source, a.dataset, a.out, image_encoding=a.image_encoding)}")
        a.root, a.datasets = a.out, [a.dataset]
    elif not a.root:
        raise InputError("give --root (check a processed tree) or --source-format (build one data set)")
    text, problems = check_root(a.root, a.datasets, full=a.full)
    print(text)
    return 1 if problems else 0


def cmd_prepare_manyshot(a) -> int:
    from ..manyshot import FULL, PRESETS, Source, config_entries, parse_size, prepare

    preset = PRESETS.get(a.preset or a.dataset)
    if a.sizes:
        sizes = tuple(parse_size(t) for t in a.sizes.split(","))
    elif preset:
        sizes = preset.sizes
    else:
        raise InputError(f"--sizes: no preset for {a.dataset!r} ({', '.join(PRESETS)}): give --sizes, e.g. 1k,5k,full")
    if a.val_fraction is not None:
        if not 0 < a.val_fraction < 1:
            raise InputError(f"--val-fraction: {a.val_fraction} is not between 0 and 1")
        fractions, origin = {s: a.val_fraction for s in sizes}, "command line"
    elif preset and set(sizes) <= set(preset.val_fraction):
        fractions, origin = preset.val_fraction, preset.source
    else:
        raise InputError("--val-fraction: sizes outside the preset need a validation fraction (e.g. 0.1)")
    src = Source(Path(a.source), a.dataset, a.layout, a.num_classes, a.train_split, a.test_split)
    folders = prepare(src, Path(a.out), sizes, fractions, seed=a.seed, name=a.name, preset_source=origin)
    largest = folders[sizes.index(FULL)].name if FULL in sizes else None
    print(f"wrote {len(folders)} subsets of {a.dataset} under {a.out} (sizes from {origin}); study config entries:")
    print(config_entries(folders, a.num_classes, a.group, test_cache_from=largest))
    return 0


def cmd_prepare_fgvc(a) -> int:
    from ..fgvc import prepare_fgvc

    folder = prepare_fgvc(Path(a.source), a.dataset, Path(a.out))
    counts = json.loads((folder / "manifest.json").read_text())["images"]
    print(f"wrote {folder}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return 0


def cmd_make_demo_shift(a) -> int:
    from ..demo import write_shifted_folder

    print(f"wrote {write_shifted_folder(a.dataset, a.root, a.split)}")
    return 0
