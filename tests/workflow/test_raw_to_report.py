"""A raw archive all the way to the report: `prepare-vtab` -> its checker -> a tiny study -> report,
and the provenance every row then carries (issue 21's demonstration; `slow`, about two minutes).

The raw tree is a fabricated miniature EuroSAT (``2750/<class>/<class>_<n>.jpg``, as distributed;
1340 JPEGs): each class its own colour, so the tiny study learns something, and every image its
own pattern, so no two are the same bytes (the cache refuses splits that share an image). Run with
``-s`` to see the provenance columns printed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from peft_core.cli import main

from peft_core.vtab_archives import EUROSAT_CLASSES

from .smk import REPO, copy_code, run_in_subprocess

PROVENANCE = ["train_source_format", "train_manifest_sha256", "train_listing_sha256", "eval_listing_sha256",
              "interpolation", "normalize", "image_size", "checkpoint_sha256", "code_stamp", "torch"]  # fmt: skip


def _fake_eurosat(root: Path, n: int = 1340) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    hues = rng.integers(0, 256, size=(len(EUROSAT_CLASSES), 3))
    for i in range(n):
        c = i % len(EUROSAT_CLASSES)
        pixels = np.empty((16, 16, 3), dtype=np.uint8)
        pixels[:] = hues[c]
        pixels[:8, :8] = (i * 37 % 256, i // 256 * 40, 255 - i % 256)  # this image's own block
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        path = root / "2750" / EUROSAT_CLASSES[c] / f"{EUROSAT_CLASSES[c]}_{i + 1}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return root


@pytest.mark.slow
def test_raw_archive_to_report_with_provenance_on_every_row(tmp_path, capsys):
    source = _fake_eurosat(tmp_path / "raw")
    work = tmp_path / "study"
    work.mkdir()
    copy_code(work)
    root = work / "data" / "vtab"
    assert main(["prepare-vtab", "--source-format", "eurosat-folder", "--source", str(source),
                 "--dataset", "eurosat", "--out", str(root)]) == 0  # fmt: skip
    built = capsys.readouterr().out
    assert "eurosat" in built and "ok" in built.lower(), built  # built, then checked by the checker
    manifest = root / "eurosat" / "manifest.json"
    record = json.loads(manifest.read_text())

    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["study"] = "raw"
    cfg["data"] = {"root": "data/vtab", "image_size": 32, "normalize": "none"}
    cfg["backbone"]["checkpoint"] = "results/raw/backbone/vit_tiny_upstream.safetensors"
    cfg["datasets"] = {"eurosat": {"num_classes": 10, "group": "specialized"}}
    cfg.pop("robustness")
    (work / "raw.yaml").write_text(yaml.safe_dump(cfg))
    run_in_subprocess(work, work / "raw.yaml")

    results = pd.read_parquet(work / "reports" / "raw" / "results.parquet")
    final = results[results.stage == "final"]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 24):
        print(f"\nprepare-vtab: {built.strip()}\nmanifest format: {record['format']}")
        print(final[["method", "accuracy", *PROVENANCE]].T.to_string())
    assert len(final) == 2 and (final.status == "ok").all()
    assert set(results.train_source_format) == {"peft-core vtab build v1 from eurosat-folder"}
    assert set(results.train_manifest_sha256) == {hashlib.sha256(manifest.read_bytes()).hexdigest()}
    assert results[PROVENANCE].notna().all().all(), results[PROVENANCE].isna().sum()
    summary = (work / "reports" / "raw" / "summary.md").read_text()
    assert "peft-core vtab build v1 from eurosat-folder" in summary and "Computed with torch" in summary
    assert "warn" not in summary.split("## ")[0].lower(), summary[:2000]  # one data source, one code version
