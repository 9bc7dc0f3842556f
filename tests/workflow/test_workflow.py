"""The workflow end to end on a miniature study, through ``snakemake.api``.

One module-scoped run (about half a minute on 2 cores), in a workdir with its
own copy of the code, feeds every test: report produced, unchanged rerun
schedules nothing, a grid edit or a method-file edit schedules only that
method's cells, an engine edit every cell, and the HTML report as a browser
shows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from peft_core.config import load_study
from peft_core.packs import CELL_FILES, group_into_packs, pack_id

from .smk import REPO, copy_code, run_in_subprocess

TINY = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tiny_study")
    copy_code(work)
    config = work / "tiny.yaml"
    shutil.copy(TINY, config)
    jobs = run_in_subprocess(work, config)
    return {"work": work, "config": config, "jobs": jobs, "report": work / "reports" / "tiny"}


def rules(jobs: list[dict]) -> list[str]:
    return sorted(j["rule"] for j in jobs)


def test_first_run_schedules_every_stage(study):
    names = rules(study["jobs"])
    # 1 linear + 2 lora tuning packs (one lr x wd cell each here), then each method's final runs
    assert names.count("train_pack") == 3 and names.count("train_final") == 2
    assert {"make_demo_data", "pretrain_demo_backbone", "cache_split", "select_config", "build_report", "analyse_ensembles"} <= set(names)
    assert {"make_demo_shift", "cache_ood", "robustness", "robustness_report"} <= set(names)


def test_report_files_and_tables(study):
    report = study["report"]
    for name in ("summary.md", "summary.csv", "results.parquet", "index.html"):
        assert (report / name).stat().st_size > 0, name
    results = pd.read_parquet(report / "results.parquet")
    assert set(results["method"]) == {"linear", "lora"}
    tuning = results[results["stage"] == "tune"]
    final = results[results["stage"] == "final"]
    assert set(tuning["eval_split"]) == {"val200"} and set(tuning["train_split"]) == {"train800"}
    assert set(final["eval_split"]) == {"test"} and set(final["train_split"]) == {"train800val200"}
    assert len(tuning) == 3 and len(final) == 2
    # what computed each row: its method's code stamp (the same for all of a method's cells), torch
    import torch

    from peft_core.packs import read_code_stamp

    for method, rows in results.groupby("method"):
        assert set(rows.code_stamp) == {read_code_stamp(study["work"] / f"results/tiny/code/{method}.sha256")}
    assert set(results.torch) == {torch.__version__} and not results.batched.any()
    assert list(results.feature_cache) == [m == "linear" for m in results.method]
    summary = (report / "summary.md").read_text()
    assert f"Computed with torch {torch.__version__}" in summary
    assert "| linear" in summary and "| lora" in summary and "PPT" in summary
    # paper-ready files beside the HTML
    for name in ("tables/accuracy.tex", "tables/tables.tex", "figures/cd_all.pdf", "figures/accuracy_params.svg",
                 "stats/accuracy_ci.csv", "stats/pairwise.csv", "figures/ensemble_gain.png",
                 "figures/wise_digits_digits_colour.pdf"):  # fmt: skip
        assert (report / name).stat().st_size > 0, name
    ci = pd.read_csv(report / "stats" / "accuracy_ci.csv")
    assert set(ci.method) == {"linear", "lora"} and (ci.ci_low <= ci["mean"]).all() and (ci["mean"] <= ci.ci_high).all()


def test_ensembles_report(study):
    report = study["report"]
    for name in ("ensembles.md", "ensembles.html", "ensembles.parquet", "diversity.parquet"):
        assert (report / name).stat().st_size > 0, name
    rows = pd.read_parquet(report / "ensembles.parquet")
    assert set(rows.loc[rows.stage == "tune", "split"]) == {"val200"}
    assert set(rows.loc[rows.stage == "final", "split"]) == {"test"} and set(rows.seed) == {0}
    assert set(pd.read_parquet(report / "diversity.parquet").method_b) == {"lora"}
    assert "<script" not in (report / "ensembles.html").read_text().lower()


def test_robustness_report(study):
    report = study["report"]
    rows = pd.read_parquet(report / "robustness.parquet")
    # one final run per method; both merge: every alpha on the ID test split and the shifted set
    assert set(rows.method) == {"linear", "lora"} and set(rows.alpha) == {0.0, 0.5, 1.0}
    assert set(zip(rows.eval_set, rows.distribution, rows.split)) == {("id", "id", "test"), ("digits_colour", "ood", "test")}
    final = pd.read_parquet(report / "results.parquet").query("stage == 'final'").set_index("cell")
    assert len(rows) == 2 * 3 * 2 and set(rows.n_eval) == set(final.n_eval)  # the shift keeps every test image
    # alpha = 1 on the ID test split is the final run itself
    for r in rows[(rows.alpha == 1.0) & (rows.eval_set == "id")].itertuples():
        assert abs(r.accuracy - final.accuracy[r.cell]) <= 1 / r.n_eval, r
    md = (report / "robustness.md").read_text()
    assert "digits_colour" in md and "| lora" in md
    assert "<script" not in (report / "robustness.html").read_text().lower()


def test_unchanged_rerun_schedules_zero_jobs(study):
    assert run_in_subprocess(study["work"], study["config"], dryrun=True) == []


def test_grid_edit_schedules_only_that_methods_cells(study, tmp_path):
    cfg = yaml.safe_load(study["config"].read_text())
    cfg["methods"]["lora"]["rank"] = [1, 2, 4]
    edited = tmp_path / "tiny.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(study["work"], edited, dryrun=True)
    trained = [j for j in jobs if j["rule"] == "train_pack"]
    assert len(trained) == 1, trained  # the new rank-4 tuning pack
    assert all("/lora/" in out for j in trained for out in j["output"])
    assert {j["rule"] for j in jobs} <= {"train_pack", "select_config", "train_final", "aggregate_dataset", "build_report",
                                        "analyse_ensembles", "all", "robustness", "robustness_report"}  # fmt: skip
    # lora's final runs follow its new selection (their cells are reused if the choice is the same)
    assert [j["output"][0].split("/")[-1] for j in jobs if j["rule"] == "train_final"] == ["lora.json"]
    selections = [out for j in jobs if j["rule"] == "select_config" for out in j["output"]]
    assert selections and all(out.endswith("/lora.json") for out in selections)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def open_offline(browser, path):
    """A page of ``path``, asserted to load with no console error and no request beyond itself."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console, requests = [], []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    url = path.resolve().as_uri()
    page.goto(url)
    assert [m for m in console if m.startswith(("error", "pageerror"))] == []
    assert requests == [url], f"the report made network requests: {requests[1:]}"
    return page


