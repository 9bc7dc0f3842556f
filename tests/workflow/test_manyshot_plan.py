"""Many-shot sizes built by `peft-core prepare-manyshot` plan one shared test cache (dry run, seconds)."""

from __future__ import annotations

import yaml

from peft_core.cli import main

from ..unit.test_manyshot_prepare import _fabricate
from .smk import REPO, copy_code, run_in_subprocess


def test_sizes_share_one_decoded_test_set(tmp_path):
    copy_code(tmp_path)
    raw = _fabricate(tmp_path / "raw")
    out = tmp_path / "manyshot"
    assert main(["prepare-manyshot", "--source", str(raw), "--dataset", "toy", "--num-classes", "3",
                 "--out", str(out), "--sizes", "20,40,full", "--val-fraction", "0.2"]) == 0  # fmt: skip
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["study"] = "ms"
    cfg["data"] = {"root": str(out), "image_size": 32, "normalize": "none", "tune_train": "train",
                   "tune_eval": "val", "final_train": "trainval", "final_eval": "test"}  # fmt: skip
    spec = {"num_classes": 3, "group": "natural", "layout": "csv"}
    cfg["datasets"] = {"toy_20": {**spec, "test_cache_from": "toy_full"},
                       "toy_40": {**spec, "test_cache_from": "toy_full"}, "toy_full": spec}  # fmt: skip
    cfg["methods"] = {"linear": {}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(tmp_path, tmp_path / "study.yaml", dryrun=True)
    caches = sorted(o for j in jobs if j["rule"].startswith("cache_split") for o in j["output"] if o.endswith(".safetensors"))
    assert [c for c in caches if "/test_" in c] == ["results/ms/cache/toy_full/test_32px_bicubic.safetensors"]
    assert len(caches) == 3 * 3 + 1  # train, val, trainval per size, one test
    records = [o for j in jobs if j["rule"].startswith("cache_split") for o in j["output"] if o.endswith(".source.json")]
    assert sorted(r.removesuffix(".source.json") for r in records) == caches  # each with its data-source record
