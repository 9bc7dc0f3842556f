"""The fork server: forwarded commands behave exactly like in-process ones, and it runs nothing else.

Every forwarded run is checked against the server's log ("client pid P:
forked pid C"), so a client that silently fell back to running in-process
fails the test instead of passing it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peft_core import server as srv
from peft_core.errors import InputError

from .. import toycell

REPO = Path(__file__).resolve().parents[2]
# A forwarded command that fails fast, with an input error naming the file.
MISSING_SPEC = ["train", "--spec", "missing.json", "--train-data", "x", "--eval-data", "y", "--out", "o"]


def _env(sock: Path | None) -> dict[str, str]:
    """This checkout's peft_core (not whichever one is installed), with or without the server."""
    env = {k: v for k, v in os.environ.items() if k != srv.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if sock is not None:
        env[srv.ENV_VAR] = str(sock)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    sock, log = tmp / "run" / "s.sock", tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peft_core.cli", "serve", "--socket", str(sock), "--idle-timeout", "120"],
            cwd=REPO, env=_env(None), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
        time.sleep(0.1)
    yield sock, log
    proc.terminate()
    proc.wait(timeout=10)


def peft(args: list[str], sock: Path | None, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run `peft-core args` (forwarded when ``sock`` is given); its result and its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "peft_core.cli", *args], cwd=cwd, env=_env(sock),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), proc.pid


def forwarded(log: Path, client_pid: int, timeout: float = 10.0) -> bool:
    """Whether the server forked a child for the client ``client_pid`` (its log says so)."""
    needle = f"client pid {client_pid}: forked pid "
    deadline = time.monotonic() + timeout
    while needle not in log.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_input_error_is_forwarded_with_exit_status(server, tmp_path):
    sock, log = server
    out, pid = peft(MISSING_SPEC, sock, tmp_path)
    assert out.returncode != 0
    assert "missing.json" in out.stderr
    assert forwarded(log, pid), f"ran in-process, not in the server's child:\n{log.read_text()}"


