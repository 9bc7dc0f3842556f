"""benchmarks/halving_replay.py: a setting replayed from per-budget records, as the workflow runs it.

The workflow's own run is compared in tests/workflow/test_halving_study.py (slow); here the
replay's rules on made-up records: rung sizes, promotions by validation accuracy (ties by cell
id), the last rung's choice and the images counted rung by rung.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peft_core.config import load_study

from ..bench_loader import load_benchmark

REPO = Path(__file__).resolve().parents[2]

replay_mod = load_benchmark("halving_replay")


def _configs(acc: dict[int, list[float]]) -> list[dict]:
    """The tiny halving study's 6 LoRA configurations with the given accuracy per budget."""
    specs = load_study(REPO / "tests" / "configs" / "tiny_halving.yaml").tuning_cells("digits", "lora")
    return [
        {"cell": s.cell_id, "spec": s.model_dump(mode="json"),
         "records": {str(b): {"accuracy": a[i], "status": "ok", "eval_split": "val200", "n_train": 800,
                              "trainable_params": 100 + i} for b, a in acc.items()}}
        for i, s in enumerate(specs)
    ]  # fmt: skip


def test_ladder_is_every_budget_of_every_setting():
    assert replay_mod.ladder([(3, 2), (2, 1)], 6) == [1, 2, 4, 6]
    assert replay_mod.with_noise([(3, 2)], [1.96]) == [(3, 2, None), (3, 2, 1.96)]
    assert replay_mod.ladder(replay_mod.with_noise([(3, 2)], [1.0]), 6) == [2, 6]


def test_noise_aware_replay_keeps_what_is_within_noise_of_the_best():
    # at 2 epochs 0.50 leads; 0.45 is within 1.96 se on 200 images (se 0.05), 0.30 is not
    configs = _configs({2: [0.5, 0.45, 0.3, 0.2, 0.1, 0.0], 6: [0.5, 0.6, 0.9, 0.1, 0.1, 0.1]})
    plain = replay_mod.replay(configs, 3, 2, 6)  # the top 2 continue either way
    noisy = replay_mod.replay(configs, 6, 2, 6, keep_within_se=1.96, n_eval=200)  # the top 1, and what is near it
    assert plain["chosen"] == noisy["chosen"] == configs[1]["cell"]
    assert noisy["images"] == 800 * (6 * 2 + 2 * 4)
    assert replay_mod.replay(configs, 6, 2, 6)["chosen"] == configs[0]["cell"]  # plain eta 6: only the leader
    everything = replay_mod.replay(configs, 3, 2, 6, keep_within_se=100.0, n_eval=200)  # the grid's choice and cost
    grid = replay_mod.grid_choice(configs, 6)
    assert (everything["chosen"], everything["images"]) == (grid["chosen"], grid["images"]) == (configs[2]["cell"], 800 * 36)


def test_replay_promotes_by_validation_and_counts_rung_images():
    configs = _configs({2: [0.1, 0.5, 0.3, 0.5, 0.2, 0.0], 6: [0.9, 0.2, 0.1, 0.4, 0.9, 0.9]})
    out = replay_mod.replay(configs, 3, 2, 6)  # budgets 2, 6; sizes 6, 2
    # configurations 1 and 3 (0.5 at 2 epochs) are promoted; 3 is the better of the two at 6 epochs
    assert out["chosen"] == configs[3]["cell"] and out["val"] == 0.4
    assert out["images"] == 800 * (6 * 2 + 2 * 4)
    grid = replay_mod.grid_choice(configs, 6)  # 0.9 three times: fewest trainable parameters, then order
    assert grid["chosen"] == configs[0]["cell"] and grid["images"] == 800 * 6 * 6


