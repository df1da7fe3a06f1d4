"""One rank's supervisor under ``glmrt launch``, and the hub that ends the job when a rank fails.

A launcher alone does not end a job whose rank failed: mpirun keeps waiting for the other
ranks when one exits non-zero after MPI's finalize, torchrun reports its own status 1 and a
traceback, srun waits too, and a rank blocked in a rendezvous or a collective waits for
its timeout. So ``glmrt launch`` runs every rank's command under this small supervisor
(``python -m glm_runtime.cli.supervise CMD...``, under whichever launcher) connected to a
:class:`Hub` in the ``glmrt launch`` process:

* the first rank whose command exits non-zero or dies is *the failed rank*; its
  supervisor reports the exit status (128 + N for a command killed by signal N, as a shell
  reports it) and the hub tells every other supervisor at once;
* every other supervisor whose command still runs prints one line naming the failed rank
  and stops the command (SIGTERM to its process group; SIGKILL after :data:`STOP_GRACE_S`);
* ``glmrt launch`` exits with the failed rank's status. The supervisors themselves exit 0
  once the hub has the status, so the launcher adds no report of its own (torchrun's
  ChildFailedError traceback, hydra's "BAD TERMINATION" banner);
* a supervisor that loses the hub (``glmrt launch`` was killed) stops its command too.

The rank's command inherits the supervisor's environment and file descriptors (MPICH
hands its ranks a PMI socket that way) and ``GLM_LAUNCH_HUB``, which tells
:func:`glm_runtime.parallel.bootstrap.fail_fast` that the supervisor will report a dead
peer. This module imports no torch: a supervisor starts in tens of milliseconds.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from glm_runtime.parallel.launchenv import HUB_ENV, discover

STOP_GRACE_S = 5.0
POLL_S = 0.05


def shell_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(status: int) -> str:
    if status > 128 and status - 128 in signal.valid_signals():
        return f"was killed by {signal.Signals(status - 128).name}"
    return f"exited with status {status}"


def say(line: str) -> None:
    """One line on stderr in one write: ranks sharing a terminal must not interleave."""
    os.write(2, f"glmrt launch: {line}\n".encode(errors="replace"))


class Hub:
    """The ``glmrt launch`` side: a listening socket that learns how each of ``n`` ranks
    ended. On the first failure it tells every other supervisor to stop; once all ranks
    have ended it tells the supervisors that wait (see :func:`supervise`) that they may go."""

    def __init__(self, host: str, n: int):
        self.token, self.n = secrets.token_hex(16), n
        self.failed: tuple[int, int] | None = None  # (rank, shell status) of the first failure
        self._listen = socket.create_server((host, 0))
        self.address = f"{host}:{self._listen.getsockname()[1]}:{self.token}"
        self._rank: dict[socket.socket, int | None] = {}  # connection -> its rank once it said hello
        self._buf: dict[socket.socket, bytes] = {}
        self._ended: set[int] = set()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._closed = False
        threading.Thread(target=self._serve, name="glmrt-launch-hub", daemon=True).start()

    def close(self) -> None:
        self._closed = True

    def _serve(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select(0.2):
                if key.fileobj is self._listen:
                    conn, _ = self._listen.accept()
                    self._rank[conn], self._buf[conn] = None, b""
                    self._sel.register(conn, selectors.EVENT_READ)
                else:
                    self._read(key.fileobj)
        for conn in [self._listen, *self._rank]:
            conn.close()
        self._sel.close()

    def _drop(self, conn: socket.socket) -> None:
        self._sel.unregister(conn)
        conn.close()
        del self._rank[conn], self._buf[conn]

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        rank = self._rank[conn]
        if not data:
            self._drop(conn)
            if rank is not None and rank not in self._ended:  # a supervisor gone without a report was killed
                self._end(rank, 128 + signal.SIGKILL)
            return
        self._buf[conn] += data
        while conn in self._buf and b"\n" in self._buf[conn]:
            line, self._buf[conn] = self._buf[conn].split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words[:1] == ["hello"] and len(words) == 3 and words[1] == self.token and words[2].isdigit():
                self._rank[conn] = int(words[2])
                if self.failed is not None:  # a rank that starts after the failure stops at once
                    self._send(conn, f"stop {self.failed[0]} {self.failed[1]}")
            elif words[:1] == ["exit"] and rank is not None and len(words) == 2 and words[1].isdigit():
                self._end(rank, int(words[1]))
            else:  # not one of ours
                self._drop(conn)

    def _end(self, rank: int, status: int) -> None:
        self._ended.add(rank)
        if status != 0 and self.failed is None:
            self.failed = (rank, status)
            for conn, r in list(self._rank.items()):
                if r is not None and r not in self._ended:
                    self._send(conn, f"stop {rank} {status}")
        if len(self._ended) >= self.n:
            for conn in list(self._rank):
                self._send(conn, "done")

    @staticmethod
    def _send(conn: socket.socket, line: str) -> None:
        with contextlib.suppress(OSError):  # a supervisor that is gone needs no message
            conn.sendall(f"{line}\n".encode())


def _stop(child: subprocess.Popen) -> int:
    """SIGTERM to the command's process group, SIGKILL if it outlives the grace; its status."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return shell_status(child.returncode)


class _Lines:
    """The hub's messages, one line at a time (``None`` once the hub is gone)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buf = conn, b""

    def next(self, timeout: float) -> list[str] | None:
        """The next line's words; [] when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.conn.settimeout(left)
            try:
                data = self.conn.recv(4096)
            except TimeoutError:
                return []
            except OSError:
                data = b""
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").split()


def supervise(command: list[str]) -> int:
    """Run ``command`` as this rank, connected to the hub named by ``GLM_LAUNCH_HUB``."""
    rank = discover(use_mpi=False).rank
    host, port, token = os.environ[HUB_ENV].rsplit(":", 2)
    try:
        conn = socket.create_connection((host, int(port)), timeout=30)
        conn.sendall(f"hello {token} {rank}\n".encode())
    except OSError as e:
        say(f"rank {rank} cannot reach the launcher at {host}:{port} ({e.strerror or e}); set "
            "GLM_BOOTSTRAP_IFACE to an interface every node can reach")
        return 1
    hub = _Lines(conn)
    failure_known = False
    try:
        child = subprocess.Popen(command, start_new_session=True, close_fds=False)
    except OSError as e:
        say(f"rank {rank} cannot run {command[0]!r}: {e.strerror or e}")
        status = 127
    else:
        def forward(sig, _frame):  # what reaches the supervisor reaches the rank's command
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, sig)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        status = None
        while status is None and (rc := child.poll()) is None:
            words = hub.next(POLL_S)
            if words is None:
                say(f"rank {rank}: the launcher is gone: stopping")
                _stop(child)
                return 1
            if words[:1] == ["stop"] and len(words) == 3 and child.poll() is None:
                say(f"rank {rank}: stopping: rank {words[1]} {describe(int(words[2]))}")
                status, failure_known = _stop(child), True
        if status is None:
            status = shell_status(rc)
    try:
        conn.sendall(f"exit {status}\n".encode())
    except OSError:
        return status
    if status == 0 and not failure_known:
        return 0
    # A failure: stay until every rank has ended. An MPI launcher treats a rank that leaves
    # without MPI's finalize as an abort and kills the rest at once (SIGKILL), which would
    # stop their supervisors before they stop their commands.
    while (words := hub.next(STOP_GRACE_S + 60)) not in (None, []):
        if words[:1] == ["done"]:
            return 0  # the hub has the failed rank's status: glmrt launch returns it
    return status


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    return supervise(command)


if __name__ == "__main__":
    sys.exit(main())
