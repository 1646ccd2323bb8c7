"""The gateway as a real process: ``python -m gateway run --config FILE`` (or
the installed ``obs-gateway`` script) in a process group of its own, its
JSON log lines read as they arrive, its ports taken from the ``listening``
line, SIGHUP reloads awaited by the line they cause (never a fixed time),
memory and descriptors read from /proc, and a stop that leaves no worker
behind.

Knows nothing of the config it runs (the test writes it) and of HTTP only
the metrics scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import wait_for
from tests.support.metrics import Metrics, scrape

__all__ = [
    "MODULE",
    "OBS_GATEWAY",
    "RELOAD_EVENTS",
    "GatewayProcess",
    "memory_kib",
    "open_fds",
    "sighup_handled",
]

MODULE = (sys.executable, "-m", "gateway")
OBS_GATEWAY = str(Path(sys.executable).with_name("obs-gateway"))
RELOAD_EVENTS = frozenset({"config_reloaded", "config_reload_failed", "config_reload_partial"})
# What a lean process keeps of its stderr: enough for any error message.
LEAN_STDERR = 100_000


@dataclass
class GatewayProcess:
    """A running gateway and everything it has logged so far.  Always
    ``await stop()`` it (a finaliser that kills the whole group).

    ``lean`` (the soak: 100k+ requests) counts access lines in ``statuses``
    instead of keeping them, keeps no raw stdout and only the start of
    stderr."""

    config: Path
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = MODULE
    cwd: Path | None = None
    lean: bool = False
    # Set by a test that causes internal faults on purpose (teardown allows them).
    faults_expected: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    raw_stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    port: int = 0
    admin_port: int = 0
    _proc: asyncio.subprocess.Process | None = None
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout: float = 15.0, *, wait_for_sighup_handler: bool = False) -> None:
        """Start and wait for ``listening``; with ``wait_for_sighup_handler``
        also until the process handles SIGHUP (see ``sighup_handled``)."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.command,
            "run",
            "--config",
            str(self.config),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            # Its own process group, so the finaliser reaches the workers too.
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_stdout(self._proc.stdout)),
            asyncio.create_task(self._read_stderr(self._proc.stderr)),
        ]
        listening = await self.wait_event("listening", timeout=timeout)
        self.port = int(listening["listen"].rpartition(":")[2])
        self.admin_port = int(listening["admin"].rpartition(":")[2])
        if wait_for_sighup_handler:
            await wait_for(lambda: sighup_handled(self.proc.pid), timeout)

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            if not self.lean:
                self.raw_stdout += line
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "<not json>", "raw": line.decode(errors="replace")}
            if event.get("event") == "request":
                status = event.get("status")
                self.statuses[status if isinstance(status, int) else 0] += 1
                if self.lean:
                    continue
            self.events.append(event)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            if self.lean:
                data = data[: max(0, LEAN_STDERR - len(self.stderr))]
            self.stderr += data

    def mark(self) -> int:
        """A position in the log; ``find`` and ``wait_event`` look after it."""
        return len(self.events)

    def find(self, event: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events[since:]
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_event(
        self, events: str | Iterable[str], since: int = 0, timeout: float = 10.0, **fields: Any
    ) -> dict[str, Any]:
        """The first of these events after ``since`` with these fields.
        Fails at the deadline, and at once if the process has exited."""
        names = {events} if isinstance(events, str) else set(events)
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            assert self.proc.returncode is None, (
                f"gateway exited with {self.proc.returncode}; stderr:\n"
                + self.stderr.decode(errors="replace")
            )
            found[:] = [
                e
                for e in self.events[since:]
                if e.get("event") in names and all(e.get(k) == v for k, v in fields.items())
            ]
            return bool(found)

        try:
            await wait_for(seen, timeout)
        except AssertionError as exc:
            raise AssertionError(f"no {sorted(names)} {fields} logged: {exc}") from None
        return found[0]

    async def reload(self, timeout: float = 15.0) -> dict[str, Any]:
        """SIGHUP, then the reload's outcome line (reloaded, failed or partial)."""
        since = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        return await self.wait_event(RELOAD_EVENTS, since, timeout)

    async def metrics(self) -> Metrics:
        return await scrape(self.admin_port)

    def pids(self) -> list[int]:
        """The process and its children (a supervisor's workers)."""
        root = self.proc.pid
        children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
        return [root, *(int(c) for c in children)]

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM of the process, in KiB."""
        return memory_kib(self.proc.pid)

    async def wait(self, timeout: float = 10.0) -> int:
        """Its exit status, once it exits by itself within ``timeout``."""
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait(self._readers, timeout=5.0)
        return rc

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (a graceful drain), then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def stop(self) -> None:
        """Finaliser: kill whatever is left of the process group (a
        supervisor's workers hold our stdout pipe too), collect the exit
        status, and read the pipes to EOF so their transports close."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        await self._proc.wait()
        if self._readers:
            _, pending = await asyncio.wait(self._readers, timeout=5.0)
            for task in pending:
                task.cancel()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in KiB (Linux /proc)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sighup_handled(pid: int) -> bool:
    """Whether the process has installed a handler for SIGHUP (SigCgt bit 1).

    Needed because the gateway announces ``listening`` (and answers /readyz)
    before it installs its SIGHUP handler, and a SIGHUP in that window kills
    it: see tests/lifecycle/test_reload.py::test_sighup_right_after_listening_reloads.
    """
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False
