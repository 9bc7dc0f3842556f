"""Successive halving in the workflow (tuning.strategy: halving), on a miniature LoRA study:
6 configurations, eta 3, budgets 2 -> 6 epochs.

The plan is checked in the default suite (a dry run, seconds): every rung is a planned job,
no checkpoint. The run (`slow`, about a minute): promoted cells resume from their rung-0
state, the selection says how it was made and what it cost, and the same study run as a
grid reuses the finished cells and resumes the others (grid and halving share cells).
Noise-aware promotion (tuning.keep_within_se): the plan's room, the run's promotions and its
cost, as the benchmark's replay computes them.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml

from ..bench_loader import load_benchmark
from .smk import REPO, copy_code, run_in_subprocess

CONFIG = REPO / "tests" / "configs" / "tiny_halving.yaml"
RES = "results/tiny_halving"


def _workdir(tmp_path):
    copy_code(tmp_path)
    shutil.copy(CONFIG, tmp_path / "study.yaml")
    return tmp_path


def _new_packs(before: dict, after: dict) -> list[str]:
    from peft_core.config import load_study
    from peft_core.packs import group_into_packs, pack_id

    ids = lambda cfg: [pack_id(p) for p in group_into_packs(load_study(cfg).tuning_cells("digits", "lora"))]  # noqa: E731
    return [p for p in ids(after) if p not in ids(before)]


def _replayed(work, r0: dict, **noise) -> dict:
    """benchmarks/halving_replay.py's replay of this run from the run's own records (every cell at
    2 epochs, the promoted ones at 6)."""
    mod = load_benchmark("halving_replay")
    from peft_core.packs import rung_record_path
    from peft_core.results import METRICS, read_json

    configs = []
    for row in r0["ranked"]:
        cell = work / row["dir"]
        records = {"2": read_json(rung_record_path(cell, 2))}
        if (cell / METRICS).is_file():
            records["6"] = read_json(cell / METRICS)
        configs.append({"cell": row["cell"], "spec": row["spec"], "records": records})
    return mod.replay(configs, 3, 2, 6, **noise)


def _rules(jobs) -> Counter:
    return Counter(j["rule"] for j in jobs)


def test_plan_has_every_rung_as_a_job(tmp_path):
    work = _workdir(tmp_path)
    jobs = _rules(run_in_subprocess(work, work / "study.yaml", dryrun=True))
    # rung 0: the 3 packs (rank x 2 lr) to 2 epochs; rung 1: the top ceil(6 / 3) = 2 in one chunk
    assert (jobs["train_rung"], jobs["train_promoted"], jobs["rank_rung"]) == (3, 1, 2)
    assert jobs["train_pack"] == 0 and jobs["select_config"] == jobs["train_final"] == 1


def test_plan_of_a_prestep_method_gives_each_promoted_slot_its_own_job(tmp_path):
    """SCT's cells need their own prestep result: a later rung trains one slot per job."""
    copy_code(tmp_path)
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny_prestep.yaml").read_text())
    cfg["methods"] = {"sct": {"channels": [4, 8, 16]}}
    cfg["train"]["epochs"] = 3
    cfg["tuning"] = {"strategy": "halving", "eta": 2, "min_epochs": 1}  # budgets 1, 2, 3; sizes 3, 2, 1
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(tmp_path, tmp_path / "study.yaml", dryrun=True)
    promoted = sorted(o.split("/rungs/digits/sct/")[1] for j in jobs if j["rule"] == "train_promoted" for o in j["output"])
    assert promoted == ["r1/c0.json", "r1/c1.json", "r2/c0.json"]
    assert _rules(jobs)["rank_rung"] == 3 and _rules(jobs)["train_rung"] == 3


def _noise_aware(work, z: float = 1.96) -> None:
    cfg = yaml.safe_load((work / "study.yaml").read_text())
    cfg["tuning"]["keep_within_se"] = z
    (work / "study.yaml").write_text(yaml.safe_dump(cfg))


def test_noise_aware_plan_gives_the_later_rung_room_for_every_configuration(tmp_path):
    work = _workdir(tmp_path)
    _noise_aware(work)
    jobs = run_in_subprocess(work, work / "study.yaml", dryrun=True)
    # rung 1 may take all 6 configurations: 3 chunks of a pack's 2 slots, each reads the ranking at run time
    promoted = sorted(o.split("/rungs/digits/lora/")[1] for j in jobs if j["rule"] == "train_promoted" for o in j["output"])
    assert promoted == ["r1/c0.json", "r1/c1.json", "r1/c2.json"]
    assert _rules(jobs)["rank_rung"] == 2 and _rules(jobs)["train_rung"] == 3


