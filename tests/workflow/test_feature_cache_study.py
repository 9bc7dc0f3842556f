"""The feature cache in the workflow (rule extract_features), on the tiny study (linear + lora).

The plan is checked in the default suite (dry runs, seconds): one features file
per split the linear probe reads, none for LoRA, none when the cache is off or
the frozen features are stochastic (drop_path > 0). The run, and what reruns
after the features are recomputed with the same bytes, are `slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from .smk import REPO, copy_code, run_in_subprocess

CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


def _workdir(tmp_path, **train):
    copy_code(tmp_path)
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["train"].update(train)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def _plan(work):
    """The workflow's planned feature files and the packs that read them, from a Snakefile parse."""
    code = (
        "import json, sys, pathlib; sys.path.insert(0, '.');"
        "from snakemake.api import SnakemakeApi;"
        "from snakemake.settings.types import ConfigSettings, ResourceSettings;"
        "api = SnakemakeApi().__enter__();"
        "wf = api.workflow(resource_settings=ResourceSettings(cores=1),"
        " config_settings=ConfigSettings(configfiles=[pathlib.Path('study.yaml')]), snakefile=pathlib.Path('workflow/Snakefile'));"
        "g = wf._workflow.globals;"
        "print(json.dumps({'features': {p: s.model_dump(mode='json') for p, s in g['FEATURES'].items()},"
        " 'cells': {'/'.join(k): v for k, v in g['CELL_FEATURES'].items()}, 'code': g['METHOD_CODE']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plan_one_file_per_split_the_linear_probe_reads(tmp_path):
    work = _workdir(tmp_path)
    jobs = run_in_subprocess(work, work / "study.yaml", dryrun=True)
    extracted = sorted(out.rsplit("/", 1)[1].split("_")[0] for j in jobs if j["rule"] == "extract_features"
                       for out in j["output"])  # fmt: skip
    assert extracted == ["test", "train800", "train800val200", "val200"]
    plan = _plan(work)
    assert set(plan["cells"]) == {"digits/linear/tune", "digits/linear/final"}  # lora reads images
    tune, final = plan["cells"]["digits/linear/tune"], plan["cells"]["digits/linear/final"]
    assert [plan["features"][p]["split"] for p in tune] == ["train800", "val200"]
    assert [plan["features"][p]["split"] for p in final] == ["train800val200", "test"]
    assert all(p.startswith("results/tiny/features/digits/") for p in tune + final)
    assert {s["precision"] for s in plan["features"].values()} == {"fp32"}
    # editing the feature code reruns the linear probe's cells, and only theirs
    assert "peft_core/features.py" in plan["code"]["linear"] and "peft_core/features.py" not in plan["code"]["lora"]


@pytest.mark.parametrize("train", [{"feature_cache": False}, {"drop_path": 0.1}], ids=["off", "drop-path"])
def test_no_features_when_off_or_stochastic(tmp_path, train):
    work = _workdir(tmp_path, **train)
    jobs = run_in_subprocess(work, work / "study.yaml", dryrun=True)
    assert not any(j["rule"] == "extract_features" for j in jobs)
    assert any(j["rule"] == "train_pack" and "/linear/" in j["output"][0] for j in jobs)


@pytest.mark.slow
def test_run_uses_the_features_and_an_identical_recomputation_reuses_the_cells(tmp_path):
    work = _workdir(tmp_path)
    config = work / "study.yaml"
    jobs = run_in_subprocess(work, config)
    assert sum(j["rule"] == "extract_features" for j in jobs) == 4
    metrics = [json.loads(p.read_text()) for p in sorted((work / "results/tiny/cells/digits").glob("*/*/metrics.json"))]
    linear = [m for m in metrics if m["method"] == "linear"]
    assert len(linear) == 2 and all(m["feature_cache"] for m in linear)  # a tuning and a final cell
    assert all(m["inputs"]["features"]["train"]["path"].startswith("results/tiny/features/digits/") for m in linear)
    assert not any(m["feature_cache"] for m in metrics if m["method"] == "lora")
    assert run_in_subprocess(work, config, dryrun=True) == []

    # train800.txt rewritten with the same split: its cache and features are rebuilt with the same bytes
    # (and val200's and test's, which are checked against it), and the linear cells that read them are reused
    listing = work / "data/tiny/vtab/digits/train800.txt"
    listing.write_text(listing.read_text() + "\n")
    t0 = time.time()
    jobs = run_in_subprocess(work, config)
    assert sorted(out.rsplit("/", 1)[1].split("_")[0] for j in jobs if j["rule"] == "extract_features"
                  for out in j["output"]) == ["test", "train800", "val200"]  # fmt: skip
    cells = sorted((work / "results/tiny/cells/digits/linear").glob("*/metrics.json"))
    assert len(cells) == 2 and [p for p in cells if p.stat().st_mtime > t0] == []
