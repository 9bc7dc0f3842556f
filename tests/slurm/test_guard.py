"""``peft-core slurm-run`` on the real test cluster: no silent hang, no false success (issue 23).

Run with ``bash tests/slurm/start_cluster.sh && pytest -m slurm -k guard``. The
node has 2 CPUs; each run starts from a local run's data, backbone and cached
splits (``--until cache_split pretrain_demo_backbone``, ~45 s once per module)
and is bounded by ``timeout -s INT`` so that no test can hang.

* a group job asking for 4 CPUs / 8 GB (two tuning packs of 2 threads and
  4000 MB, within the profile's caps of 8 CPUs / 32 GB) would stay PENDING
  (PartitionConfig) forever: slurm-run clamps the caps to the node and the
  packs complete;
* a job asking for what no node holds (2 tasks x 2 CPUs, set per rule, past
  the caps) ends the run within two minutes with its id and reason;
* a target that cannot be produced (sbatch refuses its job): non-zero, and
  the missing target named.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .test_slurm import REPO, TINY, _env, _sacct, _sh, _submitted, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm

LIMIT_S = 170  # every run here, bounded (SIGINT)
STUCK = re.compile(r"slurm-run: job (\d+) \((\S+)\) is PENDING for (\S+), which waiting cannot resolve")


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """Data, backbone and cached splits of tests/configs/tiny.yaml, made locally."""
    work = tmp_path_factory.mktemp("guard_seed")
    shutil.copy(TINY, work / "tiny.yaml")
    cmd = ["timeout", "-s", "INT", "300", sys.executable, "-m", "snakemake", "--profile", "profiles/local",
           "--directory", str(work), "--configfile", str(work / "tiny.yaml"), "--cores", "2",
           "--until", "cache_split", "pretrain_demo_backbone"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return work


def _work(seed: Path, tmp_path: Path, **compute) -> Path:
    work = tmp_path / "work"
    shutil.copytree(seed, work, symlinks=True)
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    if compute:
        cfg = yaml.safe_load((work / "tiny.yaml").read_text())
        cfg["compute"]["train"].update(compute)
        cfg["methods"] = {"linear": {}, "lora": {"rank": [1]}}  # two tuning packs: one group job of two
        (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work


def _slurm_run(work: Path, *extra: str) -> tuple[int, str, float]:
    cmd = ["timeout", "-s", "INT", "-k", "30", str(LIMIT_S), sys.executable, "-m", "peft_core.cli", "slurm-run",
           "--poll-seconds", "5", "--stop-seconds", "30", "--",
           "--directory", str(work), "--configfile", str(work / "tiny.yaml"),
           "--slurm-init-seconds-before-status-checks", "2", *extra]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LIMIT_S + 60, check=False)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    return proc.returncode, out, time.monotonic() - t0


def test_group_larger_than_the_node_is_clamped_and_completes(slurm_cluster, seed, tmp_path):
    work = _work(seed, tmp_path, threads=2, mem_mb=4000)
    rc, out, elapsed = _slurm_run(work, "--until", "train_pack")
    assert rc == 0, out[-4000:]
    assert "slurm-run: partition ci: one node holds cpus_per_task=2, mem_mb=" in out
    assert ("slurm-run: cpus_per_task=8 (the profile's resources:) is more than a node holds: "
            "clamped to 2 (largest node of partition ci)") in out  # fmt: skip
    groups = {j: w for j, w in _submitted(out).items() if w.startswith("group_train")}
    assert len(groups) == 1, _submitted(out)
    acct = _sacct(groups)
    (row,) = acct.values()
    assert row["State"] == "COMPLETED" and "cpu=2," in row["AllocTRES"] + ",", acct  # not 4: clamped to the node
    assert len(list((work / "results" / "tiny" / "packs").glob("*/*/*.json"))) == 2
    print(f"clamped group run: {elapsed:.0f} s")


def test_a_job_that_can_never_start_ends_the_run(slurm_cluster, seed, tmp_path):
    work = _work(seed, tmp_path)
    rc, out, elapsed = _slurm_run(
        work, "--until", "pretrain_demo_backbone", "--forcerun", "pretrain_demo_backbone",
        "--set-resources", "pretrain_demo_backbone:tasks=2",  # 2 tasks x 2 CPUs on a 2-CPU node
    )  # fmt: skip
    assert rc == 3, out[-4000:]
    assert elapsed < 120, elapsed
    stuck = STUCK.findall(out)
    (jobid, name, reason), *_ = stuck
    assert (name, reason) == ("rule_pretrain_demo_backbone", "PartitionConfig"), stuck
    assert jobid in _submitted(out)
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    assert f"slurm-run: ended the run (1 job(s) can never start; SLURM run ID {run_id})" in out
    deadline = time.monotonic() + 30
    while _sh("squeue", "-h", "--name", run_id, "-o", "%i").strip():
        assert time.monotonic() < deadline, _sh("squeue")
        time.sleep(1)
    assert not (work / ".snakemake" / "locks").exists() or not any((work / ".snakemake" / "locks").iterdir())


def test_a_target_that_cannot_be_produced_fails_and_is_named(slurm_cluster, seed, tmp_path):
    work = _work(seed, tmp_path)
    backbone = work / "results" / "tiny" / "backbone" / "vit_tiny_upstream.safetensors"
    backbone.unlink()
    rc, out, _ = _slurm_run(
        work, "--until", "pretrain_demo_backbone",
        "--set-resources", "pretrain_demo_backbone:constraint=no_such_feature",  # sbatch refuses the job
    )  # fmt: skip
    assert rc != 0, out[-4000:]
    assert f"slurm-run: 1 requested target(s) missing at the end of the run: {backbone}" in out
