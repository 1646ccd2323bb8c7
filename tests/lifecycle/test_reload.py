"""Hot reload of the real process: SIGHUP under load, bad configs, token
files re-read, file watching.  Every reload here is a real signal to
``obs-gateway run``; with ``--workers 2`` the supervisor must carry each one
to both workers, which the access log proves (it names the worker).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RecordingUpstream, sha256, wait_for
from tests.lifecycle.conftest import (
    StartProcess,
    bearer,
    call,
    lifecycle_config,
    new_token,
    token_block,
    write_atomic,
)
from tests.support.process import GatewayProcess

WRITE = "/api/v1/write"
BODY = b"\x00remote-write-ish snappy bytes\xff" * 8
RELOADS = 5


def credentials(*tokens: tuple[str, str]) -> str:
    blocks = "".join(token_block(token_id, token) for token_id, token in tokens)
    return f"""
[[credentials]]
name = "ingest"
routes = ["remote_write", "otlp_traces"]
{blocks}
"""


async def served_by_every_worker(
    gw: GatewayProcess, token_id: str, token: str, workers: int
) -> None:
    """Fresh connections with ``token`` until every worker has answered one:
    the kernel spreads connections over SO_REUSEPORT listeners, so a worker
    that missed the reload would answer one of them 401."""
    since = gw.mark()

    def workers_seen() -> set[object]:
        lines = gw.find("request", since, token_id=token_id, status=204)
        return {line.get("worker") for line in lines}

    async with asyncio.timeout(15):
        while len(workers_seen()) < workers:
            answer = await call("POST", gw.url + WRITE, token, BODY)
            assert answer.status == 204, f"{token_id}: {answer.status} on some worker"
            await asyncio.sleep(0.02)  # access lines are flushed a few times a second
    if workers > 1:
        assert workers_seen() == set(range(workers))


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_under_load_fails_no_request(
    workers: int,
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
) -> None:
    steady = new_token()
    rotating = [new_token() for _ in range(RELOADS + 1)]
    config = tmp_path / "gateway.toml"

    def write(generation: int) -> None:
        tokens = ("steady", steady), (f"gen{generation}", rotating[generation])
        write_atomic(config, lifecycle_config(upstream.url, credentials(*tokens)))

    write(0)
    gw = await gateway_process(config, workers)

    stop = asyncio.Event()
    statuses: Counter[int] = Counter()
    errors: list[str] = []

    async def sender(force_close: bool) -> None:
        # Two senders keep their connection alive across reloads (like
        # vmagent), two open a new one per request (like a short-lived job).
        connector = aiohttp.TCPConnector(force_close=force_close)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            while not stop.is_set():
                try:
                    async with session.post(
                        gw.url + WRITE, data=BODY, headers=bearer(steady)
                    ) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except aiohttp.ClientError as exc:
                    errors.append(repr(exc))

    def done() -> int:
        return sum(statuses.values()) + len(errors)

    senders = [asyncio.create_task(sender(close)) for close in (False, False, True, True)]
    try:
        await wait_for(lambda: done() >= 100, 10)
        for generation in range(1, RELOADS + 1):
            write(generation)
            before = done()
            outcome = await gw.reload()
            assert outcome["event"] == "config_reloaded", outcome
            # The token this reload added works on every worker; the one it
            # removed is refused there.
            await served_by_every_worker(gw, f"gen{generation}", rotating[generation], workers)
            old = await call("POST", gw.url + WRITE, rotating[generation - 1], BODY)
            assert old.status == 401
            # Traffic kept flowing through the reload, and keeps flowing after it.
            await wait_for(lambda: done() >= before + 100, 10)  # noqa: B023
    finally:
        stop.set()
        await asyncio.gather(*senders)

    assert errors == []
    assert statuses.keys() == {204}, statuses
    print(f"reload under load, {workers} worker(s): {statuses[204]} requests, all 204")
    metrics = await gw.metrics()
    assert metrics.value("gateway_config_reloads_total", result="success") == RELOADS
    assert metrics.value("gateway_config_reloads_total", result="failure") == 0
    assert metrics.value("gateway_config_last_reload_successful") == 1
    # Every request of the load is counted once, summed across workers.
    assert (
        metrics.value("gateway_credential_requests_total", credential="ingest", token_id="steady")
        == statuses[204]
    )
    assert len(gw.find("config_reloaded")) == RELOADS


@pytest.mark.parametrize("workers", [1, 2])
async def test_in_flight_request_finishes_on_the_config_it_started_with(
    workers: int,
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
) -> None:
    """A body still streaming when its token is removed by a reload is
    delivered whole; the next request on that same connection is judged by
    the new config."""
    leaving, staying = new_token(), new_token()
    config = tmp_path / "gateway.toml"
    write_atomic(
        config,
        lifecycle_config(upstream.url, credentials(("leaving", leaving), ("staying", staying))),
    )
    gw = await gateway_process(config, workers)

    arrived: list[bytes] = []

    async def slow_receiver(request: web.Request) -> web.StreamResponse:
        arrived.append(request.headers.get("Content-Length", "").encode())
        arrived.append(await request.content.read())
        return web.Response(status=204)

    upstream.handler = slow_receiver
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        body = b"x" * 20_000
        writer.write(
            f"POST {WRITE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {leaving}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10_000]
        )
        await writer.drain()
        # The request is being proxied: the upstream has its head.
        await wait_for(lambda: len(arrived) >= 1, 10)
        write_atomic(config, lifecycle_config(upstream.url, credentials(("staying", staying))))
        outcome = await gw.reload()
        assert outcome["event"] == "config_reloaded", outcome
        writer.write(body[10_000:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 204"), status_line
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"connection: close" not in head.lower()
        # Same connection, new request, old token: the new config says no.
        writer.write(
            f"POST {WRITE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {leaving}\r\n"
            "Content-Length: 2\r\n\r\nxy".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 401"), status_line
    finally:
        writer.close()
    assert arrived == [b"20000", body]


BAD_CONFIGS = {
    "toml syntax": "[[credentials]\nname = ",
    # What an operator gets by pasting hash-token's line into a tokens list.
    "unknown key": '\n[[credentials]]\nname = "ingest"\nroutes = ["remote_write"]\n'
    '[[credentials.tokens]]\nid = "new"\ntoken_sha256 = "' + "a" * 64 + '"\n',
    "missing token file": '\n[[credentials]]\nname = "ingest"\nroutes = ["remote_write"]\n'
    '[[credentials.tokens]]\nid = "new"\nfile = "no/such/file"\n',
}


@pytest.mark.parametrize("workers", [1, 2])
async def test_bad_reload_keeps_the_old_config_and_says_so(
    workers: int,
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
) -> None:
    token = new_token()
    good = lifecycle_config(upstream.url, credentials(("current", token)))
    config = tmp_path / "gateway.toml"
    write_atomic(config, good)
    gw = await gateway_process(config, workers)
    started = (await gw.metrics()).value("gateway_config_last_reload_success_timestamp_seconds")

    for n, (what, credentials_text) in enumerate(BAD_CONFIGS.items(), 1):
        bad = lifecycle_config(upstream.url, credentials_text)
        write_atomic(config, bad)
        outcome = await gw.reload()
        assert outcome["event"] == "config_reload_failed", (what, outcome)
        assert outcome["error"], what
        metrics = await gw.metrics()
        assert metrics.value("gateway_config_reloads_total", result="failure") == n, what
        assert metrics.value("gateway_config_reloads_total", result="success") == 0, what
        assert metrics.value("gateway_config_last_reload_successful") == 0, what
        assert metrics.value("gateway_config_last_reload_success_timestamp_seconds") == started, (
            what
        )
        # Still the old config: its token works, on every worker.
        await served_by_every_worker(gw, "current", token, workers)
    assert "credentials[0].tokens[0].token_sha256: unknown key" in str(
        gw.find("config_reload_failed")[1]["error"]
    )
    assert "credentials[0].tokens[0].file" in str(gw.find("config_reload_failed")[2]["error"])

    write_atomic(config, good)
    outcome = await gw.reload()
    assert outcome["event"] == "config_reloaded", outcome
    metrics = await gw.metrics()
    assert metrics.value("gateway_config_reloads_total", result="success") == 1
    assert metrics.value("gateway_config_last_reload_successful") == 1
    assert metrics.value("gateway_config_last_reload_success_timestamp_seconds") > started


async def test_token_file_is_reread_on_sighup(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    first, second = new_token(), new_token()
    token_file = tmp_path / "ingest.token"
    token_file.write_text(first + "\n")  # a trailing newline, as `echo` leaves it
    config = tmp_path / "gateway.toml"
    write_atomic(
        config,
        lifecycle_config(
            upstream.url,
            '[[credentials]]\nname = "ingest"\ntoken_file = "ingest.token"\n'
            'routes = ["remote_write"]\n',
        ),
    )
    gw = await gateway_process(config)
    assert (await call("GET", gw.url + "/health", first)).status == 200

    # Overwritten in place (same inode), config file untouched.
    token_file.write_text(second + "\n")
    assert (await call("GET", gw.url + "/health", first)).status == 200  # no reload yet
    outcome = await gw.reload()
    assert outcome["event"] == "config_reloaded", outcome
    assert (await call("GET", gw.url + "/health", second)).status == 200
    assert (await call("GET", gw.url + "/health", first)).status == 401


def kubelet_swap(secret_dir: Path, name: str, content: str, version: int) -> None:
    """Update a mounted Secret the way kubelet's AtomicWriter does: a new
    timestamped directory, then the ``..data`` symlink renamed over."""
    target = secret_dir / f"..v{version}"
    target.mkdir()
    (target / name).write_text(content)
    tmp_link = secret_dir / "..data_tmp"
    tmp_link.symlink_to(target.name)
    tmp_link.replace(secret_dir / "..data")
    if not (secret_dir / name).is_symlink():
        (secret_dir / name).symlink_to(f"..data/{name}")


async def test_watch_picks_up_a_rotated_secret_without_a_signal(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    first, second = new_token(), new_token()
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    kubelet_swap(secret_dir, "ingest", first, 1)
    config = tmp_path / "gateway.toml"
    write_atomic(
        config,
        lifecycle_config(
            upstream.url,
            '[[credentials]]\nname = "ingest"\ntoken_file = "secrets/ingest"\n'
            'routes = ["remote_write"]\n',
            extra="[reload]\nwatch = true\nwatch_interval_seconds = 0.2\n",
        ),
    )
    gw = await gateway_process(config, workers=2)
    await served_by_every_worker(gw, "default", first, 2)

    since = gw.mark()
    kubelet_swap(secret_dir, "ingest", second, 2)
    outcome = await gw.wait_event(
        ("config_reloaded", "config_reload_failed", "config_reload_partial"), since
    )
    assert outcome["event"] == "config_reloaded", outcome
    await served_by_every_worker(gw, "default", second, 2)
    assert (await call("POST", gw.url + WRITE, first, BODY)).status == 401

    # An edit of the config file itself is picked up too: a second credential.
    since = gw.mark()
    other = new_token()
    write_atomic(
        config,
        config.read_text()
        + f'\n[[credentials]]\nname = "other"\ntoken_sha256 = "{sha256(other.encode())}"\n'
        'routes = ["remote_write"]\n',
    )
    outcome = await gw.wait_event(
        ("config_reloaded", "config_reload_failed", "config_reload_partial"), since
    )
    assert outcome["event"] == "config_reloaded", outcome
    health = await call("GET", gw.url + "/health", other)
    assert health.status == 200
    assert health.json()["credential"] == "other"

    # A broken edit is refused and said so (the ObsGatewayConfigReloadFailed
    # path on Kubernetes); the next good edit is picked up again.
    good = config.read_text()
    since = gw.mark()
    write_atomic(config, good.replace('name = "other"', 'name = "other"\nroutes = "oops"', 1))
    failed = await gw.wait_event(
        ("config_reloaded", "config_reload_failed", "config_reload_partial"), since
    )
    assert failed["event"] == "config_reload_failed", failed
    metrics = await gw.metrics()
    assert metrics.value("gateway_config_last_reload_successful") == 0
    assert (await call("GET", gw.url + "/health", other)).status == 200  # old config serves
    since = gw.mark()
    write_atomic(config, good.replace('name = "other"', 'name = "other2"', 1))
    outcome = await gw.wait_event(
        ("config_reloaded", "config_reload_failed", "config_reload_partial"), since
    )
    assert outcome["event"] == "config_reloaded", outcome
    assert (await call("GET", gw.url + "/health", other)).json()["credential"] == "other2"
    metrics = await gw.metrics()
    assert metrics.value("gateway_config_reloads_total", result="success") == 3
    assert metrics.value("gateway_config_reloads_total", result="failure") == 1
    assert metrics.value("gateway_config_last_reload_successful") == 1


async def test_sighup_right_after_listening_reloads(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    """Once ``listening`` is logged (and /readyz says ready), a SIGHUP must
    reload, not terminate: config tools and ``systemctl reload`` do not
    know how long ago the gateway started.  (One worker: start-up runs a
    full garbage collection between the two, which makes the window wide
    enough to hit every time; the supervisor's window is narrower but there.)"""
    config = tmp_path / "gateway.toml"
    write_atomic(config, lifecycle_config(upstream.url, credentials(("a", new_token()))))
    gw = await gateway_process(config, 1, wait_for_sighup_handler=False)
    gw.proc.send_signal(signal.SIGHUP)
    outcome = await gw.wait_event("config_reloaded", timeout=10)
    assert outcome["event"] == "config_reloaded"
