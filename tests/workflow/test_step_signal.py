"""SLURM's early warning (the profile's ``--signal=USR1@120``) as slurmstepd sends it: to every
process of the job step, i.e. Snakemake, the rule's shell and the trainer alike (the resume
from the saved state is tests/unit/test_resume.py's; on a real cluster tests/slurm's).

Before, Snakemake died of it (SIGUSR1's default action); on SLURM the step then ended and took the
trainer with it, before the epoch end where it saves ("srun: error: ... User defined signal 1").
Here, with no cluster: a local Snakemake run of one LoRA cell gets SIGUSR1 in every one of its
processes mid-training. Snakemake must live on, the trainer save its state and exit 75, and
Snakemake report the failed job itself (its retry then resumes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from .smk import REPO, copy_code

SMK = Path(__file__).with_name("smk.py")
EPOCHS = 40  # ~0.1 s each on the tiny ViT: long enough to be caught mid-training


def _study(work: Path) -> Path:
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["methods"] = {"lora": {"rank": [1]}}
    cfg["train"]["epochs"] = EPOCHS
    cfg["compute"]["fork_server"] = False  # as under SLURM: the cell runs in the rule's own process tree
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cell_log(work: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (work / "logs").glob("tiny/train_pack/*/lora/*.log"))


def _signal_step(root: psutil.Process) -> list[int]:
    """SIGUSR1 to ``root`` and all its descendants, as slurmstepd signals a job step's processes."""
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


def test_usr1_to_every_process_of_the_step_leaves_snakemake_alive_and_the_state_saved(tmp_path):
    copy_code(tmp_path)
    study = _study(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PEFT_CORE_SERVER"}
    cmd = [sys.executable, str(SMK), str(tmp_path), str(study)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while f"epoch 5/{EPOCHS}" not in _cell_log(tmp_path):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the LoRA cell never started training"
            time.sleep(0.1)
        signalled = _signal_step(psutil.Process(proc.pid))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = _cell_log(tmp_path)
    # Snakemake survived the signal and reported the failed job (the trainer's exit 75) itself
    assert proc.returncode == 1, (proc.returncode, err[-4000:])
    assert len(signalled) >= 3, signalled  # Snakemake, the rule's shell, the trainer
    assert "preempted: state saved" in log and f"epoch {EPOCHS}/{EPOCHS}" not in log, log[-2000:]
    assert "returned non-zero exit status 75" in err, err[-4000:]  # EX_TEMPFAIL: preempted, state saved

