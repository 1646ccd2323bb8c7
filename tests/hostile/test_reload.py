"""Hostile reloads of the real CLI: a SIGHUP at the first moment the gateway
says it is listening, and a config that check-config accepts but the server
cannot build (an upstream host IDNA cannot encode)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.process import GatewayProcess
from tests.support.upstreams import RawUpstream
from tests.support.wire import request


async def _post(port: int, body: bytes) -> int:
    async with raw_client(port) as conn:
        await conn.send(request("POST", "/api/v1/write", body, token=TOKEN))
        return (await conn.response()).status


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_as_soon_as_listening_is_a_reload(
    workers: str, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """'listening' is the readiness signal operators and supervisors act on;
    a SIGHUP sent the moment it is printed must reload, not kill the
    process (SIGHUP's default action).  The line is read straight from the
    pipe so the signal follows it within a millisecond or so."""
    config = tmp_path / "gateway.toml"
    config.write_text(hostile_config(strict_upstream))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "gateway", "run", "--config", str(config), "--workers", workers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    reloaded = False
    try:
        async with asyncio.timeout(20.0):
            while line := await proc.stdout.readline():
                if b'"event":"listening"' in line:
                    os.kill(proc.pid, signal.SIGHUP)
                elif b'"event":"config_reloaded"' in line:
                    reloaded = True
                    break
        assert reloaded, f"no reload; the gateway exited with {await proc.wait()}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        await proc.stdout.read()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_unservable_config_is_a_failed_reload_and_later_reloads_work(
    workers: str, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    good = hostile_config(strict_upstream)
    bad = good.replace(f"http://127.0.0.1:{strict_upstream.port}/api/v1/write", "http://ö..x/w")
    assert bad != good
    config = tmp_path / "gateway.toml"
    config.write_text(good)
    proc = GatewayProcess(config, args=("--workers", workers))
    try:
        await proc.start()
        assert proc.proc is not None
        # A served request: the process is past start-up (see the test above)
        # and handles SIGHUP.
        assert await _post(proc.port, b"first") == 204
        config.write_text(bad)
        os.kill(proc.proc.pid, signal.SIGHUP)
        # Refused and said so, like any invalid config.
        await proc.wait_event(("config_reload_failed", "config_reload_partial"), timeout=5.0)
        assert await _post(proc.port, b"old-config") == 204
        config.write_text(good)
        os.kill(proc.proc.pid, signal.SIGHUP)
        await proc.wait_event("config_reloaded", timeout=15.0)
        assert not proc.find("config_reload_partial"), proc.find("config_reload_partial")
        assert await _post(proc.port, b"new-config") == 204
    finally:
        await proc.stop()
    # Grouped by upstream connection (one pool per worker), so compare as a set.
    bodies = sorted(r.body for r in strict_upstream.requests)
    assert bodies == sorted([b"first", b"old-config", b"new-config"])
