"""``peft-core slurm-run``: ``snakemake --profile profiles/slurm`` that never hangs or succeeds silently.

    peft-core slurm-run [--poll-seconds 20] [--no-preflight] -- <snakemake arguments>

1. **Pre-flight**, before the first submission: the target partition
   (``$SBATCH_PARTITION``, a ``slurm_partition=`` in ``--default-resources``,
   else the cluster's default) is read with ``scontrol show partition``,
   ``sinfo`` and, where the partition has a QOS, ``sacctmgr show qos``; the
   group caps (``--resources cpus_per_task/mem_mb/gpu``) are fitted to one
   node (``peft_core.slurm_info.fit_caps``: the profile's are clamped, typed
   ones above the node stop the run, exit 2).
2. **Watchdog**, while Snakemake waits: every ``--poll-seconds`` the run's
   jobs (their SLURM job name is Snakemake's "SLURM run ID") are read with
   ``squeue``. A job PENDING for a reason that waiting cannot resolve
   (:func:`classify_reason`) in two polls in a row ends the run: one line per
   such job (id, rule, reason), ``scancel --name=<run ID>``, Snakemake is
   interrupted (SIGINT, then SIGKILL and ``--unlock`` after
   ``--stop-seconds``); exit 3. Reasons that an administrator or other jobs
   may still resolve are reported once and left to wait.
3. **No false success**: the Snakefile's ``onstart`` writes the run's
   requested target files to ``$PEFT_TARGETS_FILE``; when Snakemake ends,
   the missing ones are named on one line and the exit status is non-zero
   (Snakemake's own status, or 4 where Snakemake said 0).

Every command is an argument list; no config string reaches a shell.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from . import slurm_info

EXIT_PREFLIGHT, EXIT_WATCHDOG, EXIT_MISSING = 2, 3, 4
TARGETS_ENV = "PEFT_TARGETS_FILE"
RUN_ID = re.compile(r"SLURM run ID: (\S+)")

# ----------------------------------------------------------------- pending reasons

# Waiting cannot help: the request exceeds what the partition, its QOS or the
# association allows a single job, or names something that does not exist.
FATAL_REASONS = frozenset({
    "PartitionConfig",  # more CPUs/GPUs/memory per node than the partition's nodes have
    "PartitionNodeLimit",  # more nodes than the partition has or allows
    "PartitionTimeLimit",  # -t above the partition's MaxTime
    "BadConstraints",  # no node has the requested features
    "InvalidAccount",
    "InvalidQOS",
    "QOSNotAllowed",
    "AccountNotAllowed",
    "DependencyNeverSatisfied",
    "JobHoldMaxRequeue",  # requeued too often (failed launches): held until a person releases it
})  # fmt: skip
# A per-job or per-node maximum (or minimum) of a QOS or association:
# QOSMaxCpuPerJobLimit, QOSMaxMemoryPerJob, QOSMaxGRESPerNode, AssocMaxWallDurationPerJobLimit,
# QOSMinCpuNotSatisfied, ... Per-user/per-account/group limits (QOSMaxCpuPerUserLimit,
# QOSGrpCpuLimit, AssocGrpMemLimit, AssocMaxJobsLimit) clear as other jobs end: not here.
FATAL_PATTERN = re.compile(r"(QOS|Assoc)(Max\w*Per(Job|Node)\w*|Min\w+)")
# Ordinary waits: left alone, silently.
WAIT_REASONS = frozenset({
    "None", "Resources", "Priority", "Dependency", "BeginTime", "Licenses", "Prolog",
    "Cleaning", "Configuring", "JobArrayTaskLimit", "PowerUpNode", "NodeDown",
})  # fmt: skip


def classify_reason(reason: str) -> str:
    """A PENDING job's squeue reason (``%r``) -> ``"fatal"``, ``"wait"`` or ``"notice"``.

    ``fatal``: waiting cannot resolve it (the run is ended). ``wait``: ordinary
    queueing (Resources, Priority, ...). ``notice``: may resolve, but only by
    someone's action or other jobs ending (ReqNodeNotAvail with nodes down or
    drained, PartitionDown, JobHeldUser/JobHeldAdmin, per-user and group
    limits, reservations, reasons not known here): reported once, left to wait.
    """
    name = reason.strip().strip("()").split(",")[0].strip()
    if not name or name == "null" or name in WAIT_REASONS:
        return "wait"
    if name in FATAL_REASONS or FATAL_PATTERN.fullmatch(name):
        return "fatal"
    return "notice"


SQUEUE_FORMAT = "%i|%T|%r|%k"


def parse_squeue(text: str) -> list[dict[str, str]]:
    """``squeue -h -o '%i|%T|%r|%k'`` -> [{id, state, reason, name}] (name: the plugin's comment, rule_<rule>...)."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            rows.append(dict(zip(("id", "state", "reason", "name"), parts)))
    return rows


class Watchdog:
    """Pending jobs across polls: a job is stuck when two polls in a row see it fatal."""

    def __init__(self) -> None:
        self._fatal_seen: dict[str, str] = {}
        self._noticed: set[tuple[str, str]] = set()

    def update(self, rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(stuck jobs, jobs to report once) of this poll."""
        stuck, notices, fatal_now = [], [], {}
        for row in rows:
            if row["state"] != "PENDING":
                continue
            kind = classify_reason(row["reason"])
            if kind == "fatal":
                fatal_now[row["id"]] = row["reason"]
                if self._fatal_seen.get(row["id"]) == row["reason"]:
                    stuck.append(row)
            elif kind == "notice" and (row["id"], row["reason"]) not in self._noticed:
                self._noticed.add((row["id"], row["reason"]))
                notices.append(row)
        self._fatal_seen = fatal_now
        return stuck, notices


def stuck_line(row: dict[str, str]) -> str:
    return (f"slurm-run: job {row['id']} ({row['name']}) is PENDING for {row['reason']}, "
            "which waiting cannot resolve")  # fmt: skip


def notice_line(row: dict[str, str]) -> str:
    return (f"slurm-run: note: job {row['id']} ({row['name']}) is PENDING for {row['reason']}; "
            "left waiting (an administrator, a release or other jobs ending can resolve it)")  # fmt: skip


# ----------------------------------------------------------------- targets


def write_targets(path: str | os.PathLike, files) -> None:
    """The Snakefile's onstart: the run's requested target files, absolute, as a JSON list."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(sorted(os.path.abspath(str(f)) for f in files)))
    os.replace(tmp, path)


def missing_targets(files) -> list[str]:
    return sorted(str(f) for f in files if not os.path.exists(str(f)))


def missing_line(missing: list[str], limit: int = 5, prefix: str = "slurm-run") -> str:
    """One line: how many requested targets are missing, the first ``limit`` of them by name."""
    shown = ", ".join(missing[:limit]) + (f" and {len(missing) - limit} more" if len(missing) > limit else "")
    return f"{prefix}: {len(missing)} requested target(s) missing at the end of the run: {shown}"


# ----------------------------------------------------------------- arguments


def _option_values(
    argv: list[str], names: tuple[str, ...], nargs: int | None = None
) -> tuple[list[str], list[str] | None]:
    """argv without the (last) option ``names`` and its values (``--opt a b`` or ``--opt=a``; at most
    ``nargs`` values, default all up to the next option); None if absent."""
    out, values, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, val = arg.partition("=")
        if opt in names:
            values = [val] if eq else []
            i += 1
            while not eq and i < len(argv) and not argv[i].startswith("-"):
                if nargs is not None and len(values) >= nargs:
                    break
                values.append(argv[i])
                i += 1
            continue
        out.append(arg)
        i += 1
    return out, values


def _pairs(items) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        if eq:
            out[key.strip()] = value.strip()
    return out


def profile_resources(profile: Path) -> dict[str, str]:
    """The profile's ``resources:`` (a mapping or a list of k=v)."""
    for name in ("config.v8+.yaml", "config.yaml"):
        if (profile / name).is_file():
            data = yaml.safe_load((profile / name).read_text()) or {}
            res = data.get("resources") or {}
            return {str(k): str(v) for k, v in res.items()} if isinstance(res, dict) else _pairs(res)
    return {}


def wanted_partition(argv: list[str], env: dict[str, str]) -> str | None:
    _, default_res = _option_values(argv, ("--default-resources", "--default-res"))
    part = _pairs(default_res or []).get("slurm_partition", "").strip("'\"")
    return part or env.get("SBATCH_PARTITION") or None


# ----------------------------------------------------------------- running


def _sh(cmd: list[str], timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def preflight(argv: list[str], profile: Path, env: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(argv with the fitted --resources, notes, errors) for the partition this run submits to."""
    partitions = slurm_info.parse_partitions(_sh(["scontrol", "show", "partition", "-o"]))
    part = slurm_info.pick_partition(partitions, wanted_partition(argv, env))
    nodes = slurm_info.parse_sinfo_nodes(_sh(["sinfo", "-h", "-N", "-p", part.name, "-o", slurm_info.SINFO_FORMAT]))
    qos = {}
    if part.qos:
        qos = slurm_info.parse_qos_limits(
            _sh(["sacctmgr", "-n", "-P", "show", "qos", part.qos, "format=Name,MaxTRES,MaxTRESPerNode"])
        )
    size = slurm_info.node_size(part, nodes, qos)
    rest, typed = _option_values(argv, ("--resources", "--res"))
    caps = _pairs(typed) if typed is not None else profile_resources(profile)
    plan = slurm_info.fit_caps(caps, typed is not None, size)
    sized = ", ".join(f"{k}={v}" for k, v in size.size.items())
    notes = [f"slurm-run: partition {part.name}: one node holds {sized}"] + [f"slurm-run: {n}" for n in plan.notes]
    errors = [f"slurm-run: {e}" for e in plan.errors]
    return [*rest, "--resources", *(f"{k}={v}" for k, v in plan.caps.items())], notes, errors


def _relay(stream, sink, found: dict) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        m = RUN_ID.search(line)
        if m and "run_id" not in found:
            found["run_id"] = m.group(1)


OWN_OPTIONS = {"--poll-seconds": float, "--stop-seconds": float, "--no-preflight": None}


def split_own_args(argv: list[str]) -> tuple[dict[str, object], list[str]]:
    """slurm-run's own options (only before the first other argument; ``--`` ends them) and Snakemake's."""
    own: dict[str, object] = {}
    i = 0
    while i < len(argv):
        opt, eq, val = argv[i].partition("=")
        if argv[i] == "--":
            i += 1
            break
        if opt not in OWN_OPTIONS:
            break
        kind = OWN_OPTIONS[opt]
        if kind is None:
            own[opt] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{opt} needs a value")
            val, i = argv[i + 1], i + 1
        own[opt] = kind(val)
        i += 1
    return own, argv[i:]


def main(argv: list[str]) -> int:
    """``peft-core slurm-run [--poll-seconds S] [--stop-seconds S] [--no-preflight] [--] <snakemake args>``."""
    own, rest = split_own_args(argv)
    return run(rest, poll_seconds=float(own.get("--poll-seconds", 20)), stop_seconds=float(own.get("--stop-seconds", 60)),
               preflight_on=not own.get("--no-preflight", False))  # fmt: skip


def run(argv: list[str], poll_seconds: float = 20, stop_seconds: float = 60, preflight_on: bool = True,
        snakemake: list[str] | None = None) -> int:
    """Run Snakemake (``snakemake``: the command, default this Python's ``-m snakemake``) with the SLURM
    profile under the pre-flight, the watchdog and the target check."""
    env = dict(os.environ)
    rest, prof = _option_values(argv, ("--profile",), nargs=1)
    profile = Path(prof[0] if prof else "profiles/slurm")
    argv = [*rest, "--profile", str(profile)]
    if preflight_on:
        try:
            argv, notes, errors = preflight(argv, profile, env)
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            print(f"slurm-run: pre-flight could not read the partition ({err}); --no-preflight skips it",
                  file=sys.stderr)  # fmt: skip
            return EXIT_PREFLIGHT
        for line in notes:
            print(line, file=sys.stderr)
        if errors:
            for line in errors:
                print(line, file=sys.stderr)
            return EXIT_PREFLIGHT
    with tempfile.TemporaryDirectory(prefix="slurm-run-") as tmp:
        targets_file = Path(tmp) / "targets.json"
        env[TARGETS_ENV] = str(targets_file)
        cmd = [*(snakemake or [sys.executable, "-m", "snakemake"]), *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, bufsize=1)  # fmt: skip
        found: dict[str, str] = {}
        relay = threading.Thread(target=_relay, args=(proc.stdout, sys.stdout, found), daemon=True)
        relay.start()
        stuck = _watch(proc, found, poll_seconds)
        if stuck:
            for row in stuck:
                print(stuck_line(row), file=sys.stderr)
            _stop(proc, found["run_id"], cmd, env, stop_seconds)
        rc = proc.wait()
        relay.join(timeout=10)
        if stuck:
            print(f"slurm-run: ended the run ({len(stuck)} job(s) can never start; SLURM run ID "
                  f"{found['run_id']}): fix the request and run the same command again", file=sys.stderr)  # fmt: skip
            return EXIT_WATCHDOG
        if targets_file.is_file():
            missing = missing_targets(json.loads(targets_file.read_text()))
            if missing:
                print(missing_line(missing), file=sys.stderr)
                return rc or EXIT_MISSING
        return rc


def _watch(proc: subprocess.Popen, found: dict, poll_seconds: float) -> list[dict[str, str]]:
    """Poll squeue until Snakemake ends (-> []) or a job is stuck (-> those jobs)."""
    dog = Watchdog()
    while True:
        try:
            proc.wait(timeout=poll_seconds)
            return []
        except subprocess.TimeoutExpired:
            pass
        if "run_id" not in found:
            continue
        try:
            out = _sh(["squeue", "-h", "--name", found["run_id"], "-o", SQUEUE_FORMAT])
        except (OSError, subprocess.SubprocessError) as err:
            print(f"slurm-run: squeue failed ({err}); trying again", file=sys.stderr)
            continue
        stuck, notices = dog.update(parse_squeue(out))
        for row in notices:
            print(notice_line(row), file=sys.stderr)
        if stuck:
            return stuck


def _stop(proc: subprocess.Popen, run_id: str, cmd: list[str], env: dict, stop_seconds: float) -> None:
    """Cancel the run's jobs, interrupt Snakemake; kill it (and unlock the directory) if it does not stop."""
    subprocess.run(["scancel", "--name", run_id], timeout=60, check=False)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=stop_seconds)
        return
    except subprocess.TimeoutExpired:
        pass
    print(f"slurm-run: Snakemake did not stop {stop_seconds:.0f} s after SIGINT: killed; unlocking", file=sys.stderr)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, "--unlock"], capture_output=True, timeout=300, check=False)
