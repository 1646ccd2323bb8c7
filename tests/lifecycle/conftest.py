"""Fixtures for credential-lifecycle tests against the real process.

``gateway_process`` starts ``obs-gateway run`` (the installed console
script) on loopback ports it chooses itself, reads its JSON log lines as
they arrive, and stops it with SIGTERM at teardown, failing the test if it
did not exit cleanly or printed a traceback.  Reloads are real SIGHUPs; a
test waits for the ``config_reloaded`` / ``config_reload_failed`` line the
signal caused, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import config_text, sha256, wait_for

OBS_GATEWAY = str(Path(sys.executable).with_name("obs-gateway"))
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
RELOAD_EVENTS = frozenset({"config_reloaded", "config_reload_failed", "config_reload_partial"})


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class Metrics:
    """One scrape of the admin /metrics: (sample name, labels) → value."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]
    text: str

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(samples, text)

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The sample, which must exist."""
        found = self.get(name, **labels)
        assert found is not None, f"no sample {name}{labels} in:\n{self.lines(name)}"
        return found

    def matching(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return {lab: v for (n, lab), v in self.samples.items() if n == name and want <= lab}

    def lines(self, *prefixes: str) -> str:
        """The exposition lines of these metrics, as an operator would grep them."""
        return "\n".join(
            line
            for line in self.text.splitlines()
            if line.startswith(prefixes) and not line.startswith("#")
        )


# ------------------------------------------------------------------ process


@dataclass
class GatewayProcess:
    """A running ``obs-gateway run`` and everything it has logged so far."""

    proc: asyncio.subprocess.Process
    config: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)
    port: int = 0
    admin_port: int = 0
    # Set by a test that causes internal faults on purpose (teardown allows them).
    faults_expected: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def mark(self) -> int:
        """A position in the log; ``wait_event(..., since=mark)`` looks after it."""
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
        names = {events} if isinstance(events, str) else set(events)
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            assert self.proc.returncode is None, (
                f"gateway exited with {self.proc.returncode}; stderr:\n{self.stderr.decode()}"
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
        """SIGHUP, then the reload's outcome line (reloaded or failed)."""
        since = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        return await self.wait_event(RELOAD_EVENTS, since, timeout)

    async def metrics(self) -> Metrics:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url + "/metrics") as resp,
        ):
            assert resp.status == 200
            return Metrics.parse(await resp.text())


StartProcess = Callable[..., Awaitable[GatewayProcess]]


def sighup_handled(pid: int) -> bool:
    """Whether the process has installed a handler for SIGHUP (SigCgt bit 1).

    Needed because the gateway announces ``listening`` (and answers /readyz)
    before it installs its SIGHUP handler, and a SIGHUP in that window kills
    it: see test_reload.py::test_sighup_right_after_listening_reloads.
    """
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


async def _read_stdout(gw: GatewayProcess) -> None:
    assert gw.proc.stdout is not None
    while line := await gw.proc.stdout.readline():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            event = {"event": "<not json>", "raw": line.decode(errors="replace")}
        gw.events.append(event if isinstance(event, dict) else {"raw": event})


async def _read_stderr(gw: GatewayProcess) -> None:
    assert gw.proc.stderr is not None
    while chunk := await gw.proc.stderr.read(65536):
        gw.stderr += chunk


@pytest.fixture
async def gateway_process() -> AsyncIterator[StartProcess]:
    """Start ``obs-gateway run --config PATH --workers N``; stopped at teardown."""
    started: list[tuple[GatewayProcess, list[asyncio.Task[None]]]] = []

    async def start(
        config: Path,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        *,
        wait_for_sighup_handler: bool = True,
        faults_expected: bool = False,
    ) -> GatewayProcess:
        proc = await asyncio.create_subprocess_exec(
            OBS_GATEWAY,
            "run",
            "--config",
            str(config),
            "--workers",
            str(workers),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=config.parent,
        )
        gw = GatewayProcess(proc, config, faults_expected=faults_expected)
        loop = asyncio.get_running_loop()
        started.append(
            (gw, [loop.create_task(_read_stdout(gw)), loop.create_task(_read_stderr(gw))])
        )
        listening = await gw.wait_event("listening", timeout=START_TIMEOUT)
        gw.port = int(listening["listen"].rpartition(":")[2])
        gw.admin_port = int(listening["admin"].rpartition(":")[2])
        if wait_for_sighup_handler:
            await wait_for(lambda: sighup_handled(proc.pid), START_TIMEOUT)
        return gw

    yield start

    problems = []
    for gw, readers in started:
        proc = gw.proc
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                problems.append(f"pid {proc.pid} ignored SIGTERM for {STOP_TIMEOUT}s")
        for task in readers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await task
        if proc.returncode != 0:
            problems.append(f"pid {proc.pid} exited with {proc.returncode}")
        if b"Traceback" in gw.stderr:
            problems.append(f"pid {proc.pid} printed a traceback:\n{gw.stderr.decode()}")
        faults = [e for e in gw.events if e.get("event") in ("internal_error", "deadline_fault")]
        if faults and not gw.faults_expected:
            problems.append(f"pid {proc.pid} logged faults: {faults}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ HTTP helpers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    method: str,
    url: str,
    token: str | None = None,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> Answer:
    """One request; a fresh connection unless a session is given."""
    all_headers = {**(bearer(token) if token is not None else {}), **(headers or {})}
    own = session is None
    s = session or aiohttp.ClientSession(auto_decompress=False)
    try:
        async with s.request(method, url, data=body or None, headers=all_headers) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())
    finally:
        if own:
            await s.close()


def write_atomic(path: Path, text: str) -> None:
    """Replace a file the way editors and config tools do: new inode, rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------ config


def new_token() -> str:
    """A fresh 256-bit token, as ``obs-gateway hash-token`` makes them."""
    return secrets.token_urlsafe(32)


def token_block(
    token_id: str, token: str, *, not_before: str | None = None, not_after: str | None = None
) -> str:
    lines = ["[[credentials.tokens]]", f'id = "{token_id}"', f'sha256 = "{sha256(token.encode())}"']
    if not_before is not None:
        lines.append(f'not_before = "{not_before}"')
    if not_after is not None:
        lines.append(f'not_after = "{not_after}"')
    return "\n".join(lines) + "\n"


def lifecycle_config(
    upstream_url: str, credentials: str, *, extra: str = "", otlp_upstream: str | None = None
) -> str:
    """Both routes to ``upstream_url``; a short drain so teardown is quick."""
    return config_text(
        upstream_url + "/api/v1/write",
        (otlp_upstream or upstream_url) + "/v1/traces",
        server="drain_timeout_seconds = 2.0",
        extra=extra,
        credentials=credentials,
    )


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
