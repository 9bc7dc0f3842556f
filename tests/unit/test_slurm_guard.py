"""peft-core slurm-run without a cluster: sinfo/scontrol/squeue parsing, cap fitting, reasons, the end check.

The samples in tests/unit/data/slurm/ are captured outputs: ``*_testcluster`` from
tests/slurm/start_cluster.sh's cluster (SLURM 22.05), ``*_site`` written in the
same format for a multi-node site with typed GPUs, MaxCPUsPerNode/MaxMemPerNode and a QOS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from peft_core import slurm_guard, slurm_info
from peft_core.slurm_guard import Watchdog, classify_reason

DATA = Path(__file__).parent / "data" / "slurm"


def _read(name: str) -> str:
    return (DATA / name).read_text()


# ----------------------------------------------------------------- sinfo / scontrol


def test_partitions_of_the_test_cluster():
    parts = slurm_info.parse_partitions(_read("scontrol_partition_testcluster.txt"))
    assert sorted(parts) == ["ci", "debug"]
    assert parts["debug"].default and not parts["ci"].default
    assert parts["ci"].qos is None and parts["ci"].max_cpus_per_node is None and parts["ci"].max_mem_per_node_mb is None
    assert slurm_info.pick_partition(parts, None).name == "debug"
    assert slurm_info.pick_partition(parts, "ci").name == "ci"
    with pytest.raises(ValueError, match="'gpu' does not exist"):
        slurm_info.pick_partition(parts, "gpu")


def test_node_size_of_the_test_cluster_is_the_node():
    part = slurm_info.parse_partitions(_read("scontrol_partition_testcluster.txt"))["ci"]
    nodes = slurm_info.parse_sinfo_nodes(_read("sinfo_nodes_testcluster.txt"))
    assert nodes == [slurm_info.Node("vm", 2, 18113, 2, "idle")]
    assert slurm_info.node_size(part, nodes).size == {"cpus_per_task": 2, "mem_mb": 18113, "gpu": 2}


def test_node_size_of_a_site_partition_with_limits_and_qos():
    part = slurm_info.parse_partitions(_read("scontrol_partition_site.txt"))["gpu"]
    assert (part.qos, part.max_cpus_per_node, part.max_mem_per_node_mb, part.max_nodes) == ("gpu_part", 32, 256000, None)
    nodes = slurm_info.parse_sinfo_nodes(_read("sinfo_nodes_site_gpu.txt"))
    assert [n.gpus for n in nodes] == [4, 4, 4, 4, 4]  # gpu:v100:2,gpu:t4:2(S:0) is 4 too
    qos = slurm_info.parse_qos_limits(_read("sacctmgr_qos_gpu_part.txt"))
    assert qos == {"cpus_per_task": 16, "gpu": 2, "mem_mb": 200 * 1024}
    size = slurm_info.node_size(part, nodes, qos)
    assert size.size == {"cpus_per_task": 16, "mem_mb": 204800, "gpu": 2}
    assert size.source["cpus_per_task"] == "MaxTRES of QOS gpu_part"
    # without the QOS: the partition's MaxCPUsPerNode/MaxMemPerNode bound the 64-CPU/515 GB nodes
    assert slurm_info.node_size(part, nodes).size == {"cpus_per_task": 32, "mem_mb": 256000, "gpu": 4}


@pytest.mark.parametrize(
    "text, mb", [("18113", 18113), ("18113M", 18113), ("64G", 65536), ("1.5T", 1572864), ("UNLIMITED", None)]
)
def test_memory_units(text, mb):
    assert slurm_info.parse_mem_mb(text) == mb


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4),
                                        ("gpu:a100:2,shard:8,gpu:v100:1", 3), ("gpu:a100:4(S:0,1)", 4)])  # fmt: skip
def test_gres_gpus(gres, gpus):
    assert slurm_info.parse_gres_gpus(gres) == gpus


def test_key_values_keep_values_with_spaces_and_equals():
    kv = slurm_info.parse_key_values("NodeName=vm OS=Linux 6.1 #1 SMP  RealMemory=18113 CfgTRES=cpu=2,mem=18113M")
    assert kv == {"NodeName": "vm", "OS": "Linux 6.1 #1 SMP", "RealMemory": "18113", "CfgTRES": "cpu=2,mem=18113M"}


# ----------------------------------------------------------------- fitting the caps

NODE = slurm_info.NodeSize("ci", {"cpus_per_task": 2, "mem_mb": 18113, "gpu": 2},
                           dict.fromkeys(("cpus_per_task", "mem_mb", "gpu"), "largest node of partition ci"))  # fmt: skip


def test_profile_caps_are_clamped_to_the_node():
    plan = slurm_info.fit_caps({"cpus_per_task": "8", "mem_mb": "32000", "gpu": "1"}, typed=False, size=NODE)
    assert plan.caps == {"cpus_per_task": 2, "mem_mb": 18113, "gpu": "1"} and not plan.errors
    assert plan.notes == [
        "cpus_per_task=8 (the profile's resources:) is more than a node holds: clamped to 2 (largest node of partition ci)",
        "mem_mb=32000 (the profile's resources:) is more than a node holds: clamped to 18113 (largest node of partition ci)",
    ]


def test_typed_caps_above_the_node_stop_with_the_flag():
    plan = slurm_info.fit_caps({"cpus_per_task": "4", "mem_mb": "8000", "gpu": "1", "foo": "3"}, typed=True, size=NODE)
    assert plan.errors == [
        "--resources cpus_per_task=4 asks 4 CPUs per job, but a node of partition ci holds 2 (largest node of "
        "partition ci): pass --resources cpus_per_task=2 (or another partition: export SBATCH_PARTITION=...)"
    ]
    assert plan.caps["foo"] == "3"


def test_missing_caps_are_set_to_the_node_and_gpu_cap_kept_on_a_cpu_partition():
    cpu_node = slurm_info.NodeSize("cpu", {"cpus_per_task": 64, "mem_mb": 250000, "gpu": 0}, NODE.source)
    plan = slurm_info.fit_caps({"cpus_per_task": "8", "gpu": "1"}, typed=True, size=cpu_node)
    # gpu=1 stays: sbatch refuses a GPU job on GPU-less nodes, a gpu=0 cap would run GPU cells on CPUs
    assert plan.caps == {"cpus_per_task": "8", "gpu": "1", "mem_mb": 250000} and not plan.errors
    assert plan.notes == ["mem_mb not capped by --resources on the command line: capped at 250000 (largest node of partition ci)"]


def test_option_parsing_keeps_everything_else(tmp_path):
    argv = ["--configfile", "c.yaml", "--resources", "cpus_per_task=4", "mem_mb=8000", "-n", "--res=gpu=1"]
    rest, values = slurm_guard._option_values(argv, ("--resources", "--res"))
    assert rest == ["--configfile", "c.yaml", "-n"] and values == ["gpu=1"]  # the last one wins, as in argparse
    assert slurm_guard._option_values(["--profile", "p", "all"], ("--profile",), nargs=1) == (["all"], ["p"])
    assert slurm_guard.wanted_partition(["--default-resources", "mem_mb=1", "slurm_partition=gpu"], {}) == "gpu"
    assert slurm_guard.wanted_partition([], {"SBATCH_PARTITION": "ci"}) == "ci"
    (tmp_path / "config.v8+.yaml").write_text("resources:\n  cpus_per_task: 8\n  mem_mb: 32000\n")
    assert slurm_guard.profile_resources(tmp_path) == {"cpus_per_task": "8", "mem_mb": "32000"}
    own, rest = slurm_guard.split_own_args(["--poll-seconds", "2", "--no-preflight", "--", "--poll-seconds", "x"])
    assert own == {"--poll-seconds": 2.0, "--no-preflight": True} and rest == ["--poll-seconds", "x"]
    assert slurm_guard.split_own_args(["--configfile", "c.yaml"]) == ({}, ["--configfile", "c.yaml"])


def test_profile_caps_match_the_repository_profile():
    profile = Path(__file__).resolve().parents[2] / "profiles" / "slurm"
    assert set(slurm_guard.profile_resources(profile)) >= set(slurm_info.CAPS)


# ----------------------------------------------------------------- pending reasons


@pytest.mark.parametrize(
    "reason, kind",
    [
        ("PartitionConfig", "fatal"), ("PartitionNodeLimit", "fatal"), ("PartitionTimeLimit", "fatal"),
        ("QOSMaxCpuPerJobLimit", "fatal"), ("QOSMaxMemoryPerJob", "fatal"), ("QOSMaxGRESPerNode", "fatal"),
        ("AssocMaxWallDurationPerJobLimit", "fatal"), ("QOSMinCpuNotSatisfied", "fatal"), ("BadConstraints", "fatal"),
        ("InvalidAccount", "fatal"), ("JobHoldMaxRequeue", "fatal"),
        ("Resources", "wait"), ("Priority", "wait"), ("None", "wait"), ("(null)", "wait"), ("BeginTime", "wait"),
        ("ReqNodeNotAvail, UnavailableNodes:g[01-02]", "notice"), ("PartitionDown", "notice"),
        ("JobHeldUser", "notice"), ("JobHeldAdmin", "notice"), ("QOSMaxCpuPerUserLimit", "notice"),
        ("AssocGrpCpuLimit", "notice"), ("QOSMaxJobsPerUserLimit", "notice"), ("SomethingNew", "notice"),
    ],
)  # fmt: skip
def test_reason_classes(reason, kind):
    assert classify_reason(reason) == kind


def test_watchdog_needs_two_polls_and_reports_notices_once():
    rows = slurm_guard.parse_squeue(_read("squeue_run.txt"))
    assert rows[0] == {"id": "12", "state": "PENDING", "reason": "PartitionConfig", "name": "rule_train_pack"}
    dog = Watchdog()
    stuck, notices = dog.update(rows)
    assert stuck == [] and [r["id"] for r in notices] == ["15"]
    stuck, notices = dog.update(rows)
    assert [r["id"] for r in stuck] == ["12", "16"] and notices == []
    assert slurm_guard.stuck_line(stuck[0]) == (
        "slurm-run: job 12 (rule_train_pack) is PENDING for PartitionConfig, which waiting cannot resolve"
    )
    # a job whose reason changed in between (it was re-evaluated) starts over
    fresh = Watchdog()
    fresh.update(rows)
    assert fresh.update([{**rows[0], "reason": "Resources"}])[0] == []


# ----------------------------------------------------------------- the end check


def test_missing_targets_line(tmp_path):
    (tmp_path / "a").write_text("")
    files = [tmp_path / n for n in ("a", "b", "c")]
    missing = slurm_guard.missing_targets(files)
    assert missing == [str(tmp_path / "b"), str(tmp_path / "c")]
    assert slurm_guard.missing_line(missing) == f"slurm-run: 2 requested target(s) missing at the end of the run: {missing[0]}, {missing[1]}"
    assert slurm_guard.missing_line([str(i) for i in range(7)]).endswith(": 0, 1, 2, 3, 4 and 2 more")


def test_a_zero_exit_with_missing_targets_fails(tmp_path, capsys):
    """A Snakemake that says 0 but left a requested target undone (as a deadlocked DAG does): exit 4, one line."""
    fake = tmp_path / "fake_snakemake.py"
    fake.write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.environ['REPO'])\n"
        "from peft_core.slurm_guard import write_targets\n"
        f"write_targets(os.environ['PEFT_TARGETS_FILE'], [{str(tmp_path / 'done')!r}, {str(tmp_path / 'never')!r}])\n"
        f"open({str(tmp_path / 'done')!r}, 'w').close()\n"
    )
    os.environ["REPO"] = str(Path(__file__).resolve().parents[2])
    try:
        rc = slurm_guard.run([], poll_seconds=0.1, preflight_on=False, snakemake=[sys.executable, str(fake)])
    finally:
        del os.environ["REPO"]
    err = capsys.readouterr().err
    assert rc == slurm_guard.EXIT_MISSING
    assert f"slurm-run: 1 requested target(s) missing at the end of the run: {tmp_path / 'never'}" in err
