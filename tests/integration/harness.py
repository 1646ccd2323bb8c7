"""Process plumbing for the integration tier: real programs as subprocesses.

Owns free loopback ports, starting a program with its output in a log file,
stopping it by PID (SIGTERM, then SIGKILL after a deadline), waiting on a
condition with a deadline, and the small HTTP helpers the scenarios share
(metrics pages are read by tests.support.metrics).  Only 127.0.0.1; no
pipes to children (a full pipe would stall them); no bare sleeps as
synchronisation: every wait names what it waits for, polls, and fails with
the tails of the relevant logs.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

__all__ = [
    "INTEGRATION_TIMEOUT",
    "HttpResult",
    "Proc",
    "Procs",
    "free_port",
    "http_get",
    "http_ok",
    "http_post",
    "require_binary",
    "timeout",
    "wait_until",
]

SYSTEM_DEPS = Path(__file__).resolve().parents[2] / "scripts" / "system-deps.txt"


def _packages() -> dict[str, str]:
    """Program → the Debian package that ships it, from the table `make
    test` installs from (scripts/ensure-system-deps)."""
    out = {}
    for line in SYSTEM_DEPS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            program, package = line.split()[:2]
            out[program] = package
    return out


PACKAGES = _packages()

T = TypeVar("T")


def timeout(seconds: float) -> pytest.MarkDecorator:
    """pytest-timeout with the signal method for these tests.

    The suite's default thread method ends the run with ``os._exit``, which
    skips finalizers and so the processes' stop.  These tests block only on
    the main thread in sockets, sleeps and locks, which SIGALRM interrupts:
    a hang becomes a failure whose finalizers still run.
    """
    return pytest.mark.timeout(seconds, method="signal")


INTEGRATION_TIMEOUT = timeout(60)


def require_binary(name: str) -> str:
    """The program's path; a missing one fails the run (this tier never skips)."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        pytest.fail(
            f"{name!r} is not on PATH: install the Debian package {package!r} "
            f"(make test does when it may; else: sudo apt-get install {package}); "
            "the integration tier does not skip",
            pytrace=False,
        )
    return path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """One child process; stdout and stderr go to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        # Finalizers stop every child, but a hard end of pytest (SIGKILL, the
        # thread-method timeout's os._exit) runs none: the kernel's parent-death
        # signal then stops it.  setpriv (util-linux, Essential in Debian) sets
        # it and execs, so the PID stays the program's.
        setpriv = shutil.which("setpriv")
        wrapper = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        with log_path.open("ab") as log:
            # The child gets its own copy of the descriptor; ours closes here.
            self.popen = subprocess.Popen(
                [*wrapper, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5.0)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} (pid {self.pid}) {self.log_path}:\n" + "\n".join(tail)


@dataclass
class Procs:
    """Every process a test started; ``stop_all`` runs in the fixture finalizer."""

    log_dir: Path
    started: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        proc = Proc(name, argv, log_path, env=env, cwd=cwd)
        self.started.append(proc)
        return proc

    def stop_all(self) -> list[str]:
        """Stop in reverse start order (senders before receivers); never raises."""
        problems = []
        for proc in reversed(self.started):
            try:
                proc.stop()
            except Exception as exc:  # a finalizer must reach every process
                problems.append(f"{proc.name} (pid {proc.pid}): {exc!r}")
        return problems

    def tails(self, procs: Iterable[Proc] | None = None) -> str:
        return "\n".join(p.log_tail() for p in (procs if procs is not None else self.started))


def wait_until(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    watch: Sequence[Proc] = (),
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Fails at the deadline, or at once if a watched process exits, with the
    last value or error seen and the tails of the watched processes' logs.
    Connection errors count as "not yet" (the process may still be starting).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        for proc in watch:
            if not proc.running():
                pytest.fail(
                    f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                    f"{what}\n{proc.log_tail()}",
                    pytrace=False,
                )
        try:
            result = predicate()
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            tails = "\n".join(p.log_tail() for p in watch)
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n{tails}"
            )
        time.sleep(interval)


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes


def _request(
    method: str, url: str, body: bytes | None, headers: Mapping[str, str], timeout: float
) -> HttpResult:
    # http.client rather than urllib: no proxy variables, no redirects, no
    # exceptions for 4xx/5xx, and the connection is always closed.
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", f"integration tests stay on loopback: {url}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target or "/", body=body, headers=dict(headers))
        resp = conn.getresponse()
        data = resp.read()
        return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> HttpResult:
    return _request("GET", url, None, headers or {}, timeout)


def http_post(
    url: str, body: bytes, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> HttpResult:
    return _request("POST", url, body, headers or {}, timeout)


def http_ok(url: str) -> bool:
    return http_get(url, timeout=2.0).status == 200
