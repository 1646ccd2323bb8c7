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

from gateway.process.fork import WORKER_NAME
from tests.conftest import TOKEN, sha256
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.process import RELOAD_EVENTS, GatewayProcess
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


# -- a worker that does not answer a reload in time -------------------------------------
OLD_TOKEN = "reload-token-old-0123456789abcdef"
NEW_TOKEN = "reload-token-new-0123456789abcdef"


def _credentials(*tokens: tuple[str, str]) -> str:
    blocks = "".join(
        f'[[credentials.tokens]]\nid = "{tid}"\nsha256 = "{sha256(tok.encode())}"\n'
        for tid, tok in tokens
    )
    return f'[[credentials]]\nname = "ingest"\nroutes = ["remote_write", "otlp_traces"]\n{blocks}'


def _worker_pids(supervisor: int) -> dict[int, int]:
    """worker index → pid, from the children's names (forked workers share
    the supervisor's command line; gateway/process/fork.py names them)."""
    out: dict[int, int] = {}
    prefix = WORKER_NAME.partition("%")[0]
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        for child in (task / "children").read_text().split():
            name = Path(f"/proc/{child}/comm").read_text().strip()
            if name.startswith(prefix):
                out[int(name.removeprefix(prefix))] = int(child)
    return out


async def _statuses_on_every_worker(
    proc: GatewayProcess, token: str, tag: str
) -> dict[int, set[int]]:
    """Fresh connections with ``token`` until both workers answered one:
    worker index → the statuses it gave (matched by X-Request-Id)."""
    sent: dict[str, int] = {}
    seen: dict[int, set[int]] = {}
    for i in range(60):
        rid = f"{tag}-{i}"
        async with raw_client(proc.port) as conn:
            await conn.send(
                request("POST", "/api/v1/write", b"x", token=token, headers=[("X-Request-Id", rid)])
            )
            sent[rid] = (await conn.response()).status
        await asyncio.sleep(0.25)  # access lines are flushed a few times a second
        seen = {}
        for line in proc.find("request"):
            if line.get("request_id") in sent:
                seen.setdefault(int(line["worker"]), set()).add(int(line["status"]))
        if len(seen) == 2:
            break
    return seen


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read(-1)
    writer.close()
    return data.decode()


async def test_a_worker_that_misses_the_reload_deadline_fails_it_everywhere(
    tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """Worker 1 is stopped (SIGSTOP: swapped out, starved) while a reload
    adds a token.  The reload must fail after the ack deadline and leave
    every worker and the supervisor's metrics on the old config, also once
    worker 1 runs again and answers late.  That late answer must not be
    taken for the answer to the next reload (while worker 1 is stopped
    again): that one fails too.  With every worker running, the same
    config then reloads."""
    config = tmp_path / "gateway.toml"
    old = hostile_config(strict_upstream, credentials=_credentials(("old", OLD_TOKEN)))
    new = hostile_config(
        strict_upstream, credentials=_credentials(("old", OLD_TOKEN), ("new", NEW_TOKEN))
    )
    config.write_text(old)
    proc = GatewayProcess(config, args=("--workers", "2"))
    stopped: int | None = None
    try:
        await proc.start()
        assert proc.proc is not None
        workers = _worker_pids(proc.proc.pid)
        assert sorted(workers) == [0, 1]
        config.write_text(new)
        os.kill(workers[1], signal.SIGSTOP)
        stopped = workers[1]
        since = proc.mark()
        os.kill(proc.proc.pid, signal.SIGHUP)
        outcome = await proc.wait_event(RELOAD_EVENTS, since, timeout=15.0)
        assert outcome["event"] == "config_reload_failed", (
            "a stopped worker cannot have acknowledged"
        )
        # The supervisor's metrics still describe the config in force.
        metrics = await _metrics(proc.admin_port)
        assert 'token_id="old"' in metrics
        assert 'token_id="new"' not in metrics
        os.kill(workers[1], signal.SIGCONT)
        stopped = None
        await asyncio.sleep(1.0)  # worker 1 handles what was queued for it
        # One config on every worker: the old one.
        assert await _statuses_on_every_worker(proc, NEW_TOKEN, "a") == {0: {401}, 1: {401}}
        assert await _statuses_on_every_worker(proc, OLD_TOKEN, "b") == {0: {204}, 1: {204}}
        # Worker 1 stalls again: its late answer to the first reload must
        # not pass for an answer to this one.
        os.kill(workers[1], signal.SIGSTOP)
        stopped = workers[1]
        since = proc.mark()
        os.kill(proc.proc.pid, signal.SIGHUP)
        outcome = await proc.wait_event(RELOAD_EVENTS, since, timeout=15.0)
        assert outcome["event"] == "config_reload_failed", (
            "worker 1 is stopped: nothing acknowledged"
        )
        os.kill(workers[1], signal.SIGCONT)
        stopped = None
        await asyncio.sleep(1.0)
        # Everyone running: the same config reloads, on every worker.
        since = proc.mark()
        os.kill(proc.proc.pid, signal.SIGHUP)
        await proc.wait_event("config_reloaded", since, timeout=15.0)
        assert await _statuses_on_every_worker(proc, NEW_TOKEN, "c") == {0: {204}, 1: {204}}
        assert 'token_id="new"' in await _metrics(proc.admin_port)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        await proc.stop()
