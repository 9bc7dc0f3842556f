"""What one node of a SLURM partition holds, and the profile's group caps fitted to it.

Pure functions on the text of ``scontrol show partition -o``, ``sinfo -h -N
-p P -o %N|%c|%m|%G|%T`` and ``sacctmgr -n -P show qos Q format=Name,MaxTRES,
MaxTRESPerNode`` (captured outputs are the unit tests' fixtures; nothing here
runs a command): ``peft_core.slurm_guard`` runs those commands before the first
submission and applies :func:`fit_caps`.

Why the caps are **clamped** and not refused: the profile's ``resources:``
(``cpus_per_task``, ``mem_mb``, ``gpu``) are bounds on how much one packed
(group) job may ask for; Snakemake sums a group's members up to them and runs
the members beyond them one after another inside the allocation. A cap
lowered to what a node holds runs the same cells, in the same jobs, only less
of them side by side, whereas a cap above the node makes a group job that
SLURM keeps PENDING (PartitionConfig) forever. The profile cannot know the
site's node size, so its values are clamped, with one line saying so. A
value the user typed (``--resources`` on the command line) is never rewritten
behind their back: a typed value above the node stops the run with one line
naming the resource, the request, the node size and the flag that fixes it.
A cap the command line left out (``--resources`` replaces the profile's
whole list) is set to the node's size, so no group can outgrow the node.

A GPU cap above the node's GPUs is clamped only when the node has GPUs: on a
GPU-less partition it stays, so that a GPU cell is refused by ``sbatch``
instead of being turned into a CPU cell by the cap.

Node size: the largest value of each resource over the partition's nodes
(each resource on its own: a partition of big-memory and many-CPU nodes gives
both maxima), lowered by the partition's ``MaxCPUsPerNode``/``MaxMemPerNode``
and its QOS's ``MaxTRES``/``MaxTRESPerNode`` where set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# the group caps the pre-flight fits, as Snakemake/the SLURM plugin name them
CAPS = ("cpus_per_task", "mem_mb", "gpu")
_WHAT = {"cpus_per_task": "CPUs", "mem_mb": "memory (MB)", "gpu": "GPUs"}
_UNLIMITED = {"UNLIMITED", "INFINITE", "N/A", "NONE", "(null)", ""}
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:.]*)=")


def parse_key_values(line: str) -> dict[str, str]:
    """``Key=value Key2=value with spaces ...`` (one ``scontrol show ... -o`` line) -> dict.

    A value runs up to the next whitespace-preceded ``Key=``, so ``TRES=cpu=2,mem=1G``
    and ``OS=Linux 6.1 #1 SMP`` stay whole.
    """
    marks = list(_KEY.finditer(line))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def parse_mem_mb(text: str) -> int | None:
    """SLURM memory (``18113``, ``18113M``, ``64G``, ``1.5T``) in MB; None when unlimited/unset."""
    text = text.strip().rstrip("+")
    if text.upper() in _UNLIMITED:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]?)", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"memory {text!r}: expected a number with an optional K/M/G/T/P suffix")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    return None if text.upper() in _UNLIMITED else int(text)


def parse_gres_gpus(gres: str) -> int:
    """GPUs in a node's gres string: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:2,gpu:v100:1,shard:8``, ``(null)``."""
    total = 0
    # commas separate entries, but also sit inside a socket list "(S:0,1)": drop those first
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        total += int(count) if count.isdigit() else 1
    return total


def parse_tres(text: str) -> dict[str, int]:
    """A TRES list (``cpu=4,mem=8G,gres/gpu=1,node=1``) -> {cpus_per_task, mem_mb, gpu} present in it."""
    out: dict[str, int] = {}
    typed_gpus: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.strip().partition("=")
        if not value:
            continue
        if key == "cpu":
            out["cpus_per_task"] = int(value)
        elif key == "mem":
            mem = parse_mem_mb(value)
            if mem is not None:
                out["mem_mb"] = mem
        elif key == "gres/gpu":
            out["gpu"] = int(value)
        elif key.startswith("gres/gpu:"):  # a typed count (gres/gpu:a100=2); the untyped total wins
            typed_gpus[key] = int(value)
    if "gpu" not in out and typed_gpus:
        out["gpu"] = sum(typed_gpus.values())
    return out


@dataclass(frozen=True)
class Partition:
    """The parts of ``scontrol show partition -o`` the pre-flight uses."""

    name: str
    default: bool
    state: str
    qos: str | None
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None
    max_nodes: int | None
    total_nodes: int | None


