"""Provenance on every number: the data-source record beside each cache, in each cell and row, and the report's warnings."""

from __future__ import annotations

import json

import pandas as pd

from peft_core.cli import main
from peft_core.fingerprint import cell_inputs
from peft_core.provenance import provenance_summary, provenance_text, read_source, row_columns, source_record

from .test_manyshot_prepare import _fabricate


def test_cache_writes_its_record_and_a_cell_carries_it(tmp_path):
    root = _fabricate(tmp_path / "raw")
    manifest = root / "toy" / "manifest.json"
    manifest.write_text(json.dumps({"format": "peft-core manyshot v1"}))
    out = tmp_path / "train_8px_bicubic.safetensors"
    assert main(["cache", "--root", str(root), "--dataset", "toy", "--split", "train", "--layout", "csv",
                 "--size", "8", "--num-classes", "3", "--out", str(out)]) == 0  # fmt: skip
    rec = read_source(out)
    assert rec == source_record(root / "toy" / "train.csv", "csv", 8, "bicubic")
    assert rec["source_format"] == "peft-core manyshot v1" and len(rec["manifest_sha256"]) == 64
    inputs = cell_inputs("train", out, "train", out, None)
    cols = row_columns(inputs)
    assert cols["train_listing_sha256"] == rec["listing_sha256"] and cols["eval_manifest_sha256"] == rec["manifest_sha256"]
    manifest.unlink()  # no preparation manifest: said so, not guessed
    assert source_record(root / "toy" / "train.csv", "csv", 8, "bicubic")["source_format"] == "csv listing, no preparation manifest"


def _rows(**over):
    base = {"stage": "final", "dataset": "a", "method": "lora", "checkpoint_sha256": "c" * 64, "normalize": "none",
            "image_size": 224, "interpolation": "bicubic", "eval_sha256": "e", "train_sha256": "t",
            "train_source_format": "peft-core manyshot v1", "eval_source_format": "peft-core manyshot v1",
            "train_listing_sha256": "l1", "eval_listing_sha256": "l2", "train_manifest_sha256": "m1",
            "eval_manifest_sha256": "m1", "code_stamp": "0123456789abcdef", "torch": "2.14.1",
            "peft_core": "0.1.0"}  # fmt: skip
    return {**base, **over}


def test_one_table_from_one_data_source_has_no_warning():
    info = provenance_summary(pd.DataFrame([_rows(), _rows(method="bitfit")]))
    assert info["warnings"] == []
    text = provenance_text(info)
    assert "peft-core manyshot v1" in text and "cccccccccccc" in text and "224 px" in text
    assert "torch 2.14.1 and peft-core 0.1.0" in text and "code stamp" in text


def test_a_method_whose_rows_come_from_two_code_versions_is_warned():
    """One method's final rows trained by different code (some cells kept from before an edit), or
    rows of different torch versions, are said in the header; methods' own stamps differing is normal."""
    frame = pd.DataFrame([_rows(), _rows(dataset="b", code_stamp="fedcba9876543210", torch="2.4.0"),
                          _rows(method="bitfit", code_stamp="aaaaaaaaaaaaaaaa"), _rows(method="ssf", code_stamp=None)])  # fmt: skip
    warnings = provenance_summary(frame)["warnings"]
    assert "lora: final rows from 2 different code stamps (0123456789abcdef, fedcba9876543210)" in warnings
    assert "rows computed with different torch versions: 2.14.1, 2.4.0" in warnings
    assert "1 final rows carry no code stamp (cells trained before it was recorded)" in warnings
    assert not any(w.startswith(("bitfit", "ssf")) for w in warnings)


def test_mixed_manifests_checkpoints_and_unrecorded_rows_are_warned():
    frame = pd.DataFrame([_rows(), _rows(method="bitfit", eval_manifest_sha256="m2", checkpoint_sha256="d" * 64),
                          _rows(dataset="b", eval_listing_sha256=None)])  # fmt: skip
    warnings = provenance_summary(frame)["warnings"]
    assert any("2 different backbone checkpoints" in w for w in warnings)
    assert any(w == "a: final rows from 2 different eval data manifests" for w in warnings)
    assert any("1 final rows carry no data-source record" in w for w in warnings)


def test_hparams_shared_by_name_with_other_types_still_write_parquet(tmp_path):
    """LAST's `heads: 1` beside HST's `heads: [1, 2]` in one results table (found on the demo)."""
    from peft_core.report import uniform_hparams
    from peft_core.results import write_parquet

    frame = uniform_hparams(pd.DataFrame({"hp_heads": [1, "[1, 2]", None], "hp_rank": [2, 4, None]}))
    write_parquet(tmp_path / "t.parquet", frame)
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert list(back.hp_heads[:2]) == ["1", "[1, 2]"] and back.hp_heads.isna()[2] and back.hp_rank.tolist()[:2] == [2, 4]
