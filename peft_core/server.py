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
server is an optimisation only, never a requirement (where it starts, locally
and in SLURM group jobs: peft_core/server_launch.py). The client relays
SIGTERM and SIGUSR1 to its worker, so preemption acts on a forwarded cell as
on an in-process one.

It runs commands for its own user only: the socket is mode 0600 in a
directory that is not world-writable, the peer's uid (SO_PEERCRED) must be
the server's, and only the subcommands in ALLOWED run. A request is read
whole (length-prefixed, however the bytes arrive) or not run at all. Each
forward is logged as "client pid P: forked pid C for <command>".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path

from .errors import InputError
from .preempt import PREEMPT_SIGNALS

ENV_VAR = "PEFT_CORE_SERVER"
_HEADER = struct.Struct("!I")
_RC = struct.Struct("!i")
# The only subcommands the server runs (those that import torch + timm and run
# many times per study; cli.FORWARDED, the ones the client sends, must be a
# subset). Anything else is refused, whoever asks.
ALLOWED = frozenset({"train", "train-pack", "prestep", "features", "robustness"})
# The signals a client hands on to its worker: the preemption signals (SLURM's requeue, its early warning).
RELAYED = frozenset(PREEMPT_SIGNALS)
# A request is argv + cwd + environment: far below this.
MAX_REQUEST = 1 << 22
# A client has this long to send its whole request (the server reads one
# request at a time, so a stalled client must not stall the others).
REQUEST_TIMEOUT = 10.0
# Status word of a refused request; a one-line reason follows (length-prefixed).
REFUSED = -1


def _send_msg(sock: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    msg = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [msg], fds)
        if sent < len(msg):  # sendmsg may send only part of a large message
            sock.sendall(msg[sent:])
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


class BadRequest(ValueError):
    """A request the server will not run; its message is sent back as one line."""


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One length-prefixed request and the two descriptors sent with it.

    Reads until the whole message is in, however the bytes arrive (the
    descriptors come with the first ones); end-of-file before that raises
    ConnectionError, so a truncated request never runs. Descriptors received
    are closed again on any error.
    """
    buf, fds, size = b"", [], None
    try:
        while size is None or len(buf) < _HEADER.size + size:
            want = (_HEADER.size if size is None else _HEADER.size + size) - len(buf)
            chunk, got, flags, _addr = socket.recv_fds(conn, min(want, 1 << 16), 4)
            fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise BadRequest("too many file descriptors sent")
            if not chunk:
                raise ConnectionError(f"request cut short: end-of-file after {len(buf)} bytes")
            buf += chunk
            if size is None and len(buf) >= _HEADER.size:
                (size,) = _HEADER.unpack(buf[: _HEADER.size])
                if size > MAX_REQUEST:
                    raise BadRequest(f"request of {size} bytes is over the limit of {MAX_REQUEST}")
        try:
            request = json.loads(buf[_HEADER.size :])
        except ValueError:
            raise BadRequest("request is not valid JSON") from None
        _check_request(request, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _check_request(request: object, fds: list[int]) -> None:
    if not isinstance(request, dict) or set(request) != {"argv", "cwd", "env"}:
        raise BadRequest("request must be an object with exactly argv, cwd and env")
    argv, cwd, env = request["argv"], request["cwd"], request["env"]
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise BadRequest("argv must be a non-empty list of strings")
    if argv[0] not in ALLOWED:
        raise BadRequest(f"{argv[0]!r} is not a command the fork server runs (it runs: {', '.join(sorted(ALLOWED))})")
    if not isinstance(cwd, str) or not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise BadRequest("cwd must be a string and env a mapping of strings")
    if len(fds) != 2:
        raise BadRequest(f"expected 2 file descriptors (stdout, stderr), got {len(fds)}")


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = struct.Struct("3i")
    return creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))


def _refuse(conn: socket.socket, reason: str) -> None:
    """Tell the client, in one line, why its request does not run (best effort)."""
    data = " ".join(reason.split()).encode()[:4096]
    try:
        conn.sendall(_RC.pack(REFUSED) + _HEADER.pack(len(data)) + data)
    except OSError:
        pass


# ------------------------------------------------------------------ client


class _Relay:
    """Hand the preemption signals the client gets on to its worker, one byte (the signal number) each.

    Under SLURM the client is what the job step signals (the profile's early
    SIGUSR1, SIGTERM on requeue); the worker, forked by a server outside the
    step, gets nothing from SLURM. A signal that arrives while the request is
    still being sent waits until it is whole (a byte in the middle would
    corrupt it).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.armed, self.pending, self.old = sock, False, [], {}

    def __enter__(self) -> "_Relay":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._on_signal) for s in RELAYED}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.armed:
            self._send(signum)
        else:
            self.pending.append(signum)

    def arm(self) -> None:
        self.armed = True
        while self.pending:
            self._send(self.pending.pop(0))

    def _send(self, signum: int) -> None:
        try:
            self.sock.send(bytes([signum]))
        except OSError:  # the worker is gone: its exit status (or the lost connection) says so
            pass


