"""profiles/slurm without a cluster: a dry run works and picks up the site settings.

Part of the default suite (no SLURM needed); the real-cluster tests are in
test_slurm.py (``pytest -m slurm``).
"""

from __future__ import annotations

import os
import signal
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _dry_run(config: Path, workdir: Path, **env_vars: str) -> str:
    """`snakemake -n --profile profiles/slurm` of a copy of ``config`` in ``workdir``; its output."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason='needs pip install -e ".[slurm]"')
    shutil.copy(config, workdir / config.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(env_vars)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm",
         "--directory", str(workdir), "--configfile", str(workdir / config.name)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_dry_run_with_slurm_profile_needs_no_cluster(tmp_path):
    out = _dry_run(TINY, tmp_path, SBATCH_PARTITION="gpu-test", SBATCH_ACCOUNT="lab-test")
    # partition/account come from sbatch's own variables, per job
    resources = re.findall(r"resources: (.*)", out)
    assert resources and all("slurm_partition=gpu-test" in r and "slurm_account=lab-test" in r for r in resources)
    # ... and every job gets the early-warning signal (test_profile_warns_the_trainer_before_the_time_limit)
    assert all(f"slurm_extra=--signal={profile_signal()}" in r for r in resources), resources[:3]
    # tuning packs carry compute.train (tiny.yaml: gpu 0, 1000 MB, 5 min per cell; one cell each here)
    train = re.search(r"rule train_pack:.*?resources: ([^\n]*)", out, re.DOTALL)
    assert train and "gpu=0" in train.group(1) and "mem_mb=1000" in train.group(1) and "runtime=5" in train.group(1)


def test_slurm_groups_never_mix_packs_and_final_runs(tmp_path):
    """The profile's group-components on the demo's DAG: packs group with packs, final runs with final runs.

    A group holding a final run and a pack can wait on a group that waits on it
    (final -> selection -> pack in the other group, and back): Snakemake then
    starts neither and ends the run "successfully" with most of it undone.
    """
    out = _dry_run(REPO / "config" / "demo.yaml", tmp_path)
    groups = re.split(r"Group job (\w+) \(jobs in lexicogr\. order\):", out)[1:]
    rules_by_group = [(name, set(re.findall(r"^    rule (\w+):", body.split("\n\n\n")[0], re.M)))
                      for name, body in zip(groups[::2], groups[1::2])]  # fmt: skip
    assert {name for name, _ in rules_by_group} == {"train", "final"}
    for name, rules in rules_by_group:
        assert rules == {"train_pack" if name == "train" else "train_final"}, (name, rules)


def profile_signal() -> str:
    """The `--signal=...` the SLURM profile gives every sbatch job (e.g. "USR1@120")."""
    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    extra = eval(profile["default-resources"]["slurm_extra"], {})  # a Python expression, as Snakemake reads it
    found = re.findall(r"--signal[= ](\S+)", extra)
    assert len(found) == 1, extra
    return found[0]


def test_profile_warns_the_trainer_before_the_time_limit():
    """`--signal=USR1@N` reaches the job steps (where the trainer runs); `B:USR1@N` would reach only the batch shell."""
    from peft_core.preempt import PREEMPT_SIGNALS

    spec = profile_signal()
    match = re.fullmatch(r"([A-Z0-9]+)@(\d+)", spec)
    assert match, f"--signal={spec}: expected SIG@seconds, to the job steps (no B: or R: prefix)"
    name, seconds = match.groups()
    assert getattr(signal, "SIG" + name) in PREEMPT_SIGNALS  # the trainer saves its state on it
    assert int(seconds) >= 60  # time for the current epoch to end and the state to be saved
    # the README gives the same advice
    readme = (REPO / "README.md").read_text()
    assert f"--signal={spec}" in readme and "--signal=B:" not in readme
