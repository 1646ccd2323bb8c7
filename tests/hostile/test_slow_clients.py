"""Slow and vanishing clients: slowloris heads, stalled and trickling bodies,
thousands of idle connections, and clients that disconnect mid-body.

Timeouts are configured short (0.5 s), so every case ends in about a second.
The trickling senders pace themselves with sleeps: that is the attack, not
synchronisation; every wait on the gateway is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import MutableMapping
from typing import Any

import pytest

from gateway.process.gateway import Gateway
from tests.conftest import TOKEN, StartGateway, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import RawClient, raw_client
from tests.support.upstreams import RawUpstream
from tests.support.wire import parse_statuses, request

HEADER_TIMEOUT = 0.5
BODY_IDLE = 0.5
# The sweeper ticks every timeout / 5; allow that, a loaded CI box, and more.
SLACK = 1.0


def _head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


async def _trickle(conn: RawClient, data: bytes, every: float, closed: asyncio.Event) -> None:
    """Send ``data`` a byte at a time, the slowloris way, until refused."""
    for i in range(len(data)):
        if closed.is_set():
            return
        try:
            await conn.send(data[i : i + 1])
        except (ConnectionResetError, BrokenPipeError):
            return
        await asyncio.sleep(every)


async def test_slowloris_head_is_closed_at_the_header_timeout(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    head = _head("/api/v1/write", 4) + b"abcd"
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        closed = asyncio.Event()
        sender = asyncio.create_task(_trickle(conn, head, 0.05, closed))
        stream = await conn.eof(timeout=HEADER_TIMEOUT + SLACK + 1)
        elapsed = time.monotonic() - t0
        closed.set()
        await sender
    # Still sending (one byte per 50 ms) yet cut off: the limit is on the
    # whole head, not on the gap between bytes.
    assert HEADER_TIMEOUT - 0.05 <= elapsed <= HEADER_TIMEOUT + SLACK, elapsed
    assert parse_statuses(stream) in ([], [408])
    assert strict_upstream.conns == []


async def test_silent_connection_is_closed_at_the_header_timeout(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        assert await conn.closed(HEADER_TIMEOUT + SLACK)
        assert time.monotonic() - t0 >= HEADER_TIMEOUT - 0.05


async def test_slowloris_on_a_kept_alive_connection(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The second head on a connection has its own header deadline."""
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server=f"header_timeout_seconds = {HEADER_TIMEOUT}\nkeepalive_timeout_seconds = 30",
        )
    )
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN))
        assert (await conn.response()).status == 204
        t0 = time.monotonic()
        closed = asyncio.Event()
        sender = asyncio.create_task(
            _trickle(conn, request("POST", "/api/v1/write", b"two", token=TOKEN), 0.05, closed)
        )
        await conn.eof(timeout=HEADER_TIMEOUT + SLACK + 1)
        closed.set()
        await sender
        assert time.monotonic() - t0 <= HEADER_TIMEOUT + SLACK
    assert [r.body for r in strict_upstream.requests] == [b"one"]


async def test_idle_keep_alive_connection_is_closed(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream, server="header_timeout_seconds = 5\nkeepalive_timeout_seconds = 0.5"
        )
    )
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN))
        assert (await conn.response()).status == 204
        t0 = time.monotonic()
        assert await conn.closed(0.5 + SLACK)
        assert time.monotonic() - t0 >= 0.45


