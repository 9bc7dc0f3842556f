"""Drive the workflow through ``snakemake.api`` and report which jobs ran.

Run as a script in a fresh process (Snakemake and torch keep process-wide
state): ``python tests/workflow/smk.py WORKDIR CONFIGFILE [--dryrun] [--unlock] [--rerun-incomplete]`` prints
one JSON list of ``{"rule": ..., "output": [...]}`` for the jobs scheduled.

A workdir made by :func:`copy_code` holds its own copy of ``workflow/`` and
``peft_core/``; the workflow then runs (and imports) that copy, so tests can
edit code there and watch what reruns, without touching the checkout.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"


class _JobCollector(logging.Filter):
    """Records every JOB_INFO event; a logger filter, since Snakemake resets handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[dict] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(getattr(record, "event", "")).lower() == "job_info":
            self.jobs.append({"rule": record.rule_name, "output": list(getattr(record, "output", []) or [])})
        return True


def copy_code(workdir: Path) -> None:
    """Copy the workflow and the core package into ``workdir`` (no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("workflow", "peft_core"):
        shutil.copytree(REPO / name, workdir / name, ignore=ignore)


def run(
    workdir: Path, configfile: Path, dryrun: bool, cores: int = 2, unlock: bool = False, rerun_incomplete: bool = False
) -> list[dict]:
    own_code = (workdir / "workflow" / "Snakefile").is_file()
    snakefile = workdir / "workflow" / "Snakefile" if own_code else SNAKEFILE
    if own_code:
        sys.path.insert(0, str(workdir))  # the Snakefile imports peft_core: use the copy
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        ExecutionSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    collector = _JobCollector()
    with SnakemakeApi(OutputSettings(quiet=set())) as api:
        logging.getLogger("snakemake.logging").addFilter(collector)
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=cores),
            config_settings=ConfigSettings(configfiles=[configfile]),
            storage_settings=StorageSettings(),
            snakefile=snakefile,
            workdir=workdir,
        )
        dag = wf.dag(DAGSettings(force_incomplete=rerun_incomplete))  # --rerun-incomplete, as the profiles set
        if unlock:  # what a user runs after a killed Snakemake: `snakemake --unlock`
            dag.unlock()
            return []
        dag.execute_workflow(
            executor="dryrun" if dryrun else "local",
            execution_settings=ExecutionSettings(keep_going=False),
        )
    return collector.jobs


def run_in_subprocess(
    workdir: Path,
    configfile: Path,
    dryrun: bool = False,
    timeout: float = 900,
    unlock: bool = False,
    rerun_incomplete: bool = False,
) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(workdir), str(configfile)]
    cmd += ["--dryrun"] * dryrun + ["--unlock"] * unlock + ["--rerun-incomplete"] * rerun_incomplete
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    jobs = run(Path(args[0]), Path(args[1]), dryrun="--dryrun" in sys.argv, unlock="--unlock" in sys.argv,
               rerun_incomplete="--rerun-incomplete" in sys.argv)  # fmt: skip
    sys.stdout.flush()
    print(json.dumps(jobs))
