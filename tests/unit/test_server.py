"""The fork server: forwarded commands behave exactly like in-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .. import toycell

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    sock = tmp / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peft_core.cli", "serve", "--socket", str(sock), "--idle-timeout", "120"],
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)


def peft(args: list[str], server: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PEFT_CORE_SERVER"}
    if server is not None:
        env["PEFT_CORE_SERVER"] = str(server)
    return subprocess.run([sys.executable, "-m", "peft_core.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_input_error_is_forwarded_with_exit_status(server, tmp_path):
    out = peft(["train", "--spec", "missing.json", "--train-data", "x", "--eval-data", "y", "--out", "o"], server, tmp_path)
    assert out.returncode != 0
    assert "missing.json" in out.stderr


def test_forwarded_cell_equals_in_process_cell(server, tmp_path):
    toycell.write_inputs(tmp_path)
    cell = toycell.spec("lora", {"rank": 2})
    runs = {}
    for name, sock in (("direct", None), ("served", server)):
        out = peft(toycell.train_args(cell, name), sock, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "acc" in out.stderr  # the child's stderr reached the client's
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["direct"]["accuracy"] == runs["served"]["accuracy"]
    assert runs["direct"]["final_train_loss"] == runs["served"]["final_train_loss"]
