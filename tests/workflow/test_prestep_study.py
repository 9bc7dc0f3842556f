"""The prestep stage in the workflow (rule run_prestep), on a miniature SCT + GPS study.

The plan is checked in the default suite (a dry run, seconds): one result per
(split, settings the step depends on), read from the training split only. The
run itself, and what reruns after results are recomputed, are `slow`.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from .smk import REPO, copy_code, run_in_subprocess

CONFIG = REPO / "tests" / "configs" / "tiny_prestep.yaml"


def _workdir(tmp_path):
    copy_code(tmp_path)
    shutil.copy(CONFIG, tmp_path / "study.yaml")
    return tmp_path


def _snakefile_globals(work):
    """The workflow's planned presteps, from a Snakefile parse in this process."""
    import subprocess
    import sys

    code = (
        "import json, sys; sys.path.insert(0, '.');"
        "from snakemake.api import SnakemakeApi;"
        "from snakemake.settings.types import ConfigSettings, ResourceSettings;"
        "api = SnakemakeApi().__enter__();"
        "wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(configfiles=[__import__('pathlib').Path('study.yaml')]),"
        " snakefile=__import__('pathlib').Path('workflow/Snakefile'));"
        "g = wf._workflow.globals;"
        "print(json.dumps({'presteps': {p: s.model_dump(mode='json') for p, s in g['PRESTEPS'].items()},"
        " 'finals': {'/'.join(k): v for k, v in g['FINAL_PRESTEPS'].items()}, 'code': g['METHOD_CODE']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plan_one_result_per_split_and_settings_from_training_data_only(tmp_path):
    work = _workdir(tmp_path)
    jobs = run_in_subprocess(work, work / "study.yaml", dryrun=True)
    presteps = [j for j in jobs if j["rule"] == "run_prestep"]
    # sct: 2 channel settings x (train800 for tuning, train800val200 for the final runs); gps: 1 x 2;
    # noah: one search on (train800, val200), shared by its tuning cells and its final runs
    assert len(presteps) == 7
    plan = _snakefile_globals(work)
    specs = [s for s in plan["presteps"].values() if s["method"] != "noah"]
    assert {s["train_split"] for s in specs} == {"train800", "train800val200"}
    assert all(s["eval_split"] is None for s in specs)  # SCT and GPS never read validation or test
    (noah,) = [(p, s) for p, s in plan["presteps"].items() if s["method"] == "noah"]
    assert (noah[1]["train_split"], noah[1]["eval_split"]) == ("train800", "val200")  # never test
    assert plan["finals"]["digits/noah"] == [noah[0]]
    # editing the prestep engine reruns the data-dependent methods' cells (and only theirs)
    assert all("peft_core/prestep.py" in files for files in plan["code"].values())
    assert {json.dumps(s["hparams"], sort_keys=True) for s in specs if s["method"] == "sct"} == {
        '{"channels": 4}', '{"channels": 8}'}  # fmt: skip
    # a final run gets the result of every configuration on its own split, and picks the chosen one
    assert len(plan["finals"]["digits/sct"]) == 2
    assert all(plan["presteps"][p]["train_split"] == "train800val200" for p in plan["finals"]["digits/sct"])


@pytest.mark.slow
def test_run_records_results_and_an_identical_recomputation_reuses_the_cells(tmp_path):
    work = _workdir(tmp_path)
    config = work / "study.yaml"
    jobs = run_in_subprocess(work, config)
    assert sum(j["rule"] == "run_prestep" for j in jobs) == 7
    cells = sorted((work / "results/tiny_prestep/cells").glob("digits/*/*/metrics.json"))
    assert len(cells) == 7  # 4 tuning + 3 final
    for m in map(lambda p: json.loads(p.read_text()), cells):
        assert m["inputs"]["prestep"]["path"].startswith("results/tiny_prestep/prestep/digits/")
    assert run_in_subprocess(work, config, dryrun=True) == []

    # train800.txt rewritten with the same split: its cache is rebuilt, every result read from it is
    # recomputed (sct x 2, gps, noah), and every cell is reused: the results have the same bytes
    listing = work / "data/tiny/vtab/digits/train800.txt"
    listing.write_text(listing.read_text() + "\n")
    t0 = time.time()
    jobs = run_in_subprocess(work, config)
    assert sum(j["rule"] == "run_prestep" for j in jobs) == 4
    retrained = [p for p in cells if p.stat().st_mtime > t0]
    assert retrained == []  # the recomputed results have the same bytes: their cells are reused
