"""Fixtures for credential-lifecycle tests against the real process.

``gateway_process`` starts ``obs-gateway run`` (the installed console
script, as tests.support.process.GatewayProcess) on loopback ports it
chooses itself, and stops it with SIGTERM at teardown, failing the test if
it did not exit cleanly, printed a traceback or logged a fault.  Reloads
are real SIGHUPs; a test waits for the ``config_reloaded`` /
``config_reload_failed`` line the signal caused, never for a fixed time.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import config_text, sha256
from tests.support.process import OBS_GATEWAY, GatewayProcess

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


# ------------------------------------------------------------------ process


StartProcess = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def gateway_process() -> AsyncIterator[StartProcess]:
    """Start ``obs-gateway run --config PATH --workers N``; stopped at teardown."""
    started: list[GatewayProcess] = []

    async def start(
        config: Path,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        *,
        wait_for_sighup_handler: bool = True,
        faults_expected: bool = False,
    ) -> GatewayProcess:
        gw = GatewayProcess(
            config,
            ("--workers", str(workers)),
            env=env or {},
            command=(OBS_GATEWAY,),
            cwd=config.parent,
        )
        gw.faults_expected = faults_expected
        started.append(gw)
        await gw.start(START_TIMEOUT, wait_for_sighup_handler=wait_for_sighup_handler)
        return gw

    yield start

    problems = []
    for gw in started:
        if not gw.started:
            continue
        proc = gw.proc
        if proc.returncode is None:
            try:
                await gw.terminate(STOP_TIMEOUT)
            except TimeoutError:
                problems.append(f"pid {proc.pid} ignored SIGTERM for {STOP_TIMEOUT}s")
        await gw.stop()
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