def test_html_report_in_headless_browser(study, browser, tmp_path):
    page = open_offline(browser, study["report"] / "index.html")
    assert "tiny" in page.title()
    assert page.locator("table").count() >= 2
    # the report's figures are inlined (no request) and linked as files beside the page
    for label in ("accuracy params", "rank heatmap", "sensitivity", "cd all", "cd natural"):
        fig = page.locator(f'figure[aria-label="{label}"]')
        assert fig.count() == 1 and fig.locator("svg").count() == 1, label
        assert fig.locator("svg").bounding_box()["width"] > 200, label
    for href in page.locator("figure a").evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        assert (study["report"] / href).is_file(), href
    assert "Cost per method" in page.inner_text("body") and "What changed" in page.inner_text("body")
    text = page.inner_text("body")
    assert "linear" in text and "lora" in text and "PPT" in text
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    page.close()


def test_robustness_html_in_headless_browser(study, browser, tmp_path):
    page = open_offline(browser, study["report"] / "robustness.html")
    assert "robustness" in page.title()
    fig = page.locator('figure[aria-label="digits ID vs digits_colour"]')  # the ID-vs-OOD curves, inlined
    assert fig.count() == 1 and fig.locator("svg").count() == 1
    assert page.locator("table").count() >= 1
    text = page.inner_text("body")
    assert "digits_colour" in text and "linear" in text and "lora" in text
    page.screenshot(path=str(tmp_path / "robustness.png"), full_page=True)
    page.close()


