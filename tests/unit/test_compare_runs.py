"""benchmarks/compare_runs.py: two report folders of one study, their differences and flipped verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ..bench_loader import load_benchmark

compare_runs = load_benchmark("compare_runs")


def _report(folder: Path, acc: dict[str, list[float]], lrs: dict[str, float], sha: str, verdicts: list[str]) -> Path:
    """A report folder: summary.csv (two data sets) and the summary.md lines the script reads."""
    folder.mkdir()
    rows = [{"method": m, "a": x, "b": y, "mean": (x + y) / 2, "complete": True,
             "a:config": json.dumps({"lr": lrs[m]}), "b:config": json.dumps({"lr": 0.1})}
            for m, (x, y) in acc.items()]  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    lines = [f"Data: x, backbone checkpoint sha256 {sha}. Computed with torch 2.4.0 and peft-core 0.1.0.", "",
             "## Findings (checked on these numbers)", "", *[f"- {v}: claim {i}" for i, v in enumerate(verdicts)],
             "", "## Test accuracy"]  # fmt: skip
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    return folder


def test_differences_choices_and_flipped_verdicts(tmp_path, capsys):
    a = _report(tmp_path / "a", {"lora": [80.0, 70.0], "ssf": [60.0, 50.0]}, {"lora": 0.01, "ssf": 0.1}, "aaa",
                ["holds", "does not hold"])  # fmt: skip
    b = _report(tmp_path / "b", {"lora": [70.0, 70.0], "ssf": [61.0, 50.0]}, {"lora": 0.03, "ssf": 0.1}, "bbb",
                ["holds", "holds"])  # fmt: skip
    assert compare_runs.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "run A: backbone checkpoint aaa, torch 2.4.0" in out and "run B: backbone checkpoint bbb" in out
    assert "another configuration chosen on validation: 1 of 4" in out
    assert "largest 10.0 (a / lora: 80.0 -> 70.0); 1 of 4 move by more than 5" in out
    assert "method Mean, |B - A| (points): median 2.75, largest 5.00 (lora: 75.00 -> 70.00)" in out
    assert "| claim 0 | holds | holds |  |" in out
    assert "| claim 1 | does not hold | holds | FLIPS |" in out


def test_a_folder_without_a_report_is_named(tmp_path, capsys):
    a = _report(tmp_path / "a", {"lora": [80.0, 70.0]}, {"lora": 0.01}, "aaa", ["holds"])
    with pytest.raises(SystemExit):
        compare_runs.main([str(a), str(tmp_path / "missing")])
    assert f"{tmp_path / 'missing' / 'summary.csv'}: no such file" in capsys.readouterr().err


def test_a_summary_without_the_columns_it_needs_is_named(tmp_path, capsys):
    a = _report(tmp_path / "a", {"lora": [80.0, 70.0]}, {"lora": 0.01}, "aaa", ["holds"])
    b = _report(tmp_path / "b", {"lora": [80.0, 70.0]}, {"lora": 0.01}, "bbb", ["holds"])
    pd.read_csv(b / "summary.csv").drop(columns=["b", "complete"]).to_csv(b / "summary.csv", index=False)
    with pytest.raises(SystemExit):
        compare_runs.main([str(a), str(b)])
    assert f"{b / 'summary.csv'}: not a study summary (missing columns: b, complete)" in capsys.readouterr().err
