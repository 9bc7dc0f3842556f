"""The prestep stage (peft_core/prestep.py): its identity, its file, and the cells that read it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from peft_core import cli
from peft_core.cells import final_cells
from peft_core.errors import InputError
from peft_core.merge import load_cell_model
from peft_core.packs import reuse_verdict
from peft_core.prestep import PRESTEP, prestep_spec, read_prestep, run_prestep
from peft_core.results import read_json

from .. import toycell


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    toycell.write_inputs(tmp_path, n_train=48, n_eval=24)
    torch.set_num_threads(1)
    return tmp_path


def _pspec(cell):
    return prestep_spec(cell, "train800", "val200", seed=0)


def test_identity_depends_on_what_the_step_reads_only():
    a = toycell.spec("gps", {"k": 1}, lr=0.01)
    b = toycell.spec("gps", {"k": 1}, lr=0.001, weight_decay=0.1)
    assert _pspec(a).key == _pspec(b).key  # the optimiser grid shares one result
    assert _pspec(toycell.spec("gps", {"k": 2})).key != _pspec(a).key
    assert _pspec(toycell.spec("gps", {"k": 1}, dataset="other")).key != _pspec(a).key
    final = final_cells(a, [3], "train800val200", "test")[0]
    assert _pspec(final).train_split == "train800val200" and _pspec(final).eval_split is None
    assert _pspec(toycell.spec("lora")) is None


def _run(cell, out="p.safetensors"):
    run_prestep(_pspec(cell), "train.pt", None, "backbone.safetensors", out, device="cpu", log=lambda _m: None)
    return out


def test_result_file_summary_and_cell_that_reads_it(toy, capsys):
    cell = toycell.spec("gps", {"k": 1}, epochs=1)
    path = _run(cell)
    pspec, tensors = read_prestep(path)
    assert pspec == _pspec(cell) and "blocks.0.attn.qkv" in tensors
    summary = read_json(toy / "p.json")
    assert summary["key"] == pspec.key and summary["inputs"]["train"]["split"] == "train800"
    assert summary["trainable_params"] == 2 * (4 * (192 + 64 + 256 + 64) + 64)  # (k + 1) x neurons of TINY

    assert cli.main(toycell.train_args(cell, "cell") + ["--prestep", path]) == 0
    metrics = read_json(toy / "cell" / "metrics.json")
    assert metrics["inputs"]["prestep"]["sha256"] == __import__("hashlib").sha256(open(path, "rb").read()).hexdigest()
    assert (toy / "cell" / PRESTEP).read_bytes() == (toy / path).read_bytes()
    # the kept copy rebuilds the trained model exactly: its logits are the recorded ones
    _, model = load_cell_model(toy / "cell", None)
    x = torch.load("eval.pt", weights_only=True)["images"].float() / 255
    with torch.no_grad():
        logits = model(x).numpy()
    recorded = pd.read_parquet(toy / "cell" / "predictions.parquet")
    assert abs(logits - __import__("numpy").stack(recorded["logits"])).max() < 1e-5


def test_a_changed_result_retrains_and_an_identical_recomputation_reuses(toy):
    from peft_core.fingerprint import cell_inputs
    from peft_core.packs import read_code_stamp  # noqa: F401  (cells below carry no code stamp)

    cell = toycell.spec("sct", {"channels": 4}, epochs=1)
    path = _run(cell)
    assert cli.main(toycell.train_args(cell, "cell") + ["--prestep", path]) == 0
    args = ("train800", "train.pt", "val200", "eval.pt", "backbone.safetensors")
    _run(cell)  # recomputed: the same bytes
    assert reuse_verdict(toy / "cell", cell, None, cell_inputs(*args, prestep=path))[1] == ""
    _, tensors = read_prestep(path)
    from safetensors.torch import save_file

    tensors["blocks.0.channels"] = tensors["blocks.0.channels"].flip(0)
    save_file(tensors, path, metadata={"prestep": _pspec(cell).canonical_json()})
    assert reuse_verdict(toy / "cell", cell, None, cell_inputs(*args, prestep=path))[1] == "prestep result changed"


def test_errors_are_one_line_and_come_before_compute(toy, capsys):
    sct4 = toycell.spec("sct", {"channels": 4}, epochs=1)
    assert cli.main(toycell.train_args(sct4, "c1")) == 2
    assert "chooses from the data first: give its prestep result (--prestep)" in capsys.readouterr().err
    path = _run(sct4)
    sct8 = toycell.spec("sct", {"channels": 8}, epochs=1)
    assert cli.main(toycell.train_args(sct8, "c2") + ["--prestep", path]) == 2
    assert "none of the prestep results given (1) was made for this cell" in capsys.readouterr().err
    assert cli.main(toycell.train_args(toycell.spec("lora"), "c3") + ["--prestep", path]) == 2
    assert "has no prestep" in capsys.readouterr().err
    (toy / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert cli.main(toycell.train_args(sct4, "c4") + ["--prestep", "bad.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.safetensors: not a prestep result" in err and len(err.splitlines()) == 1
    assert not any((toy / c).exists() for c in ("c1", "c2", "c3", "c4"))


def test_cli_prestep_and_final_runs_pick_their_result(toy, capsys):
    cell = toycell.spec("sct", {"channels": 4}, epochs=1)
    pspec = _pspec(cell)
    args = ["prestep", "--spec-json", pspec.canonical_json(), "--train-data", "train.pt",
            "--checkpoint", "backbone.safetensors", "--out", "r.safetensors", "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert read_prestep("r.safetensors")[0] == pspec
    other = _run(toycell.spec("sct", {"channels": 6}), "r6.safetensors")
    from peft_core.prestep import pick_prestep

    assert str(pick_prestep([other, "r.safetensors"], cell)) == "r.safetensors"
    assert cli.main(["prestep", "--spec-json", '{"method": "sct"}', "--train-data", "train.pt", "--out", "x"]) == 2
    assert "prestep spec" in capsys.readouterr().err