def test_forwarded_cell_equals_in_process_cell(server, tmp_path):
    sock, log = server
    toycell.write_inputs(tmp_path)
    cell = toycell.spec("lora", {"rank": 2})
    runs = {}
    for name, via in (("direct", None), ("served", sock)):
        out, pid = peft(toycell.train_args(cell, name), via, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "acc" in out.stderr  # the child's stderr reached the client's
        # the served run went through a forked child, the direct one did not
        assert forwarded(log, pid, timeout=10.0 if via else 0.0) == (via is not None), log.read_text()
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["direct"]["accuracy"] == runs["served"]["accuracy"]
    assert runs["direct"]["final_train_loss"] == runs["served"]["final_train_loss"]


# ------------------------------------------------------------------ the socket


def test_socket_is_private(server):
    sock, _ = server
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert not sock.parent.stat().st_mode & stat.S_IWOTH


def test_world_writable_socket_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(InputError, match="world-writable"):
        srv.serve(shared / "s.sock", idle_timeout=0)
    assert not (shared / "s.sock").exists()


def test_cli_forwards_only_what_the_server_runs():
    from peft_core.cli import FORWARDED

    assert FORWARDED <= srv.ALLOWED
    assert "serve" not in srv.ALLOWED and "merge" not in srv.ALLOWED


# ------------------------------------------------------------------ requests, in-process


def _request(argv: list[str]) -> bytes:
    data = json.dumps({"argv": argv, "cwd": "/", "env": {}}).encode()
    return srv._HEADER.pack(len(data)) + data


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reply(client: socket.socket) -> str | int:
    """The server's answer: the refusal's reason, or the exit status."""
    client.settimeout(5)
    (rc,) = srv._RC.unpack(srv._recv_exact(client, 4))
    if rc != srv.REFUSED:
        return rc
    (size,) = srv._HEADER.unpack(srv._recv_exact(client, 4))
    return srv._recv_exact(client, size).decode()


@pytest.fixture
def pair():
    """A connected (server side, client side) pair and two descriptors to send along."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    yield a, b, [r, w]
    for s in (a, b):
        s.close()
    for fd in (r, w):
        os.close(fd)


def test_request_arriving_in_pieces_is_read_whole(pair):
    conn, client, fds = pair
    msg = _request(["train", "--spec", "x" * 5000])

    def dribble():  # the descriptors with the first byte, then one small piece at a time
        socket.send_fds(client, [msg[:1]], fds)
        for i in range(1, len(msg), 7):
            client.sendall(msg[i : i + 7])
            time.sleep(0.0005 if i < 100 else 0)

    sender = threading.Thread(target=dribble)
    sender.start()
    got = srv._accept_request(conn)
    sender.join()
    assert got is not None
    request, received = got
    assert request["argv"] == ["train", "--spec", "x" * 5000] and len(received) == 2
    for fd in received:
        os.close(fd)


@pytest.mark.parametrize("cut", [2, 4, 30], ids=["in-header", "after-header", "in-body"])
def test_truncated_request_never_runs(pair, cut, capsys):
    conn, client, fds = pair
    before = _open_fds()
    socket.send_fds(client, [_request(["train", "--out", "o"])[:cut]], fds)
    client.shutdown(socket.SHUT_WR)
    assert srv._accept_request(conn) is None
    assert _open_fds() == before  # the descriptors that came with it were closed
    assert "request cut short" in capsys.readouterr().out


def test_stalled_client_times_out(pair, monkeypatch):
    conn, client, fds = pair
    monkeypatch.setattr(srv, "REQUEST_TIMEOUT", 0.2)
    socket.send_fds(client, [_request(["train"])[:10]], fds)  # ... and then nothing
    assert srv._accept_request(conn) is None


def test_peer_of_another_uid_is_refused(pair, monkeypatch):
    conn, client, fds = pair
    monkeypatch.setattr(srv, "_peer_cred", lambda sock: (4242, os.getuid() + 1, 0))
    socket.send_fds(client, [_request(["train"])], fds)
    assert srv._accept_request(conn) is None
    conn.close()
    assert f"uid {os.getuid() + 1} may not use this fork server" in _reply(client)


@pytest.mark.parametrize(
    "argv", [["serve", "--socket", "x"], ["merge", "--cell", "c", "--out", "o"], ["--help"], ["sh", "-c", "id"]]
)
def test_commands_outside_the_allow_list_are_refused(pair, argv):
    conn, client, fds = pair
    socket.send_fds(client, [_request(argv)], fds)
    assert srv._accept_request(conn) is None
    reason = _reply(client)
    assert "is not a command the fork server runs" in reason and "\n" not in reason


def test_malformed_requests_are_refused(pair):
    conn, client, fds = pair
    data = json.dumps({"argv": "train", "cwd": "/", "env": {}}).encode()
    socket.send_fds(client, [srv._HEADER.pack(len(data)) + data], fds)
    assert srv._accept_request(conn) is None
    assert "argv must be" in _reply(client)


# ------------------------------------------------------------------ against the running server


def _raw(sock: Path, payload: bytes, fds: list[int], shut: bool = False) -> str | int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(sock))
        socket.send_fds(client, [payload], fds)
        if shut:
            client.shutdown(socket.SHUT_WR)
        try:
            return _reply(client)
        except ConnectionError:
            return "closed"


def test_server_survives_bad_requests_and_refuses_them(server, tmp_path):
    sock, log = server
    r, w = os.pipe()
    try:
        assert _raw(sock, _request(["train", "--out", "o"])[:20], [r, w], shut=True) == "closed"
        assert "is not a command" in _raw(sock, _request(["validate", "config/demo.yaml"]), [r, w])
    finally:
        os.close(r)
        os.close(w)
    assert "request cut short" in log.read_text()
    # still serving, and a forwarded command runs
    out, pid = peft(MISSING_SPEC, sock, tmp_path)
    assert "missing.json" in out.stderr and forwarded(log, pid)


def test_client_refused_by_the_server_says_so(server, tmp_path, monkeypatch):
    sock, _ = server
    monkeypatch.setattr("peft_core.cli.FORWARDED", {"validate"})  # a client out of step with the server
    monkeypatch.setenv(srv.ENV_VAR, str(sock))
    from peft_core.cli import main

    r, w = os.pipe()
    with os.fdopen(w, "w") as err_w, os.fdopen(r) as err_r:
        monkeypatch.setattr(sys, "stderr", err_w)
        rc = main(["validate", "nothing.yaml"])
        monkeypatch.undo()
        err_w.close()
        message = err_r.read()
    assert rc == 2, message
    assert message.startswith("peft-core: error: the fork server refused the request: 'validate' is not a command")


def test_client_will_not_talk_to_another_users_server(tmp_path, monkeypatch, capsys):
    path = tmp_path / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        monkeypatch.setenv(srv.ENV_VAR, str(path))
        monkeypatch.setattr(srv, "_peer_cred", lambda sock: (1, os.getuid() + 1, 0))
        assert srv.forward(["train"]) is None  # runs in-process instead, and says why
    assert "not you; running in-process" in capsys.readouterr().err


# ------------------------------------------------------------------ signals (SLURM group jobs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_client_reaches_the_forwarded_cell(server, tmp_path, signum):
    """Under SLURM the client is what the job step signals (requeue: SIGTERM; the profile's early
    warning: SIGUSR1, which the step's Snakemake makes the client inherit as ignored); the worker,
    forked outside the step, must still save its state at the epoch end, and the retry resume it."""
    sock, log = server
    toycell.write_inputs(tmp_path, n_train=512)
    cell = toycell.spec("lora", {"rank": 2}, epochs=6)
    done, _ = peft(toycell.train_args(cell, "uninterrupted"), None, tmp_path)
    assert done.returncode == 0, done.stderr
    cmd = [sys.executable, "-m", "peft_core.cli", *toycell.train_args(cell, "cell")]
    ignore_usr1 = lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # noqa: E731  (as peft_core.preempt sets it)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(sock), stderr=subprocess.PIPE, text=True, preexec_fn=ignore_usr1)
    for line in proc.stderr:
        if line.startswith("epoch 1/"):
            proc.send_signal(signum)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 75, rest
    assert forwarded(log, proc.pid), log.read_text()
    assert "preempted: state saved" in rest and "epoch 6/6" not in rest
    assert (tmp_path / "cell" / "resume.pt").is_file() and not (tmp_path / "cell" / "metrics.json").exists()
    again, pid = peft(toycell.train_args(cell, "cell"), sock, tmp_path)
    assert again.returncode == 0 and "resumed from" in again.stderr and forwarded(log, pid), again.stderr
    ours, ref = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("cell", "uninterrupted"))
    assert (ours["accuracy"], ours["final_train_loss"]) == (ref["accuracy"], ref["final_train_loss"])


def test_only_a_group_jobs_driver_starts_a_server():
    from peft_core.server_launch import group_job_members

    driver = ["python", "-m", "snakemake", "--snakefile", "S", "--target-jobs", "train_pack:pack=a",
              "train_pack:pack=b", "--executor", "slurm-jobstep", "--jobs", "1", "--mode", "remote"]  # fmt: skip
    job = {"SLURM_JOB_ID": "7"}
    assert group_job_members(driver, job) == 2
    assert group_job_members(driver[:7] + driver[8:], job) == 1  # a job of one member
    assert group_job_members(driver, {**job, "SLURM_STEP_ID": "0"}) == 0  # a member, inside its step
    assert group_job_members(driver, {}) == 0  # not in an allocation
    local = ["snakemake", "--profile", "profiles/local"]
    assert group_job_members(local, job) == 0  # a whole run inside an sbatch script: the local server
    member = [a if a != "slurm-jobstep" else "local" for a in driver]
    assert group_job_members(member, job) == 0