def test_missing_shifted_set_fails_before_any_job(study, tmp_path):
    cfg = yaml.safe_load(study["config"].read_text())
    cfg["datasets"]["digits"]["ood"]["sketch"] = {"root": "no/such/folder", "layout": "imagefolder", "split": "test"}
    edited = tmp_path / "tiny.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    with pytest.raises(AssertionError, match=r"invalid config: datasets\.digits\.ood\.sketch\.root: no/such/folder/test not found"):
        run_in_subprocess(study["work"], edited, dryrun=True)


@pytest.fixture
def touched(study):
    """Edit a code file of the study's copy (a comment line); restore it after.

    Snakemake compares checksums of small inputs, so a bare `touch` reruns
    nothing; a real edit does.
    """
    changed = []

    def touch(relative: str) -> None:
        path = study["work"] / relative
        stat, text = path.stat(), path.read_text()
        changed.append((path, text, stat.st_atime, stat.st_mtime))
        path.write_text(text + "\n# edited by a test\n")

    yield touch
    for path, text, atime, mtime in changed:
        path.write_text(text)
        os.utime(path, (atime, mtime))


def trained_methods(jobs: list[dict]) -> set[str]:
    """Methods of the scheduled tuning packs (.../packs/<dataset>/<method>/<pack>.json)."""
    return {out.split("/")[-2] for j in jobs if j["rule"] == "train_pack" for out in j["output"][:1]}


def final_methods(jobs: list[dict]) -> set[str]:
    """Methods of the scheduled final runs (.../finals/<dataset>/<method>.json)."""
    return {Path(j["output"][0]).stem for j in jobs if j["rule"] == "train_final"}


def test_editing_a_method_file_reruns_only_its_cells(study, touched):
    touched("peft_core/methods/lora.py")
    jobs = run_in_subprocess(study["work"], study["config"], dryrun=True)
    assert trained_methods(jobs) == {"lora"} and final_methods(jobs) == {"lora"}
    assert sum(j["rule"] == "train_pack" for j in jobs) == 2  # its 2 tuning packs


def test_editing_a_private_method_helper_reruns_its_users(study, touched):
    touched("peft_core/methods/_targets.py")  # imported by lora, not by linear
    jobs = run_in_subprocess(study["work"], study["config"], dryrun=True)
    assert trained_methods(jobs) == {"lora"}


def test_editing_engine_code_reruns_every_cell(study, touched):
    touched("peft_core/train.py")
    jobs = run_in_subprocess(study["work"], study["config"], dryrun=True)
    assert trained_methods(jobs) == final_methods(jobs) == {"linear", "lora"}
    assert sum(j["rule"] == "train_pack" for j in jobs) == 3  # every tuning pack


def test_new_dataset_schedules_only_its_cells(study, tmp_path):
    cfg = yaml.safe_load(study["config"].read_text())
    cfg["datasets"]["cells"] = {"num_classes": 4, "group": "specialized"}
    edited = tmp_path / "tiny.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(study["work"], edited, dryrun=True)
    trained = [j["output"][0] for j in jobs if j["rule"] == "train_pack"]
    assert len(trained) == 3 and all(out.split("/")[-3] == "cells" for out in trained)
    assert not any(j["rule"] == "pretrain_demo_backbone" for j in jobs)
    made = [out for j in jobs if j["rule"] in ("make_demo_data", "cache_split") for out in j["output"]]
    assert made and all("/cells/" in out for out in made)


def copy_study(study: dict, dest) -> tuple:
    """A private copy of the finished tiny study (code, data, results, Snakemake metadata)."""
    work = dest / "work"
    shutil.copytree(study["work"], work, symlinks=True)
    return work, yaml.safe_load(study["config"].read_text())


def manifests(work, method: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work / "results/tiny/packs/digits" / method).glob("*.json"))]


def test_adding_a_learning_rate_trains_only_the_new_cells(study, tmp_path):
    work, cfg = copy_study(study, tmp_path)
    before = {c["cell"] for m in manifests(work, "lora") for c in m["cells"]}
    cfg["methods"]["lora"]["lr"] = [0.01, 0.002]
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(work, work / "tiny.yaml")
    assert sum(j["rule"] == "train_pack" for j in jobs) == 2  # lora's two configurations, as new packs
    current = [m for m in manifests(work, "lora") if len(m["cells"]) == 2]
    assert len(current) == 2
    cells = [c for m in current for c in m["cells"]]
    assert {c["cell"] for c in cells if c["reused"]} == before  # the lr=0.01 cells were not retrained
    assert sum(not c["reused"] for c in cells) == 2  # only the two lr=0.002 cells trained


