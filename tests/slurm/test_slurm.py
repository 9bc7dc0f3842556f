"""`snakemake --profile profiles/slurm` on a real single-node SLURM cluster.

Run with ``bash tests/slurm/start_cluster.sh && pytest -m slurm`` (root;
the session fixture starts the cluster itself when it is not up, and skips
with the reason when it cannot; with ``PEFT_SLURM_REQUIRED=1``, as in CI, it
fails instead). The cluster is tests/slurm/start_cluster.sh's: partition
``ci`` (not the default one), account ``root``, two fake GPUs.

* the miniature study (tests/configs/tiny.yaml) goes through sbatch and gives
  the same results as a local run of the same config;
* a training job cancelled behind Snakemake's back (``scancel``), then the
  same command again: the study completes, no cell lost or duplicated.

Every Snakemake run is bounded by ``timeout -s INT``: plugin 2.8.0 does not
recognise a job that sacct reports as ``CANCELLED by 0`` and would wait
forever; SIGINT makes it cancel its jobs and stop at its next status check.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
HERE = Path(__file__).resolve().parent
SLURM_DIR = Path(os.environ.get("PEFT_SLURM_DIR", "/tmp/peft-slurm"))
PARTITION = os.environ.get("PEFT_SLURM_PARTITION", "ci")
ACCOUNT = "root"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
# The test node has 2 CPUs: bound every group job to it, or a group of three
# one-thread cells asks for 3 CPUs and stays PENDING forever.
NODE_RESOURCES = ["cpus_per_task=2", "mem_mb=8000", "gpu=2"]
RUN_TIMEOUT_S = 900

SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/([^/]+)/")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
# a group member in a SLURM job's log: "rule train_pack: ... wildcards: dataset=d, method=m, pack=p"
MEMBER = re.compile(r"rule (train_pack|train_final):.*?wildcards: dataset=([^,\s]+), method=([^,\s]+)(?:, pack=([^,\s]+))?", re.S)


# ----------------------------------------------------------------- cluster


def _daemon_up(name: str) -> bool:
    try:
        pid = (SLURM_DIR / f"{name}.pid").read_text().strip()
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


def _sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """The test cluster: started here unless it is up already; stopped at the end if started here."""

    def unavailable(reason: str):
        if os.environ.get("PEFT_SLURM_REQUIRED") == "1":
            pytest.fail(f"SLURM tests required (PEFT_SLURM_REQUIRED=1) but {reason}")
        pytest.skip(reason)

    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        unavailable('snakemake-executor-plugin-slurm is not installed (pip install -e ".[slurm]")')
    if os.geteuid() != 0:
        unavailable("the test cluster needs root (tests/slurm/start_cluster.sh)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        unavailable("no SLURM installed and no apt-get to install it")
    started_here = not all(_daemon_up(d) for d in DAEMONS)
    try:
        proc = subprocess.run(
            ["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        unavailable("tests/slurm/start_cluster.sh did not finish in 600 s")
    if proc.returncode != 0:
        unavailable(f"tests/slurm/start_cluster.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    yield
    if started_here:
        subprocess.run(["bash", str(HERE / "stop_cluster.sh")], timeout=180, check=False)


# ----------------------------------------------------------------- runs


def _env() -> dict[str, str]:
    """The user's environment, less any SLURM job context, with the test cluster's partition/account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SBATCH_PARTITION"] = PARTITION  # read by profiles/slurm (slurm_partition)
    env["SBATCH_ACCOUNT"] = ACCOUNT  # read by profiles/slurm (slurm_account)
    return env


def _slurm_cmd(work: Path) -> list[str]:
    return [
        "timeout", "-s", "INT", "-k", "120", str(RUN_TIMEOUT_S),
        sys.executable, "-m", "snakemake",
        "--profile", "profiles/slurm",
        "--directory", str(work),
        "--configfile", str(work / "tiny.yaml"),
        "--slurm-init-seconds-before-status-checks", "2",
        "--resources", *NODE_RESOURCES,
    ]  # fmt: skip