def test_a_tie_at_the_cut_goes_to_the_lower_cell_id():
    configs = _configs({2: [0.5] * 6, 6: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    out = replay_mod.replay(configs, 3, 2, 6)
    first_two = sorted(c["cell"] for c in configs)[:2]
    best = max((c for c in configs if c["cell"] in first_two), key=lambda c: c["records"]["6"]["accuracy"])
    assert out["chosen"] == best["cell"]


def test_the_study_takes_a_demo_data_set_the_demo_config_leaves_out():
    study_cost = load_benchmark("study_cost")
    cfg = study_cost.study_config("grid", ["linear"], ["count", "digits"], 18, 3, 2, [0])
    assert cfg["datasets"] == {"count": {"num_classes": 6, "group": "structured"},
                               "digits": {"num_classes": 10, "group": "natural"}}  # fmt: skip
    assert load_study(cfg).tuning_cells("count", "linear")
    with pytest.raises(SystemExit, match="'dogs' is no demo data set"):
        study_cost.study_config("grid", ["linear"], ["dogs"], 18, 3, 2, [0])


def test_paired_interval_covers_the_mean_and_is_a_point_without_spread():
    lo, hi = replay_mod.paired_ci([-1.0, 0.0, 0.5, -0.5])
    assert lo < -0.25 < hi
    assert replay_mod.paired_ci([0.0, 0.0]) == (0.0, 0.0)


def test_fidelity_needs_four_configurations_and_spread():
    configs = _configs({2: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 6: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]})
    assert replay_mod.fidelity(configs, 2, 6) == pytest.approx(1.0)
    assert replay_mod.fidelity(configs[:3], 2, 6) is None


def test_replicates_pool_each_pair_over_the_seeds_and_compare_the_grid_with_itself(capsys):
    configs = _configs({2: [0.1] * 6, 6: [0.1] * 6})
    cells = [c["cell"] for c in configs]
    test = dict(zip(cells, [50.0, 60.0, 70.0, 80.0, 90.0, 40.0]))  # each choice's test accuracy (%)
    pairs = [("a", "lora"), ("b", "lora")]
    grids = {0: {k: {"chosen": cells[0], "images": 60} for k in pairs},
             1: {pairs[0]: {"chosen": cells[1], "images": 60}, pairs[1]: {"chosen": cells[0], "images": 60}}}
    runs = {0: {(3, 2): {k: {"chosen": cells[2], "images": 20} for k in pairs}},
            1: {(3, 2): {pairs[0]: {"chosen": cells[1], "images": 20}, pairs[1]: {"chosen": cells[3], "images": 20}}}}  # fmt: skip
    replay_mod.replicates({s: (grids[s], runs[s]) for s in (0, 1)}, test, {c: c for c in cells})
    out = capsys.readouterr().out
    # the grid re-run: +10 points on pair a, 0 on b; the same configuration once
    assert "| s = 1 | 1/2 | +5.00 | 5.00 |" in out
    # pooled: pair a (20 + 0) / 2 = 10, pair b (20 + 30) / 2 = 25, mean 17.5; 3x fewer images; 1 of 4 the same
    assert "| 3 | 2 | - | 3.00x | 1/4 | +17.50 |" in out


def test_the_grid_compared_with_itself_by_configuration_not_by_cell(capsys):
    """Another tuning seed gives every configuration another tuning cell id: the same choice still counts."""
    pairs = [("a", "lora")]
    test = {"x0": 50.0, "x1": 50.0}
    grids = {s: {pairs[0]: {"chosen": f"x{s}", "images": 6}} for s in (0, 1)}
    runs = {s: {(3, 2): {pairs[0]: {"chosen": f"x{s}", "images": 2}}} for s in (0, 1)}
    replay_mod.replicates({s: (grids[s], runs[s]) for s in (0, 1)}, test, {"x0": "final", "x1": "final"})
    assert "| s = 1 | 1/1 | +0.00 |" in capsys.readouterr().out


def test_a_choice_is_scored_by_the_mean_of_its_final_seeds_and_a_hole_stays_a_hole():
    ok = lambda acc: {"accuracy": acc, "status": "ok"}  # noqa: E731
    test = replay_mod.scores({"a": [ok(0.5), ok(0.7)], "b": [ok(0.9), {"accuracy": None, "status": "diverged"}]})
    assert test["a"] == pytest.approx(60.0) and math.isnan(test["b"])
    assert replay_mod._difference([1.0, 3.0]) == ("+2.00", "[-10.71, +14.71]")
    mean, ci = replay_mod._difference([1.0, math.nan, 3.0])  # the hole is named, not averaged in
    assert mean == "+2.00" and ci.endswith("(1 of 3 pairs a hole)")
    assert replay_mod._difference([math.nan]) == ("hole", "-")


def test_the_other_final_seeds_train_what_the_grid_or_a_setting_chose():
    grid = {("d", "m"): {"chosen": "g"}}
    runs = {(3, 2, None): {("d", "m"): {"chosen": "h"}}, (3, 2, 1.96): {("d", "m"): {"chosen": "g"}}}
    assert replay_mod.chosen_cells({0: (grid, runs), 1: ({("d", "m"): {"chosen": "k"}}, {})}) == {"g", "h", "k"}


def test_without_every_configurations_final_run_the_random_baseline_is_not_measured(capsys):
    configs = {("digits", "lora"): _configs({2: [0.1, 0.5, 0.3, 0.5, 0.2, 0.0], 6: [0.9, 0.2, 0.1, 0.4, 0.9, 0.9]})}
    grid = {k: replay_mod.grid_choice(c, 6) for k, c in configs.items()}
    runs = {(3, 2, None): {k: replay_mod.replay(c, 3, 2, 6) for k, c in configs.items()}}
    test = {c: 50.0 for c in replay_mod.chosen_cells({0: (grid, runs)})}  # --finals chosen: only what was chosen
    final = ("train800val200", "test", [0, 1, 2])
    replay_mod.report(grid, runs, test, test, configs, [2, 6], 6, final, 1000 * 6 * 3)
    out = capsys.readouterr().out
    assert "a configuration at random: not measured (`--finals chosen`)" in out
    assert "seeds 0 1 2" in out and "| 3 | 2 | - | [2, 6] | 16,000 | 1.80x |" in out
    every = {c["cell"]: 40.0 for c in configs[("digits", "lora")]} | test  # --finals all
    replay_mod.report(grid, runs, test, every, configs, [2, 6], 6, final, 1000 * 6 * 3)
    assert "| a configuration at random (the mean over each pair's configurations; final seed 0 only)" in capsys.readouterr().out


def test_a_configuration_is_trained_by_one_worker_at_a_time(tmp_path):
    """A worker of a killed run still holds its configuration's lock: a new run's worker waits for it."""
    import fcntl
    import json
    import threading

    out = tmp_path / "tune" / "digits" / "lora" / "abc"
    out.mkdir(parents=True)
    (out / "ladder.json").write_text(json.dumps({"cell": "abc", "records": {}}))
    got = []
    with open(out.with_name("abc.lock"), "a+") as held:  # packs.cell_lock's file, beside the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: got.append(replay_mod._train({"out": str(out), "spec": {}})))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not got  # waiting for the lock, nothing read or removed
    worker.join(5)
    assert got == [{"cell": "abc", "records": {}}]