def live_processes_in(work) -> list[int]:
    """Processes whose working directory is inside ``work`` (e.g. orphaned cells)."""
    pids = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and os.readlink(f"/proc/{proc}/cwd").startswith(str(work)):
                pids.append(int(proc))
        except OSError:
            pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def new_packs(config: Path) -> list[dict]:
    """The tuning packs of ``config``: their cells, log and manifest paths (relative to the workdir)."""
    study = load_study(config)
    packs = []
    for method in study.method_names():
        for cells in group_into_packs(study.tuning_cells("digits", method)):
            pid = pack_id(cells)
            packs.append({"cells": [f"results/tiny/cells/digits/{method}/{c.cell_id}" for c in cells],
                          "log": f"logs/tiny/train_pack/digits/{method}/{pid}.log",
                          "manifest": f"results/tiny/packs/digits/{method}/{pid}.json"})  # fmt: skip
    return packs


def test_kill_9_mid_cell_leaves_nothing_complete_and_the_rerun_finishes(study, tmp_path):
    work, cfg = copy_study(study, tmp_path)
    cfg["train"]["epochs"] = 60  # every cell is new and long enough to be caught mid-training
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    packs = new_packs(work / "tiny.yaml")
    assert len(packs) == 3 and not any((work / p["manifest"]).exists() for p in packs)
    cmd = [sys.executable, str(REPO / "tests/workflow/smk.py"), str(work), str(work / "tiny.yaml")]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def log_of(p: dict) -> str:
        return (work / p["log"]).read_text() if (work / p["log"]).is_file() else ""

    def last_epoch(p: dict) -> int:
        return ([0] + [int(k) for k in re.findall(r"^epoch (\d+)/60 ", log_of(p), re.M)])[-1]

    # The state to interrupt: one pack finished (its cell complete, its manifest written) while
    # another is mid-training (past its first epoch, not at its last).
    deadline = time.monotonic() + 600
    while not (any((work / p["manifest"]).is_file() for p in packs) and any(2 <= last_epoch(p) < 60 for p in packs)):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # the run may have ended by itself
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("no pack finished while another was mid-training:\n" + "\n".join(log_of(p)[-500:] for p in packs))
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the fork server (its own session) sees its parent gone at its next 2 s poll; a forked cell, its client at once
    deadline = time.monotonic() + 30
    while live_processes_in(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: _cmdline(pid) for pid in live_processes_in(work)}
    assert left == {}, f"processes outlived the killed Snakemake by 30 s: {left}"

    finished = [p for p in packs if (work / p["manifest"]).is_file()]
    interrupted = [p for p in packs if 0 < last_epoch(p) < 60]  # one cell a pack here: killed mid-training
    assert finished and interrupted, ([p["log"] for p in finished], [p["log"] for p in interrupted])
    # a manifest exists only once every cell of its pack is complete; a cell killed mid-training has no outputs
    for p in finished:
        assert all((work / c / name).is_file() for c in p["cells"] for name in CELL_FILES), p
    for p in interrupted:
        assert not any((work / c / name).exists() for c in p["cells"] for name in CELL_FILES), p
    # and a cell with a metrics.json is complete (one that finished as its pack was cut off counts too)
    done = [c for p in packs for c in p["cells"] if (work / c / "metrics.json").is_file()]
    assert all((work / c / name).is_file() for c in done for name in CELL_FILES)
    stamps = {c: (work / c / "metrics.json").stat().st_mtime_ns for c in done}

    # then the user's `snakemake --unlock` and the same command (the profiles set rerun-incomplete: a job
    # Snakemake was killed before recording, e.g. a pack that had just written its manifest, runs again)
    run_in_subprocess(work, work / "tiny.yaml", unlock=True)
    pending = run_in_subprocess(work, work / "tiny.yaml", dryrun=True, rerun_incomplete=True)
    rerun = {out for j in pending if j["rule"] == "train_pack" for out in j["output"]}
    assert {p["manifest"] for p in packs if p not in finished} <= rerun, pending

    run_in_subprocess(work, work / "tiny.yaml", rerun_incomplete=True)
    results = pd.read_parquet(work / "reports/tiny/results.parquet")
    assert len(results) == 5 and results["cell"].is_unique  # 3 tuning + 2 final cells, none lost or doubled
    assert {c: (work / c / "metrics.json").stat().st_mtime_ns for c in stamps} == stamps  # finished cells kept
    for p in packs:  # a rerun pack reused every cell that had finished, and trained the rest
        if p["manifest"] in rerun:
            rows = json.loads((work / p["manifest"]).read_text())["cells"]
            assert [r["reused"] for r in rows] == [c in stamps for c in p["cells"]], (p, rows)
    assert all((work / c / "metrics.json").is_file() for p in packs for c in p["cells"])
    assert run_in_subprocess(work, work / "tiny.yaml", dryrun=True) == []