def _run(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S + 300
) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    return proc


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:]


def _submitted(log_text: str) -> dict[str, str]:
    """SLURM job id -> the Snakemake job it ran (`rule_<name>` or `group_<group>_<rules>`)."""
    return {jobid: what for jobid, what in SUBMITTED.findall(log_text)}


def _sacct(jobids) -> dict[str, dict[str, str]]:
    fields = ["JobIDRaw", "JobName", "Partition", "Account", "State", "ExitCode", "AllocTRES"]
    out = _sh("sacct", "-X", "-n", "-P", "-j", ",".join(jobids), "-o", ",".join(fields))
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]
    return {r["JobIDRaw"]: r for r in rows}


def _results(work: Path) -> pd.DataFrame:
    return pd.read_parquet(work / "reports" / "tiny" / "results.parquet")


def _cell_metrics(work: Path) -> dict[str, dict]:
    """cell id -> metrics.json, every cell dir under results/tiny/cells (a cell twice fails)."""
    cells: dict[str, dict] = {}
    for path in sorted((work / "results" / "tiny" / "cells").glob("*/*/*/metrics.json")):
        cell = path.parent.name
        assert cell not in cells, f"cell {cell} has two directories"
        cells[cell] = json.loads(path.read_text())
    return cells


def _assert_same_results(work: Path, reference: dict) -> None:
    """Same cells, accuracies to 1e-6 and training losses to 1e-6 as the local run."""
    results = _results(work)
    assert results["cell"].is_unique, results["cell"].tolist()
    assert len(results) == len(reference["results"]), (len(results), len(reference["results"]))
    merged = results.merge(reference["results"], on="cell", suffixes=("", "_local"), validate="one_to_one")
    assert len(merged) == len(results), "cells differ from the local run"
    for col in ("dataset", "method", "stage", "train_split", "eval_split", "selected", "trainable_params"):
        assert (merged[col] == merged[f"{col}_local"]).all(), merged[["cell", col, f"{col}_local"]]
    diff = (merged["accuracy"] - merged["accuracy_local"]).abs()
    assert (diff <= 1e-6).all(), merged[["cell", "accuracy", "accuracy_local"]]
    metrics = _cell_metrics(work)
    assert set(metrics) == set(reference["metrics"]), (sorted(metrics), sorted(reference["metrics"]))
    for cell, m in metrics.items():
        ref = reference["metrics"][cell]
        assert abs(m["final_train_loss"] - ref["final_train_loss"]) <= 1e-6, (cell, m, ref)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The tiny study run locally (`--profile profiles/local`): what the SLURM runs must reproduce."""
    work = tmp_path_factory.mktemp("tiny_local")
    shutil.copy(TINY, work / "tiny.yaml")
    cmd = ["timeout", "-s", "INT", "-k", "60", "600", sys.executable, "-m", "snakemake",
           "--profile", "profiles/local", "--directory", str(work), "--configfile", str(work / "tiny.yaml"),
           "--cores", "2"]  # fmt: skip
    log = work / "snakemake.log"
    proc = _run(cmd, log)
    assert proc.returncode == 0, _tail(log)
    results = _results(work)
    assert len(results) == 5  # 1 linear + 2 lora tuning cells, one final seed each
    return {"work": work, "results": results, "metrics": _cell_metrics(work)}


# ----------------------------------------------------------------- tests


def test_tiny_study_through_sbatch_matches_local_run(slurm_cluster, reference, tmp_path):
    work = tmp_path / "slurm"
    work.mkdir()
    # One (fake) GPU per cell: compute.train.gpu must reach sbatch as --gpus. A cell's
    # identity does not include compute resources, so the cells are the local run's. The
    # precision is: `auto` resolves to bf16 for GPU jobs (another cell id), but this
    # cluster's GPUs are fake and the jobs run on the CPU, so it is pinned to fp32,
    # what the local run resolves `auto` to.
    cfg = yaml.safe_load(TINY.read_text())
    cfg["compute"]["train"]["gpu"] = 1
    cfg["train"]["precision"] = "fp32"
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "snakemake.log"
    t0 = time.monotonic()
    # the plugin deletes a successful job's log unless told to keep it: _assert_members_forwarded reads them
    proc = _run([*_slurm_cmd(work), "--slurm-keep-successful-logs"], log, env=_env())
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"snakemake --profile profiles/slurm failed ({proc.returncode}):\n{_tail(log)}"
    print(f"slurm run of tests/configs/tiny.yaml: {elapsed:.0f} s")

    # Every heavy job went through sbatch; the light ones ran on the submit host.
    run_ids = set(RUN_ID.findall(text))
    assert len(run_ids) == 1, run_ids
    submitted = _submitted(text)
    kinds = sorted(submitted.values())
    assert kinds.count("rule_pretrain_demo_backbone") == 1, kinds
    assert kinds.count("rule_cache_split") == 4, kinds  # train800, val200, train800val200, test
    assert any(k.startswith("group_train") for k in kinds), kinds  # cells packed by group-components
    assert not any(k in kinds for k in ("rule_select_config", "rule_aggregate_dataset", "rule_build_report"))
    for light in ("localrule make_demo_data:", "localrule select_config:", "localrule build_report:"):
        assert light in text, light
    # all five cells ran inside SLURM jobs: 3 tuning packs (one cell each here) and 2 final-run jobs (one seed each)
    assert (text.count("rule train_pack:"), text.count("rule train_final:")) == (3, 2)

    # ... and SLURM's accounting knows each of those jobs: our run, our partition/account, completed.
    acct = _sacct(submitted)
    print(_sh("sacct", "-X", "-j", ",".join(submitted), "-o",
              "JobID,JobName%36,Partition,Account,AllocCPUS,ReqMem,AllocTRES%40,State,ExitCode,Elapsed"))  # fmt: skip
    assert set(acct) == set(submitted), (sorted(acct), sorted(submitted))
    for jobid, row in acct.items():
        assert row["JobName"] in run_ids, row
        assert row["Partition"] == PARTITION, row  # from $SBATCH_PARTITION through the profile
        assert row["Account"] == ACCOUNT, row
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        gpus = re.search(r"gres/gpu=(\d+)", row["AllocTRES"])
        if _is_training(submitted[jobid]) or submitted[jobid] in ("rule_robustness", "rule_extract_features"):
            # from compute.train.gpu (WiSE-FT evaluation and the linear probe's feature extraction too)
            assert gpus and int(gpus.group(1)) >= 1, row
        else:
            assert gpus is None, row
        # the profile asks for --requeue (the test cluster's JobRequeue=0 would say Requeue=0 otherwise)
        assert "Requeue=1" in _sh("scontrol", "show", "job", jobid), jobid

    _assert_same_results(work, reference)
    _assert_members_forwarded(text)


def _assert_members_forwarded(run_log: str) -> None:
    """In a group job of two or more members, the driver's fork server ran the members' cells
    (peft_core/server_launch.py); the first may run in-process while the server still imports
    torch. A job of one member starts no server."""
    groups = 0
    for jobid, path in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", run_log):
        text = Path(path).read_text(errors="replace")
        members = set(MEMBER.findall(text))
        served = len(re.findall(r"peft-core serve: client pid \d+: forked pid \d+ for train", text))
        print(f"SLURM job {jobid}: {len(members)} member(s), {served} forwarded to the job's fork server")
        if len(members) >= 2:
            groups += 1
            assert "peft-core serve: pid" in text and len(members) - 1 <= served <= len(members), (jobid, text[-3000:])
        else:
            assert "peft-core serve" not in text, (jobid, text[-3000:])
    assert groups, "no group job of two or more members: nothing was forwarded"


def _is_training(what: str) -> bool:
    """A submitted job that trains: a tuning pack, a final cell, or a group of them."""
    return "train_pack" in what or "train_final" in what


def _member_logs(work: Path, run_log: Path, jobid: str) -> list[Path]:
    """The cell logs of the Snakemake jobs a SLURM job runs, from the wildcards its own log names."""
    found = re.search(rf"submitted with SLURM jobid {jobid} \(log: (\S+)\)", run_log.read_text())
    slurm_log = Path(found.group(1)) if found else None
    if slurm_log is None or not slurm_log.is_file():
        return []
    text = slurm_log.read_text(errors="replace")
    return [work / "logs" / "tiny" / rule / d / (f"{m}/{key}.log" if key else f"{m}.log")
            for rule, d, m, key in MEMBER.findall(text)]  # fmt: skip


def _mid_training(cell_log: Path) -> bool:
    text = cell_log.read_text(errors="replace") if cell_log.is_file() else ""
    return "epoch 3/60" in text and "epoch 60/60" not in text


def _seed_from(reference_work: Path, work: Path) -> None:
    """Data, backbone and cached splits of the local run (mtimes kept): the SLURM run starts at training."""
    shutil.copy(TINY, work / "tiny.yaml")
    shutil.copytree(reference_work / "data", work / "data")
    for sub in ("backbone", "cache"):
        shutil.copytree(reference_work / "results" / "tiny" / sub, work / "results" / "tiny" / sub)


def _squeue_state(jobid: str) -> str:
    try:
        return _sh("squeue", "-h", "-j", jobid, "-o", "%T", timeout=10).strip()
    except subprocess.SubprocessError:
        return ""


def test_cancelled_train_job_then_rerun_completes(slurm_cluster, reference, tmp_path):
    work = tmp_path / "cancel"
    work.mkdir()
    _seed_from(reference["work"], work)
    cmd, env = _slurm_cmd(work), _env()

    # 1. Start the run; wait for a training job to be RUNNING; cancel it behind Snakemake's back.
    log1 = tmp_path / "run1.log"
    t0 = time.monotonic()
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        victim, deadline = None, time.monotonic() + 300
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            train_jobs = [j for j, what in _submitted(log1.read_text()).items() if _is_training(what)]
            victim = next((j for j in train_jobs if _squeue_state(j) == "RUNNING"), None)
            time.sleep(0.5)
        assert victim is not None, f"no training job was seen RUNNING:\n{_tail(log1)}"
        # let a cell of it start training (its log appears), so that the cancel interrupts real work;
        # cancelling before that would only test a job that never started
        deadline = time.monotonic() + 60
        while not list((work / "logs").glob("tiny/train_*/*/*/*.log")):
            assert time.monotonic() < deadline, f"job {victim} RUNNING but no training log in 60 s:\n{_tail(log1)}"
            time.sleep(0.2)
        _sh("scancel", victim)
        deadline = time.monotonic() + 60
        while not _sacct([victim]).get(victim, {}).get("State", "").startswith("CANCELLED"):
            assert time.monotonic() < deadline, f"job {victim} not CANCELLED in sacct"
            time.sleep(1)
        # Plugin 2.8.0 takes "CANCELLED by 0" for a running job and would wait forever:
        # stop Snakemake (timeout forwards SIGINT); it cancels its other jobs and exits.
        time.sleep(5)
        proc.send_signal(signal.SIGINT)
        rc1 = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text1 = log1.read_text(errors="replace")
    print(f"run 1: job {victim} cancelled, snakemake exited {rc1} after {time.monotonic() - t0:.0f} s")
    assert rc1 != 0, "the interrupted run reported success"
    run1 = set(RUN_ID.findall(text1))
    assert len(run1) == 1, run1
    # Nothing of the first run is left in the queue.
    deadline = time.monotonic() + 60
    while _sh("squeue", "-h", "-n", next(iter(run1)), "-o", "%i %T").strip():
        assert time.monotonic() < deadline, _sh("squeue")
        time.sleep(1)

    # 2. The same command again completes the study.
    log2 = tmp_path / "run2.log"
    t1 = time.monotonic()
    proc2 = _run(cmd, log2, env=env)
    text2 = log2.read_text(errors="replace")
    print(f"run 2 (rerun): {time.monotonic() - t1:.0f} s")
    if proc2.returncode != 0 and "LockException" in text2:
        pytest.fail(f"the interrupted run left the working directory locked:\n{_tail(log2)}")
    assert proc2.returncode == 0, f"rerun failed ({proc2.returncode}):\n{_tail(log2)}"
    submitted2 = _submitted(text2)
    # what the first run had not done: training, and the WiSE-FT stage that follows it
    assert submitted2 and all(_is_training(w) or w == "rule_robustness" for w in submitted2.values()), submitted2
    acct = _sacct(submitted2)
    assert {r["State"] for r in acct.values()} == {"COMPLETED"}, acct

    # No cell lost or duplicated: exactly the local run's cells, each with one metrics.json,
    # one results row each, same numbers.
    metrics = _cell_metrics(work)
    assert sorted(metrics) == sorted(reference["metrics"]), (sorted(metrics), sorted(reference["metrics"]))
    _assert_same_results(work, reference)
    # ... and a third run has nothing to do.
    dry = subprocess.run(
        [*cmd[cmd.index(sys.executable) :], "-n"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


@pytest.mark.parametrize("how", ["requeue", "profile-signal"])
def test_requeued_train_job_resumes_from_its_saved_state(slurm_cluster, reference, tmp_path, how):
    """A training job cut off mid-training saves its state and the study still completes, resuming from it.

    ``requeue``: `scontrol requeue` (what preemption does): SIGTERM, the job runs again and resumes.
    ``profile-signal``: the profile's own `--signal` (e.g. USR1@120) as SLURM sends it ahead of the
    time limit, i.e. to the job steps (`scancel --signal`, no `--batch`): the trainer saves its state
    and Snakemake's retry resumes from it.
    """
    from .test_profile import profile_signal

    work = tmp_path / "requeue"
    work.mkdir()
    _seed_from(reference["work"], work)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"]["epochs"] = 60  # long enough to be caught mid-training
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd, env = _slurm_cmd(work), _env()
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        victim, deadline = None, time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:
            assert proc.poll() is None, _tail(log)
            running = [j for j, what in _submitted(log.read_text()).items()
                       if _is_training(what) and _squeue_state(j) == "RUNNING"]  # fmt: skip
            # a job one of whose LoRA cells is mid-training: the linear probe's head trains on cached
            # features, all 60 epochs within one poll, so a job of it is caught with nothing left to save
            victim = next((j for j in running if any(_mid_training(p) and p.parent.name == "lora"
                                                     for p in _member_logs(work, log, j))), None)  # fmt: skip
            time.sleep(0.3)
        assert victim is not None, f"no training job was seen mid-training:\n{_tail(log)}"
        if how == "requeue":
            _sh("scontrol", "requeue", victim)
        else:
            _sh("scancel", f"--signal={profile_signal().split('@')[0]}", victim)
        rc = proc.wait(timeout=RUN_TIMEOUT_S + 300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, f"the run with a requeued job failed ({rc}):\n{_tail(log)}"
    print(_sh("sacct", "-D", "-X", "-j", victim, "-o", "JobID,JobName%36,State,ExitCode,Elapsed"))
    # the requeued job ran twice (sacct -D shows each run) and completed the second time
    runs = _sh("sacct", "-D", "-X", "-n", "-P", "-j", victim, "-o", "State").split()
    if how == "requeue":
        assert len(runs) >= 2 and runs[-1] == "COMPLETED", runs
    train_logs = "\n".join(p.read_text(errors="replace") for p in (work / "logs").glob("tiny/train_*/*/*/*.log"))
    assert "resumed from" in train_logs, "no cell resumed from its saved state"
    if how == "profile-signal":
        # the step's Snakemake and shell ignore the warning: only the trainer acts on it, so the step
        # is not torn down before the trainer's epoch end (peft_core/preempt.py: ignore_step_warning)
        victim_log = re.search(rf"submitted with SLURM jobid {victim} \(log: (\S+)\)", text)
        assert victim_log, f"no SLURM log named for job {victim}"
        assert "User defined signal" not in Path(victim_log.group(1)).read_text(errors="replace"), victim_log.group(1)
    assert not list((work / "results").rglob("resume.pt")), "a resume state was left behind"
    cells = _cell_metrics(work)
    assert len(cells) == 5 and all(m["status"] == "ok" for m in cells.values()), cells
    assert len(_results(work)) == 5 and "Nothing to be done" not in text


@pytest.mark.skipif(os.environ.get("PEFT_SLURM_DEMO") != "1", reason="the demo locally and through SLURM: ~30 min on 2 cores; run it with PEFT_SLURM_DEMO=1 (.ci/run leaves it out)")
def test_demo_study_through_sbatch_matches_local_run(slurm_cluster, tmp_path):
    """The embedded demo, `--profile profiles/local` vs `--profile profiles/slurm`: the same results.parquet."""
    local, work = tmp_path / "local", tmp_path / "slurm"
    for d in (local, work):
        d.mkdir()
        shutil.copy(REPO / "config" / "demo.yaml", d / "demo.yaml")
    cmd = ["timeout", "-s", "INT", "-k", "60", "1200", sys.executable, "-m", "snakemake", "--profile", "profiles/local",
           "--directory", str(local), "--configfile", str(local / "demo.yaml")]  # fmt: skip
    proc = _run(cmd, tmp_path / "local.log")
    assert proc.returncode == 0, _tail(tmp_path / "local.log")
    # generated data and pre-trained backbone: both timed runs below start at training
    timed = tmp_path / "local_timed"
    for d in (work, timed):
        d.mkdir(exist_ok=True)
        shutil.copy(REPO / "config" / "demo.yaml", d / "demo.yaml")
        shutil.copytree(local / "data", d / "data")
        shutil.copytree(local / "results" / "demo" / "backbone", d / "results" / "demo" / "backbone")
    t0 = time.monotonic()
    proc = _run([c if c != str(local) else str(timed) for c in cmd[:-1]] + [str(timed / "demo.yaml")], tmp_path / "timed.log")
    assert proc.returncode == 0, _tail(tmp_path / "timed.log")
    print(f"demo locally from the same start (profiles/local): {time.monotonic() - t0:.0f} s")
    slurm = [c if c != str(work / "tiny.yaml") else str(work / "demo.yaml") for c in _slurm_cmd(work)]
    slurm[slurm.index(str(RUN_TIMEOUT_S))] = "2700"
    # A group job runs its members one after another (the job step's Snakemake has --jobs 1):
    # one CPU per group job lets two of them share the 2-CPU test node.
    slurm[slurm.index("cpus_per_task=2")] = "cpus_per_task=1"
    t0 = time.monotonic()
    proc = _run(slurm, tmp_path / "slurm.log", env=_env(), timeout=3000)
    text = (tmp_path / "slurm.log").read_text(errors="replace")
    assert proc.returncode == 0, _tail(tmp_path / "slurm.log")
    submitted = _submitted(text)
    print(f"demo through SLURM: {time.monotonic() - t0:.0f} s, {len(submitted)} sbatch jobs")
    acct = _sacct(submitted)
    assert set(acct) == set(submitted) and {r["State"] for r in acct.values()} == {"COMPLETED"}
    ours = pd.read_parquet(work / "reports/demo/results.parquet").set_index("cell").sort_index()
    ref = pd.read_parquet(local / "reports/demo/results.parquet").set_index("cell").sort_index()
    assert list(ours.index) == list(ref.index) and ours.index.is_unique
    diff = (ours["accuracy"] - ref["accuracy"]).abs()
    assert (diff.fillna(0) <= 1e-6).all(), diff[diff > 1e-6]
    assert (ours["status"] == ref["status"]).all()