@pytest.mark.slow
def test_noise_aware_run_promotes_what_is_within_noise_and_unused_chunks_train_nothing(tmp_path):
    from peft_core.halving import promotions

    work = _workdir(tmp_path)
    _noise_aware(work)
    run_in_subprocess(work, work / "study.yaml")
    r0, r1 = (json.loads((work / f"{RES}/rungs/digits/lora/r{r}.json").read_text()) for r in (0, 1))
    assert (r0["capacity"], r0["keep_within_se"], r0["n_eval"]) == (6, 1.96, 200)
    # here all 6 tie at 2 epochs, so all continue; a chunk left empty: tests/unit/test_halving.py
    assert r0["promote"] == promotions(r0["ranked"], 6, 3, 1.96, 200) >= 2
    assert [row["cell"] for row in r1["ranked"]] and {row["cell"] for row in r1["ranked"]} == {
        row["cell"] for row in r0["ranked"][: r0["promote"]]}  # fmt: skip
    for c in range(3):  # a chunk past the promoted slots: an empty manifest, nothing trained
        chunk = json.loads((work / f"{RES}/rungs/digits/lora/r1/c{c}.json").read_text())
        assert len(chunk["cells"]) == max(0, min(2, r0["promote"] - 2 * c))
    sel = json.loads((work / f"{RES}/selection/digits/lora.json").read_text())
    assert sel["keep_within_se"] == 1.96 and sel["val_accuracy"] == max(r["accuracy"] for r in r1["ranked"])
    assert sel["selection_images"] == 800 * (6 * 2 + r0["promote"] * 4)
    replayed = _replayed(work, r0, keep_within_se=1.96, n_eval=200)
    assert (replayed["chosen"], replayed["images"]) == (sel["chosen"], sel["selection_images"])
    assert "| halving, keep_within_se=1.96 |" in (work / "reports/tiny_halving/summary.md").read_text()
    assert run_in_subprocess(work, work / "study.yaml", dryrun=True) == []


@pytest.mark.slow
def test_run_promotes_resumes_and_shares_cells_with_the_grid(tmp_path):
    work = _workdir(tmp_path)
    config = work / "study.yaml"
    run_in_subprocess(work, config)
    r0, r1 = (json.loads((work / f"{RES}/rungs/digits/lora/r{r}.json").read_text()) for r in (0, 1))
    assert (len(r0["ranked"]), r0["promote"], r0["epochs"]) == (6, 2, 2)
    assert [row["cell"] for row in r1["ranked"]] and {row["cell"] for row in r1["ranked"]} == {
        row["cell"] for row in r0["ranked"][:2]}  # fmt: skip
    keys = [(-row["accuracy"], row["cell"]) for row in r0["ranked"]]
    assert keys == sorted(keys)  # validation accuracy, ties by cell id
    log = (work / "logs/tiny_halving/train_promoted/digits/lora/r1/c0.log").read_text()
    assert log.count("resumed from") == 2 and "at epoch 3" in log
    sel = json.loads((work / f"{RES}/selection/digits/lora.json").read_text())
    assert sel["strategy"] == "halving" and sel["selected_on"] == "val200"
    assert sel["chosen"] in {r["cell"] for r in r1["ranked"]}  # the best of the last rung
    assert sel["val_accuracy"] == max(r["accuracy"] for r in r1["ranked"])
    assert [(r["epochs"], r["configurations"]) for r in sel["rungs"]] == [(2, 6), (6, 2)]
    assert sel["selection_images"] == 800 * (6 * 2 + 2 * 4)  # rung 0: 6 x 2 epochs; rung 1: 2 x 4 more
    replayed = _replayed(work, r0)  # the benchmark's replay makes the workflow's choice at its cost
    assert (replayed["chosen"], replayed["images"]) == (sel["chosen"], sel["selection_images"])
    summary = (work / "reports/tiny_halving/summary.md").read_text()
    assert "| halving |" in summary
    assert run_in_subprocess(work, config, dryrun=True) == []

    cfg = yaml.safe_load(config.read_text())
    edited = {**cfg, "methods": {"lora": {"rank": [1, 2, 4, 8]}}}  # a new configuration: one new rung-0 pack
    config.write_text(yaml.safe_dump(edited))
    jobs = run_in_subprocess(work, config, dryrun=True)
    assert [o for j in jobs if j["rule"] == "train_rung" for o in j["output"]] == [
        f"{RES}/rungs/digits/lora/r0/{p}.json" for p in _new_packs(cfg, edited)]  # fmt: skip
    assert _rules(jobs)["train_promoted"] == 2  # ceil(8 / 3) = 3 promoted, in chunks of a pack's 2
    del cfg["tuning"]  # the same study as a grid: the same cells
    config.write_text(yaml.safe_dump(cfg))
    jobs = _rules(run_in_subprocess(work, config))
    assert jobs["train_pack"] == 3 and jobs["train_rung"] == 0
    logs = "".join(p.read_text() for p in (work / "logs/tiny_halving/train_pack").rglob("*.log"))
    assert logs.count("reused (same spec") == 2 and logs.count("resumed from") == 4
    sel = json.loads((work / f"{RES}/selection/digits/lora.json").read_text())
    assert sel["strategy"] == "grid" and sel["selection_images"] == 800 * 6 * 6