def test_snakemake_report_zip(study):
    import subprocess
    import sys
    import zipfile

    work = study["work"]
    env = dict(os.environ, PYTHONPATH=str(work))
    cmd = [sys.executable, "-m", "snakemake", "-s", "workflow/Snakefile", "--configfile", "tiny.yaml"]
    out = subprocess.run(cmd + ["--report", "report.zip"], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    names = zipfile.ZipFile(work / "report.zip").namelist()
    assert any(n.endswith("summary.md") for n in names) and any(n.endswith("index.html") for n in names)
    assert any(n.endswith("robustness.md") for n in names) and any(n.endswith("robustness.html") for n in names)


def cells_trained(work, since: float) -> dict[str, str]:
    """cell id -> why it trained, for every cell whose metrics.json was written after ``since``."""
    out = {}
    manifests = [*(work / "results/tiny/packs/digits").glob("*/*.json"), *(work / "results/tiny/finals/digits").glob("*.json")]
    for pack in manifests:
        if pack.stat().st_mtime < since:
            continue
        for c in json.loads(pack.read_text())["cells"]:
            if not c["reused"]:
                out[c["cell"]] = c.get("trained_because")
    return out


def test_cells_follow_the_content_of_splits_and_checkpoint(study, tmp_path):
    """A split file edited without changing the split: its cache is rebuilt, nothing retrains. One label of val200 changed:
    exactly the cells evaluated on val200 retrain. Other weights at the same checkpoint
    path: every cell. (A bare `touch` of a split file reruns nothing at all: Snakemake
    compares checksums of small inputs.)"""
    work, _ = copy_study(study, tmp_path)
    config = work / "tiny.yaml"
    tuning = {c["cell"] for m in ("linear", "lora") for p in manifests(work, m) for c in p["cells"]}
    val200 = work / "data/tiny/vtab/digits/val200.txt"

    os.utime(val200)
    assert run_in_subprocess(work, config, dryrun=True) == []
    t0 = time.time()
    val200.write_text(val200.read_text() + "\n")  # a new file to Snakemake, the same split to us
    jobs = run_in_subprocess(work, config)
    # val200's cache is rebuilt (and test's, which is checked against val200), every pack
    # and final run reruns, and every cell is reused: the caches' content did not change
    assert rules(jobs).count("cache_split") == 2 and rules(jobs).count("train_pack") == 3
    assert cells_trained(work, t0) == {}

    t0 = time.time()
    lines = val200.read_text().splitlines()
    path, label = lines[0].rsplit(" ", 1)
    lines[0] = f"{path} {(int(label) + 1) % 10}"
    val200.write_text("\n".join(lines) + "\n")
    run_in_subprocess(work, config)
    trained = cells_trained(work, t0)
    assert set(trained) >= tuning and all(trained[c] == "val200 changed" for c in tuning)
    finals = set(trained) - tuning  # the final runs read train800val200 and test: reused unless the choice changed
    linear_final = json.loads((work / "results/tiny/finals/digits/linear.json").read_text())["cells"]
    assert all(c["reused"] for c in linear_final)  # linear has one configuration: same choice, same cells
    assert all(trained[c] == "not trained yet" for c in finals)

    t0 = time.time()
    ckpt = work / "results/tiny/backbone/vit_tiny_upstream.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # other weights at the same path
    save_file(weights, str(ckpt))
    run_in_subprocess(work, config)
    trained = cells_trained(work, t0)
    assert len(trained) == 5 and set(trained.values()) == {"checkpoint changed"}


def test_paths_with_spaces_and_shell_characters_are_used_literally(tmp_path):
    """Every config-derived path reaches the shell quoted: `;` and `$()` in a path are just characters."""
    work = tmp_path / "my runs; $(touch INJECTED) `touch INJECTED2`"
    work.mkdir()
    copy_code(work)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["root"] = "data/my data; $(touch INJECTED3)/vtab"
    cfg["backbone"]["checkpoint"] = "results/tiny/back bone/ckpt $(x).safetensors"
    cfg["datasets"]["digits"].pop("ood")
    cfg.pop("robustness")
    cfg["methods"] = {"linear": {}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run_in_subprocess(work, work / "tiny.yaml")
    assert (work / "reports/tiny/summary.md").is_file()
    assert (work / "data/my data; $(touch INJECTED3)/vtab/digits/test.txt").is_file()
    assert not [p for p in tmp_path.rglob("INJECTED*")], "a path was run as a shell command"
    assert not list(Path.cwd().glob("INJECTED*"))


# Timing-sensitive (pauses and resumes real jobs): it failed once in five runs under a
# loaded 2-core machine, cause not yet found; run it with `pytest -m slow`.
@pytest.mark.slow
def test_rerun_beside_a_surviving_job_never_writes_a_cell_twice(study, tmp_path):
    """Kill Snakemake alone (its jobs survive), unlock, rerun: the rerun waits for the
    surviving job's cell and reuses it instead of training it again.

    The survivors are paused (SIGSTOP) until the rerun's job has reached the cell, so the
    two jobs overlap on every machine, however fast; then they go on (SIGCONT)."""
    work, cfg = copy_study(study, tmp_path)
    cfg["train"]["epochs"] = 120  # every cell is new, and still training while the survivors are paused
    cfg["methods"] = {"linear": {}}  # one pack, one final run
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "tests/workflow/smk.py"), str(work), str(work / "tiny.yaml")]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs = work / "logs/tiny/train_pack"
    deadline, cell, log = time.monotonic() + 300, None, None
    while cell is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no cell reached epoch 2"
        for path in (p for p in logs.rglob("*.log") if p.is_file()):
            text = path.read_text()
            if "epoch 2/120" in text:
                line = next(x for x in text.splitlines() if ": training (" in x)
                cell, log = work / "results/tiny/cells" / line.split(":")[0], path
        time.sleep(0.05)
    proc.kill()  # Snakemake only: its jobs keep running
    proc.wait()
    survivors = set(live_processes_in(work))
    assert survivors, "the jobs did not survive Snakemake"
    for pid in survivors:
        os.kill(pid, signal.SIGSTOP)
    assert not (cell / "metrics.json").exists()

    seen: set[tuple[int, int]] = set()
    try:
        run_in_subprocess(work, work / "tiny.yaml", unlock=True)
        rerun = subprocess.Popen(cmd + ["--rerun-incomplete"], cwd=work, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while "another job is writing this cell; waiting for it" not in log.read_text(errors="replace"):
            assert rerun.poll() is None and time.monotonic() < deadline, "the rerun did not wait for the cell"
            time.sleep(0.1)
    finally:
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    while rerun.poll() is None:  # every version of the cell's metrics.json that ever appears
        try:
            st = (cell / "metrics.json").stat()
            seen.add((st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    assert rerun.returncode == 0
    metrics = json.loads((cell / "metrics.json").read_text())
    assert len(seen) == 1, "the cell was written twice"
    assert metrics["pid"] in survivors  # written by the job that survived, not by the rerun
    assert f"{cell.parent.parent.name}/{cell.parent.name}/{cell.name}: reused" in log.read_text(errors="replace")
    deadline = time.monotonic() + 120
    while live_processes_in(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    results = pd.read_parquet(work / "reports/tiny/results.parquet")
    assert len(results) == 2 and results["cell"].is_unique  # 1 tuning + 1 final cell
