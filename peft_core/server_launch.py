"""Starting the fork server (peft_core/server.py) for a run: locally, and inside a SLURM group job.

Locally the Snakefile's ``onstart`` starts one server for the whole run.
Under SLURM every member of a group job is its own ``srun`` step, started by
the group's driver (the batch script's Snakemake), which lives for the whole
allocation: that driver starts a server when it runs two or more members, so
every member after the first skips Python + torch + timm start-up. The
forked worker runs outside the member's step; the member's ``peft-core``
command, inside it, relays SLURM's SIGTERM / SIGUSR1 to it (``server._Relay``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .server import ENV_VAR


def group_job_members(argv: list[str], environ: dict[str, str]) -> int:
    """How many jobs this Snakemake runs as the driver of a SLURM group job; 0 if it is not one.

    The SLURM executor's batch script runs ``snakemake --executor slurm-jobstep
    --target-jobs A B ... --mode remote``, which starts one ``srun`` step per
    member. That driver is in the allocation but not in a step (``SLURM_JOB_ID``
    set, ``SLURM_STEP_ID`` not); the member's own Snakemake, inside its step,
    is. Read from the command line, since Snakemake parses the workflow before
    it sets up its executor or its target jobs.
    """
    if "SLURM_JOB_ID" not in environ or "SLURM_STEP_ID" in environ:
        return 0
    flags = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--executor", "--mode")}
    if flags != {"--executor": "slurm-jobstep", "--mode": "remote"} or "--target-jobs" not in argv:
        return 0
    rest = argv[argv.index("--target-jobs") + 1 :]
    return next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))


class Background:
    """A ``peft-core serve`` process advertised to child processes via $PEFT_CORE_SERVER.

    Its log goes to a file beside the socket (removed by :meth:`stop`), or,
    with ``inherit_output``, to this process's own stdout (a SLURM job's log).
    """

    def __init__(self, inherit_output: bool = False) -> None:
        import subprocess
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="peft-core-"))
        sock = self.tmp / "server.sock"
        cmd = [sys.executable, "-m", "peft_core.cli", "serve", "--socket", str(sock), "--parent-pid", str(os.getpid())]
        sys.stdout.flush()
        with open(self.tmp / "server.log", "w") as out:
            stream = None if inherit_output else out
            self.proc = subprocess.Popen(cmd, stdout=stream, stderr=stream, start_new_session=True)
        # Jobs started from now on find it; until it listens they run in-process.
        os.environ[ENV_VAR] = str(sock)

    def stop(self) -> None:
        import shutil

        os.environ.pop(ENV_VAR, None)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