def parse_partitions(text: str) -> dict[str, Partition]:
    """``scontrol show partition -o`` (one partition a line) -> name -> Partition."""
    out = {}
    for line in text.splitlines():
        kv = parse_key_values(line)
        if "PartitionName" not in kv:
            continue
        qos = kv.get("QoS", "N/A")
        out[kv["PartitionName"]] = Partition(
            name=kv["PartitionName"],
            default=kv.get("Default", "NO").upper() == "YES",
            state=kv.get("State", "UP"),
            qos=None if qos.upper() in _UNLIMITED else qos,
            max_cpus_per_node=_int_or_none(kv.get("MaxCPUsPerNode", "UNLIMITED")),
            max_mem_per_node_mb=parse_mem_mb(kv.get("MaxMemPerNode", "UNLIMITED")),
            max_nodes=_int_or_none(kv.get("MaxNodes", "UNLIMITED")),
            total_nodes=_int_or_none(kv.get("TotalNodes", "")),
        )
    return out


def pick_partition(partitions: dict[str, Partition], wanted: str | None) -> Partition:
    """The partition asked for (``SBATCH_PARTITION``/``slurm_partition``), else the cluster's default."""
    if wanted:
        if wanted not in partitions:
            raise ValueError(f"partition {wanted!r} does not exist (partitions: {', '.join(sorted(partitions)) or 'none'})")
        return partitions[wanted]
    defaults = [p for p in partitions.values() if p.default]
    if not defaults:
        raise ValueError("no partition given and the cluster has no default one: export SBATCH_PARTITION=<partition>")
    return defaults[0]


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str


SINFO_FORMAT = "%N|%c|%m|%G|%T"


def parse_sinfo_nodes(text: str) -> list[Node]:
    """``sinfo -h -N -p P -o '%N|%c|%m|%G|%T'`` -> one Node per node (a node listed twice counts once)."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) != 5:
            raise ValueError(f"sinfo line {line!r}: expected {SINFO_FORMAT}")
        name, cpus, mem, gres, state = parts
        nodes[name] = Node(name, int(cpus.rstrip("+")), parse_mem_mb(mem) or 0, parse_gres_gpus(gres), state)
    return list(nodes.values())


def parse_qos_limits(text: str) -> dict[str, int]:
    """``sacctmgr -n -P show qos Q format=Name,MaxTRES,MaxTRESPerNode`` -> the tighter of the two per resource."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        for tres in parts[1:3]:
            for key, value in parse_tres(tres).items():
                out[key] = min(value, out.get(key, value))
    return out


@dataclass(frozen=True)
class NodeSize:
    """The most one job may get on one node of the partition, with where each bound comes from."""

    partition: str
    size: dict[str, int]
    source: dict[str, str] = field(default_factory=dict)


def node_size(partition: Partition, nodes: list[Node], qos: dict[str, int] | None = None) -> NodeSize:
    """Largest node of the partition, lowered by the partition's and its QOS's per-node/per-job limits."""
    if not nodes:
        raise ValueError(f"partition {partition.name!r} has no nodes")
    size = {"cpus_per_task": max(n.cpus for n in nodes), "mem_mb": max(n.mem_mb for n in nodes),
            "gpu": max(n.gpus for n in nodes)}  # fmt: skip
    source = dict.fromkeys(size, f"largest node of partition {partition.name}")
    limits = {"cpus_per_task": (partition.max_cpus_per_node, f"MaxCPUsPerNode of partition {partition.name}"),
              "mem_mb": (partition.max_mem_per_node_mb, f"MaxMemPerNode of partition {partition.name}")}  # fmt: skip
    for key, (value, where) in limits.items():
        if value is not None and value < size[key]:
            size[key], source[key] = value, where
    for key, value in (qos or {}).items():
        if key in size and value < size[key]:
            size[key], source[key] = value, f"MaxTRES of QOS {partition.qos}"
    return NodeSize(partition.name, size, source)


@dataclass(frozen=True)
class CapPlan:
    """What to pass as ``--resources``, what was changed (notes) and what cannot be run (errors)."""

    caps: dict[str, int | str]
    notes: list[str]
    errors: list[str]


def fit_caps(caps: dict[str, int | str], typed: bool, size: NodeSize) -> CapPlan:
    """Fit the group caps to ``size``: clamp the profile's, refuse typed ones above the node, fill missing ones.

    ``caps``: the ``--resources`` in effect (the command line's when ``typed``,
    else the profile's); other resources in it pass through unchanged.
    """
    out = dict(caps)
    notes, errors = [], []
    where = "--resources on the command line" if typed else "the profile's resources:"
    for key in CAPS:
        have = size.size[key]
        if key not in caps:
            out[key] = have
            notes.append(f"{key} not capped by {where}: capped at {have} ({size.source[key]})")
            continue
        want = int(caps[key])
        if want <= have:
            continue
        if key == "gpu" and have == 0:
            continue  # sbatch refuses a GPU job here: better than a GPU cell silently run on CPUs
        if typed:
            errors.append(
                f"--resources {key}={want} asks {want} {_WHAT[key]} per job, but a node of partition "
                f"{size.partition} holds {have} ({size.source[key]}): pass --resources {key}={have} "
                f"(or another partition: export SBATCH_PARTITION=...)"
            )
        else:
            out[key] = have
            notes.append(f"{key}={want} ({where}) is more than a node holds: clamped to {have} ({size.source[key]})")
    return CapPlan(out, notes, errors)