@pytest.mark.parametrize(
    ("path", "status", "content_type"),
    [
        ("/api/v1/write", 408, "text/plain; charset=utf-8"),
        ("/v1/traces", 503, "application/x-protobuf"),
    ],
)
async def test_stalled_body_is_timed_out_and_never_completed_upstream(
    path: str,
    status: int,
    content_type: str,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(_head(path, 1000) + b"x" * 100)
        await wait_for(lambda: len(strict_upstream.received) > 100)  # streaming began
        t0 = time.monotonic()
        resp = await conn.response(timeout=BODY_IDLE + SLACK + 1)
        elapsed = time.monotonic() - t0
        assert await conn.closed(3.0)
    assert resp.status == status
    assert resp.header("Content-Type") == content_type
    assert resp.header("Connection") == "close"
    if status == 503:
        assert resp.header("Retry-After") == "1"
    assert elapsed <= BODY_IDLE + SLACK
    await wait_for(lambda: all(c.closed.is_set() for c in strict_upstream.conns))
    assert strict_upstream.requests == []
    assert [e.get("error") for e in log_capture if e.get("event") == "request"] == [
        "client_timeout"
    ]


async def test_stalled_json_otlp_body_gets_a_json_status(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(_head("/v1/traces", 1000, "Content-Type: application/json\r\n") + b"{")
        resp = await conn.response(timeout=BODY_IDLE + SLACK + 1)
    assert resp.status == 503
    assert resp.header("Content-Type") == "application/json"
    assert resp.body.startswith(b'{"code":14')
    assert strict_upstream.requests == []


MIN_RATE = """
[limits]
min_body_rate_bytes_per_second = 1000
min_body_rate_grace_seconds = 0.3
"""
SLOW_BODY_SERVER = "header_timeout_seconds = 2\nbody_idle_timeout_seconds = 2"


async def test_trickling_body_below_the_minimum_rate_is_cut(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """20 bytes every 100 ms (200 B/s) never trips the idle timeout, but is
    under the 1000 B/s floor: cut after the grace period with a 408."""
    gw = await start_gateway(
        hostile_config(strict_upstream, server=SLOW_BODY_SERVER, extra=MIN_RATE)
    )
    async with raw_client(gw.port) as conn:
        await conn.send(_head("/api/v1/write", 100_000))
        t0 = time.monotonic()
        done = asyncio.Event()

        async def drip() -> None:
            for _ in range(100):  # at most 10 s, far beyond the expected cut
                if done.is_set():
                    return
                try:
                    await conn.send(b"y" * 20)
                except (ConnectionResetError, BrokenPipeError):
                    return
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(drip())
        resp = await conn.response(timeout=5.0)
        elapsed = time.monotonic() - t0
        done.set()
        await sender
    assert resp.status == 408
    assert 0.3 <= elapsed <= 0.3 + SLACK, elapsed
    await wait_for(lambda: all(c.closed.is_set() for c in strict_upstream.conns))
    assert strict_upstream.requests == []


async def test_steady_body_above_the_minimum_rate_passes(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The floor does not hurt a slow but honest sender (4x the minimum)."""
    gw = await start_gateway(
        hostile_config(strict_upstream, server=SLOW_BODY_SERVER, extra=MIN_RATE)
    )
    chunk, n = b"z" * 200, 10  # 200 bytes / 50 ms = 4000 B/s for 0.5 s
    async with raw_client(gw.port) as conn:
        await conn.send(_head("/api/v1/write", len(chunk) * n))
        for _ in range(n):
            await conn.send(chunk)
            await asyncio.sleep(0.05)
        resp = await conn.response()
    assert resp.status == 204
    [req] = strict_upstream.requests
    assert req.body == chunk * n


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_disconnect_mid_body_never_completes_upstream(
    how: str,
    framing: str,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    part = b"p" * 50_000
    if framing == "chunked":
        head = _head("/api/v1/write", 0).replace(
            b"Content-Length: 0", b"Transfer-Encoding: chunked"
        )
        data = head + b"%x\r\n" % len(part) + part + b"\r\n"
    else:
        data = _head("/api/v1/write", 100_000) + part
    conn = await RawClient.open(gw.port)
    await conn.send(data)
    await wait_for(lambda: b"ppppp" in strict_upstream.received)
    if how == "rst":
        conn.abort()
    else:
        await conn.close()
    await wait_for(lambda: all(c.closed.is_set() for c in strict_upstream.conns))
    assert strict_upstream.requests == []
    [up] = strict_upstream.conns
    body = bytes(up.data).partition(b"\r\n\r\n")[2]
    assert body.count(b"p") == len(body.strip(b"0123456789abcdef\r\n"))  # nothing but ours
    assert len(body) < len(data)
    assert not body.endswith(b"0\r\n\r\n")
    await wait_for(lambda: any(e.get("status") == 499 for e in log_capture))
    [line] = [e for e in log_capture if e.get("event") == "request"]
    assert line["status"] == 499
    assert gw.stats.pairs["remote_write", "ingest"].codes == {499: 1}


async def _open_many(port: int, n: int, first_bytes: bytes) -> list[RawClient]:
    conns: list[RawClient] = []

    async def one() -> None:
        conn = await RawClient.open(port)
        conns.append(conn)
        if first_bytes:
            await conn.send(first_bytes)

    for start in range(0, n, 250):
        await asyncio.gather(*(one() for _ in range(min(250, n - start))))
    return conns


async def _close_all(conns: list[RawClient]) -> None:
    for conn in conns:
        conn.writer.close()
    for conn in conns:
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()


IDLE_CONNECTIONS = 2000


async def test_thousands_of_idle_connections_do_not_delay_a_valid_request(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """2000 connections each holding a half-sent head, next to one real
    sender: its request is answered at once, and the sweeper then closes
    every idle one at the header timeout."""
    header_timeout = 3.0
    gw: Gateway = await start_gateway(
        hostile_config(strict_upstream, server=f"header_timeout_seconds = {header_timeout}")
    )
    partial = b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nX-Slow: "
    conns = await _open_many(gw.port, IDLE_CONNECTIONS, partial)
    try:
        await wait_for(lambda: gw.stats.open_connections >= IDLE_CONNECTIONS, 5.0)
        async with raw_client(gw.port) as good:
            t0 = time.monotonic()
            await good.send(request("POST", "/api/v1/write", b"valid", token=TOKEN))
            resp = await good.response()
            elapsed = time.monotonic() - t0
        assert resp.status == 204
        assert elapsed < 0.5, elapsed
        assert [r.body for r in strict_upstream.requests] == [b"valid"]
        # The sweeper closes them all at the header deadline (one pass, no per-connection timers).
        await wait_for(lambda: gw.stats.open_connections == 0, header_timeout + 3.0)
        closed = await asyncio.gather(*(c.closed(2.0) for c in conns))
        assert all(closed)
    finally:
        await _close_all(conns)
