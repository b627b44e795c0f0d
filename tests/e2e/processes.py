"""What the e2e tests do with the local processes they start (an operator, Kueue, scheduler-plugins,
Prometheus)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Self


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_logged(
    command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` with its stdout and stderr appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def log_tail(log: Path, lines: int = 40) -> str:
    """The last `lines` lines of a process's log, for a failing test to print."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


class LocalProcess:
    """A program the tests run on this machine beside the cluster, as a context manager: `_start` it,
    `_wait_ready` for it, and stop it (`__exit__`, which subclasses extend to undo what `_start` set up)
    when the block ends or either step fails."""

    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._start()
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)
