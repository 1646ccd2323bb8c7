"""Processes the bench starts, and what /proc says about them.

``Procs`` starts every peer with its output in the run directory and stops
them all (SIGTERM, then SIGKILL) when its ``with`` block ends, whatever
happened inside.  ``cpu_seconds`` and ``rss`` read a process *tree* (nginx
master + workers, a gateway's workers) from /proc, so a multi-process proxy
is charged for all of its processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Procs", "Tree", "cpu_seconds", "free_port", "rss_kib", "tree", "wait_port"]

_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port free right now (peers get fixed ports in their configs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on {port} within {timeout}s")


# -- /proc ------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


@dataclass(frozen=True)
class Tree:
    root: int
    pids: tuple[int, ...]


def tree(root: int) -> Tree:
    """The process and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return Tree(root, tuple(sorted(pids)))


def cpu_seconds(t: Tree) -> tuple[float, float]:
    """(utime, stime) summed over the tree's processes, all threads included."""
    user = system = 0
    for pid in t.pids:
        fields = _stat(pid)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / _TICK, system / _TICK


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of one process, in KiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` value 5, Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- lifecycle --------------------------------------------------------------------
class Procs(AbstractContextManager["Procs"]):
    """Started processes, stopped in reverse order on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        out = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # our Ctrl-C reaches the bench, which stops them in order
        )
        out.close()
        self.started.append((name, proc))
        if port is not None:
            wait_port(port, proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # The whole session: nginx workers, gateway workers.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.started = [(n, p) for n, p in self.started if p is not proc]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for _name, proc in reversed(list(self.started)):
            try:
                self.stop(proc)
            except Exception as err:  # keep stopping the others
                print(f"bench: could not stop {proc.args!r}: {err}")
