"""A fork server that takes Python + torch + timm start-up out of every cell.

On a 2-core machine a training cell of the demo costs ~3 s of compute but
~4 s of process start-up (``import torch, timm``; see the CPU budget notes).
``peft-core serve`` imports everything once and forks one child per request;
each Snakemake job still runs its own ``peft-core train`` command (so
per-cell staleness, logs and resources stay Snakemake's), but that command
only forwards its argv, working directory and stdout/stderr file descriptors
over a Unix socket and waits for the child's exit status.

Each request runs in a freshly forked child: no state is shared between
cells (the parent never runs a torch op, so no thread pool exists at fork
time). Without a reachable server the command simply runs in-process, so the
server is an optimisation only, never a requirement (SLURM jobs run without it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

ENV_VAR = "PEFT_CORE_SERVER"
_HEADER = struct.Struct("!I")


def _send_msg(sock: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    msg = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], fds)
    else:
        sock.sendall(msg)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return buf


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 4)
    (size,) = _HEADER.unpack(msg[: _HEADER.size])
    body = msg[_HEADER.size :]
    if len(body) < size:
        body += _recv_exact(conn, size - len(body))
    return json.loads(body), list(fds)


# ------------------------------------------------------------------ client


def forward(argv: list[str]) -> int | None:
    """Run ``argv`` on the server named by $PEFT_CORE_SERVER; None if there is none."""
    path = os.environ.get(ENV_VAR)
    if not path or not Path(path).exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        sys.stdout.flush()
        sys.stderr.flush()
        request = {"argv": argv, "cwd": os.getcwd(), "env": {k: v for k, v in os.environ.items() if k != ENV_VAR}}
        _send_msg(sock, request, [sys.stdout.fileno(), sys.stderr.fileno()])
        try:
            (rc,) = struct.unpack("!i", _recv_exact(sock, 4))
        except ConnectionError:
            print("peft-core: the fork server's worker died", file=sys.stderr)
            return 1
        return rc


# ------------------------------------------------------------------ server


def _die_with_client(conn: socket.socket) -> None:
    """Kill this child once its client is gone (killed, or its job cancelled).

    The client sends nothing after its request, so ``recv`` returns only at
    end-of-file. Without this, a ``kill -9`` of Snakemake would leave cells
    training, and writing outputs, behind the rerun's back.
    """
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the requesting command, then report its exit status."""
    rc = 1
    try:
        threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        sys.argv = ["peft-core", *request["argv"]]
        from .cli import main

        rc = int(main(request["argv"]) or 0)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # report, never let the child fall back into the accept loop
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(struct.pack("!i", rc))
        finally:
            os._exit(rc)


def _preload() -> None:
    """Import what training cells need, without running any torch op."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    from . import backbones, data, train  # noqa: F401
    from .methods import list_methods

    list_methods()


def serve(path: str | Path, idle_timeout: float = 900.0, parent_pid: int | None = None) -> None:
    """Accept requests on the Unix socket ``path`` until idle or the parent exits."""
    path = Path(path)
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp))
    srv.listen(64)
    os.replace(tmp, path)  # clients see the socket only once it accepts
    srv.settimeout(2.0)
    last = time.monotonic()
    try:
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                break
            if time.monotonic() - last > idle_timeout:
                break
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            last = time.monotonic()
            try:
                conn.settimeout(None)
                request, fds = _recv_request(conn)
            except (OSError, ValueError, ConnectionError):
                conn.close()
                continue
            if os.fork() == 0:
                srv.close()
                _child(conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        srv.close()
        path.unlink(missing_ok=True)


class Background:
    """A ``peft-core serve`` process advertised to child processes via $PEFT_CORE_SERVER."""

    def __init__(self) -> None:
        import subprocess
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="peft-core-"))
        sock = self.tmp / "server.sock"
        cmd = [sys.executable, "-m", "peft_core.cli", "serve", "--socket", str(sock), "--parent-pid", str(os.getpid())]
        with open(self.tmp / "server.log", "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        # Jobs started from now on find it; until it listens they run in-process.
        os.environ[ENV_VAR] = str(sock)

    def stop(self) -> None:
        import shutil

        os.environ.pop(ENV_VAR, None)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
