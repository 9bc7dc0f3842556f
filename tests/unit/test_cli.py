"""The ``peft-core`` commands a user types, as a user sees them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peft_core.cli import main


def test_params_json_for_lora_on_vit_b16(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--set", "rank=8", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"trainable": 294_912, "head": 768 * 1000 + 1000, "backbone": 85_798_656}


def test_params_bad_hyper_parameter_is_one_line(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--set", "rank=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-core: error: methods.lora.rank: ") and "\n" not in err


def test_params_unknown_method(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "lorax"]) == 2
    assert "unknown method 'lorax'" in capsys.readouterr().err


def test_params_selective_block_out_of_range(capsys):
    argv = ["params", "--backbone", "vit_base_patch16_224", "--method", "selective", "--set", "blocks=[12]"]
    assert main(argv) == 2
    assert "selective.blocks" in capsys.readouterr().err


def test_methods_lists_every_method_with_mergeability(capsys):
    from peft_core.methods import list_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    # every method with a grid file is registered and listed (an empty registry would pass a loop over it)
    grids = {p.stem for p in (Path(__file__).resolve().parents[2] / "config" / "method_grids").glob("*.yaml")}
    assert grids and grids <= set(list_methods())
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(list_methods()) <= listed, set(list_methods()) - listed
    assert "lora" in out and "not mergeable" in out and "rank=8" in out


def test_validate_reports_field_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\n")
    out = subprocess.run([sys.executable, "-m", "peft_core.cli", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("peft-core: error: data: ")


@pytest.mark.parametrize("cmd", ["train", "select", "aggregate", "report", "merge", "params", "cache"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as stop:
        main([cmd, "--help"])
    assert stop.value.code == 0


def test_wise_eval_argument_must_name_the_split(capsys):
    assert main(["wise", "--cell", "c", "--eval", "test.pt", "--out", "w.parquet"]) == 2
    assert "--eval 'test.pt': expected NAME=" in capsys.readouterr().err