def forward(argv: list[str]) -> int | None:
    """Run ``argv`` on the server named by $PEFT_CORE_SERVER; None if there is none.

    SIGTERM and SIGUSR1 sent to this process reach the worker (:class:`_Relay`),
    which acts on them as the command would in-process.
    """
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
        _pid, uid, _gid = _peer_cred(sock)
        if uid != os.getuid():  # never hand our environment and files to another user's process
            print(f"peft-core: {ENV_VAR}={path} is served by uid {uid}, not you; running in-process", file=sys.stderr)
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        request = {"argv": argv, "cwd": os.getcwd(), "env": {k: v for k, v in os.environ.items() if k != ENV_VAR}}
        try:
            with _Relay(sock) as relay:
                _send_msg(sock, request, [sys.stdout.fileno(), sys.stderr.fileno()])
                relay.arm()
                (rc,) = _RC.unpack(_recv_exact(sock, _RC.size))
            if rc == REFUSED:
                (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
                reason = _recv_exact(sock, size).decode(errors="replace")
                print(f"peft-core: error: the fork server refused the request: {reason}", file=sys.stderr)
                return 2
        except OSError:  # ConnectionError included
            print("peft-core: the fork server's worker died", file=sys.stderr)
            return 1
        return rc


# ------------------------------------------------------------------ server


def _log(message: str) -> None:
    print(f"peft-core serve: {message}", flush=True)


def _accept_request(conn: socket.socket) -> tuple[dict, list[int]] | None:
    """Check the peer and read its request; None (after telling the peer why) if it must not run."""
    pid = "?"
    try:
        pid, uid, _gid = _peer_cred(conn)
        if uid != os.getuid():
            _log(f"refused pid {pid}: uid {uid} is not the server's uid {os.getuid()}")
            _refuse(conn, f"uid {uid} may not use this fork server (it serves uid {os.getuid()} only)")
            return None
        conn.settimeout(REQUEST_TIMEOUT)
        request, fds = _recv_request(conn)
        conn.settimeout(None)  # the child's _die_with_client waits on it for as long as the cell runs
    except BadRequest as err:
        _log(f"refused pid {pid}: {err}")
        _refuse(conn, str(err))
        return None
    except (OSError, ValueError, ConnectionError) as err:
        _log(f"dropped a request from pid {pid}: {err}")
        return None
    return request, fds


def _die_with_client(conn: socket.socket) -> None:
    """Raise in this child the signals its client relays; kill it once the client is gone.

    After its request the client sends only relayed signal numbers (one byte
    each: SIGTERM, SIGUSR1), so ``recv`` otherwise returns only at end-of-file.
    Without the kill, a ``kill -9`` of Snakemake would leave cells training,
    and writing outputs, behind the rerun's back.
    """
    try:
        while data := conn.recv(16):
            for signum in data:
                if signum in RELAYED:
                    os.kill(os.getpid(), signum)  # Python runs the handler in the main thread
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the requesting command, then report its exit status."""
    rc = 1
    try:
        from .cli import CELL_COMMANDS, main
        from .preempt import preemption_flag

        # a cell command catches relayed signals from before the relay starts, as it would
        # from its first line in-process; cli.main's own catcher then shares this flag
        catch = preemption_flag() if request["argv"][0] in CELL_COMMANDS else contextlib.nullcontext()
        with catch:
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


def _private_dir(directory: Path) -> None:
    """Create ``directory`` (0700) or check that an existing one is not world-writable."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & stat.S_IWOTH:
        raise InputError(
            f"{directory}: world-writable; put the fork server's socket in a directory only you can write to"
        )


def serve(path: str | Path, idle_timeout: float = 900.0, parent_pid: int | None = None) -> None:
    """Accept requests on the Unix socket ``path`` until idle or the parent exits.

    The socket is mode 0600 and its directory may not be world-writable; a
    peer of another uid, a command outside ALLOWED and a malformed or
    truncated request are refused (logged, and a one-line reason sent back).
    """
    path = Path(path)
    _private_dir(path.parent)
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp))
    os.chmod(tmp, 0o600)
    srv.listen(64)
    os.replace(tmp, path)  # clients see the socket only once it accepts, and only as 0600
    srv.settimeout(2.0)
    last = time.monotonic()
    _log(f"pid {os.getpid()} listening on {path}")
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
            accepted = _accept_request(conn)
            if accepted is None:
                conn.close()
                continue
            request, fds = accepted
            client = _peer_cred(conn)[0]
            child = os.fork()
            if child == 0:
                srv.close()
                _child(conn, request, fds)
            _log(f"client pid {client}: forked pid {child} for {' '.join(request['argv'][:1])}")
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        srv.close()
        path.unlink(missing_ok=True)
