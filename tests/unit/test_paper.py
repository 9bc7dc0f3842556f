"""The paper-ready outputs: LaTeX tables compile (or are well-formed), figures are deterministic,
colours are fixed per method, costs and what-changed are right on hand-made tables."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from peft_core import costs, figures, latex
from peft_core.report import build_report

from .test_report_holes import study, synthetic  # noqa: F401 (fixture)

ENGINE = shutil.which("pdflatex")


def _rows(tex: str) -> list[str]:
    body = tex[tex.index("\\midrule") : tex.index("\\bottomrule")]
    return [r.replace("\\midrule", "").strip() for r in body.split("\\\\") if "&" in r]


def check_structure(tex: str) -> None:
    """What a LaTeX engine would refuse, checked without one: environments, braces, columns."""
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") >= 1
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == tex.count("\\toprule") == tex.count("\\bottomrule")
    assert tex.count("{") - tex.count("\\{") == tex.count("}") - tex.count("\\}")
    for spec, body in re.findall(r"\\begin\{tabular\}\{(.+?)\}\n(.*?)\\end\{tabular\}", tex, re.S):
        ncols = len(re.sub(r">\{.*?\}|\{.*?\}", "", spec))
        for row in body.split("\\\\")[:-1]:
            row = row.split("\\midrule")[-1].split("\\toprule")[-1]
            if "multicolumn" in row or not row.strip():
                continue
            assert row.count("&") - row.count("\\&") == ncols - 1, row


@pytest.fixture(scope="module")
def built(study, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report")
    table = out / "t.parquet"
    synthetic().to_parquet(table, index=False)
    build_report(study, [table], out / "report")
    return out / "report"


def test_accuracy_table_marks_best_and_second_among_complete_methods(built):
    tex = (built / "tables" / "accuracy.tex").read_text()
    check_structure(tex)
    assert "\\usepackage{booktabs" in tex and "\\toprule" in tex and "\\cmidrule" in tex
    rows = {r.split("&")[0].strip(): r for r in _rows(tex)}
    # on a: adapter 61.0 (best complete), linear 50.5 (second); lora 91.0 has a hole and is never marked
    assert "\\textbf{61.0}{\\scriptsize$\\pm$1.0}" in rows["adapter"]
    assert "\\underline{50.5}" in rows["linear"]
    assert "\\textbf" not in rows["lora"] and "--" in rows["lora"]
    assert "Params (M)" in tex and "PPT" in tex and "Nat." in tex and "Struct." in tex
    assert list(rows) == ["linear", "adapter", "lora"]  # complete methods first, the one with a hole after the rule


def test_every_table_is_well_formed_and_compiles(built, tmp_path):
    for name in ("accuracy", "selection", "published", "costs"):
        check_structure((built / "tables" / f"{name}.tex").read_text())
    if ENGINE is None:
        pytest.skip("no LaTeX engine (apt-get install texlive-latex-recommended); structure checked only")
    shutil.copytree(built / "tables", tmp_path / "tables")
    out = subprocess.run([ENGINE, "-interaction=nonstopmode", "-halt-on-error", "tables.tex"], cwd=tmp_path / "tables",
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "tables" / "tables.pdf").stat().st_size > 0
    assert "Overfull" not in out.stdout


def test_escape_and_marks():
    assert latex.escape("fact_tt & 50% {x}") == "fact\\_tt \\& 50\\% \\{x\\}"
    assert latex.marks([1.0, 3.0, 2.0, 3.0, math.nan], [True, True, True, True, True]) == ["", "best", "second", "best", ""]
    assert latex.marks([5.0, 3.0, 2.0], [False, True, True]) == ["", "best", "second"]


def test_figures_are_byte_identical_when_regenerated(built, tmp_path):
    summ = pd.DataFrame({"method": ["linear", "lora", "full"], "mean": [50.0, 70.0, 72.0], "params": [0, 8e3, 8e7]})
    digests = []
    for i in range(2):
        paths = figures.save_figure(figures.accuracy_vs_params(summ), tmp_path / str(i), "acc")
        digests.append({f: hashlib.sha256(p.read_bytes()).hexdigest() for f, p in paths.items()})
    assert digests[0] == digests[1]
    pdf = (tmp_path / "0" / "acc.pdf").read_bytes()
    assert b"/FontFile2" in pdf and b"/CreationDate" not in pdf  # TrueType fonts embedded (fonttype 42), no date
    svg = (tmp_path / "0" / "acc.svg").read_text()
    assert "<dc:date>" not in svg
    for stem in ("accuracy_params", "rank_heatmap", "sensitivity", "cd_all", "cd_natural", "cd_structured"):
        for fmt in ("pdf", "svg", "png"):
            assert (built / "figures" / f"{stem}.{fmt}").stat().st_size > 0


def test_every_known_method_has_its_own_fixed_style():
    styles = [tuple(figures.method_style(m).values()) for m in figures.KNOWN_METHODS]
    assert len(set(styles)) == len(styles)
    assert figures.method_style("lora") == figures.method_style("lora", ("mine", "lora"))
    assert figures.method_style("mine", ("x", "mine")) != figures.method_style("x", ("x", "mine"))


def _cells(**over):
    base = {"dataset": "d", "stage": "final", "status": "ok", "device": "cpu", "precision": "fp32",
            "peak_memory_mb": 100.0, "images_per_s": 10.0}  # fmt: skip
    rows = [
        {**base, "method": "a", "cell": "a0", "seed": 0, "accuracy": 0.50, "wall_time_s": 10.0},
        {**base, "method": "a", "cell": "a1", "seed": 1, "accuracy": 0.60, "wall_time_s": 30.0, "peak_memory_mb": 300.0},
        {**base, "method": "b", "cell": "b0", "seed": 0, "accuracy": 0.70, "wall_time_s": 5.0, "device": "cuda",
         "precision": "bf16", "images_per_s": 40.0},
    ]  # fmt: skip
    return pd.DataFrame(rows).assign(**over)


def test_cost_frame_per_method():
    c = costs.cost_frame(_cells(), ["b", "a"]).set_index("method")
    assert list(c.index) == ["b", "a"]
    assert c.loc["a", "cells"] == 2 and c.loc["a", "s_per_cell"] == 20 and c.loc["a", "total_h"] == pytest.approx(40 / 3600)
    assert c.loc["a", "peak_memory_mb"] == 300 and c.loc["b", "device"] == "cuda" and c.loc["b", "precision"] == "bf16"
    mixed = costs.cost_frame(_cells().assign(device=["cpu", "cuda", "cpu"])).set_index("method")
    assert mixed.loc["a", "device"] == "mixed (cpu, cuda)"


def test_history_and_what_changed(tmp_path):
    before = _cells()
    assert costs.keep_history(before, tmp_path) is None  # first report: nothing to compare with
    now = before.copy()
    now.loc[now.cell == "a1", ["accuracy", "wall_time_s"]] = [0.80, 31.0]  # a1 retrained
    now = pd.concat([now, now.iloc[[2]].assign(cell="b1", seed=1, accuracy=0.9)])  # a new seed of b
    base = costs.keep_history(now, tmp_path)
    assert base is not None and set(base.cell) == {"a0", "a1", "b0"}
    assert costs.keep_history(now, tmp_path)["cell"].tolist() == base.cell.tolist()  # a rebuild keeps the baseline
    ch = costs.changes(now, base, ["a", "b"])
    assert ch["cells"].set_index("cell").why.to_dict() == {"a1": "retrained", "b1": "new"}
    moves = ch["moves"].set_index("method")
    assert moves.loc["a", "before"] == pytest.approx(55) and moves.loc["a", "after"] == pytest.approx(65)
    assert moves.loc["a", "delta"] == pytest.approx(10) and moves.loc["a", "largest_move"] == "d +10.00"
    assert moves.loc["b", "delta"] == pytest.approx(10)  # mean of 70 and 90 vs 70


def test_report_command_imports_no_model_or_plotting_code():
    code = ("import sys, peft_core.cli, peft_core.report, peft_core.stats, peft_core.paper, peft_core.latex; "
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'scikit_posthocs') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_cd_diagram_is_the_same_in_every_process(tmp_path):
    """No set or dict order may leak into the drawing (string hashes differ between processes)."""
    code = ("import sys, pandas as pd; from pathlib import Path; from peft_core import figures, stats; "
            "t = pd.DataFrame({m: [90 - 7 * i + (i * j) % 5 for j in range(6)] for i, m in enumerate("
            "['lora', 'full', 'ssf', 'bitfit', 'vpt_deep', 'linear'])}); "
            "figures.save_figure(figures.cd_diagram(stats.rank_test(t)), Path(sys.argv[1]), 'cd')")  # fmt: skip
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env, check=True, timeout=120)
    for fmt in ("pdf", "svg", "png"):
        assert (tmp_path / "1" / f"cd.{fmt}").read_bytes() == (tmp_path / "2" / f"cd.{fmt}").read_bytes(), fmt
