"""Failover with whole-body replay over real sockets (issue 12): a backend
that dies holding the request (reset before a status line, timeout, a
retry status) costs the client nothing: the whole body, 1 KiB to 8 MiB,
Content-Length or chunked, reaches another backend byte for byte.  A body
over the route's replay buffer streams without a copy and is never sent
anywhere truncated; nothing is replayed once an answer started; the
client gets the protocol's answer only when every attempt failed."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from gateway.process.gateway import Gateway
from tests.conftest import StartGateway, wait_for
from tests.support.backends import backends_config
from tests.support.client import Closed, raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.routes import ROUTE_IDS, ROUTES, RouteCase, assert_error_body
from tests.support.sockets import refused_port
from tests.support.upstreams import (
    Behaviour,
    RawUpstream,
    UpConn,
    answer_with,
    hang,
    reset_after_bytes,
    reset_after_request,
)
from tests.support.wire import Response, chunked, request_bytes

WRITE = "/api/v1/write"
KIB, MIB = 1024, 1024 * 1024


def body_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def start_up(behaviour: Behaviour | None = None) -> RawUpstream:
    up = RawUpstream(behaviour)
    await up.start()
    return up


async def two(
    start_gateway: StartGateway,
    a: RawUpstream,
    b: RawUpstream,
    rw_keys: str = "",
    upstream: str = "",
) -> Gateway:
    return await start_gateway(
        backends_config(
            [a.url + WRITE, b.url + WRITE],
            rw_keys='balance = "first_available"\n' + rw_keys,
            otlp_keys='balance = "first_available"\n' + rw_keys,
            upstream=upstream,
        )
    )


async def post(gw: Gateway, body: bytes, *, path: str = WRITE, framing: str = "length") -> Response:
    if framing == "chunked":
        data = request_bytes("POST", path, [("Transfer-Encoding", "chunked")])
        # Several chunks, as a streaming sender writes them.
        step = max(1, len(body) // 7)
        data += chunked(*(body[i : i + step] for i in range(0, len(body), step)))
    else:
        data = request_bytes("POST", path, body=body)
    return await raw_request(gw.port, data, timeout=30)


@pytest.mark.parametrize(
    ("size", "framing"),
    [(KIB, "length"), (MIB, "length"), (8 * MIB, "length"), (MIB, "chunked")],
    ids=["1KiB", "1MiB", "8MiB", "1MiB-chunked"],
)
async def test_a_backend_dying_with_the_whole_body_costs_the_client_nothing(
    start_gateway: StartGateway, size: int, framing: str
) -> None:
    """A reads the whole request, then resets without a status line: the
    body is replayed on B, whole, and the client gets B's answer."""
    a, b = await start_up(reset_after_request), await start_up()
    try:
        gw = await two(start_gateway, a, b)
        body = body_of(size)
        resp = await post(gw, body, framing=framing)
        assert resp.status == 204
        [seen_a] = a.requests
        [seen_b] = b.requests
        assert seen_a.body == body  # A had it all (and died)
        assert hashlib.sha256(seen_b.body).digest() == hashlib.sha256(body).digest()
        assert seen_b.chunked == (framing == "chunked")
        assert b.errors == []
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_retries_total", route="remote_write", reason="reset") == 1
        replayed = m.value("gateway_upstream_replayed_bytes_total", route="remote_write")
        assert replayed >= size  # chunk framing included when chunked
        assert m.value("gateway_replay_buffer_bytes") == 0
        codes = m.by("gateway_requests_total", "code", route="remote_write")
        assert codes == {"204": 1}
    finally:
        await a.stop()
        await b.stop()


async def test_failover_mid_body_streams_the_rest_to_the_next_backend(
    start_gateway: StartGateway,
) -> None:
    """Streaming stays the default: A sees the first bytes before the client
    sent the last; A dies mid-body; B gets what was sent so far from the
    copy, then the rest as it arrives."""
    a, b = await start_up(reset_after_bytes(300 * KIB)), await start_up()
    try:
        gw = await two(start_gateway, a, b)
        body = body_of(2 * MIB)
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", WRITE, content_length=len(body)))
            await client.send(body[: MIB // 2])
            await wait_for(lambda: b.connections == 1 and len(b.received) > 256 * KIB)
            assert len(a.received) >= 300 * KIB  # it had the first part first
            await client.send(body[MIB // 2 :])
            resp = await client.response(timeout=30)
        assert resp.status == 204
        [seen_b] = b.requests
        assert seen_b.body == body
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_a_timeout_and_a_retry_status_fail_over_and_only_all_failed_is_answered(
    start_gateway: StartGateway, case: RouteCase
) -> None:
    """A hangs past the response timeout, B answers 503 (a retry status):
    with three backends C answers.  With two, the client gets B's own 503
    (an answer passes through)."""

    async def busy(conn: UpConn) -> None:
        while await conn.next_request() is not None:
            await conn.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    a, b, c = await start_up(hang), await start_up(busy), await start_up()
    try:
        path = case.path
        urls = [u.url + path for u in (a, b, c)]
        keys = 'balance = "first_available"\nattempts = 3'
        rw, otlp = (urls, None) if not case.otlp else ([u.url + WRITE for u in (a, b, c)], urls)
        gw = await start_gateway(
            backends_config(
                rw, otlp, rw_keys=keys, otlp_keys=keys, upstream="response_timeout_seconds = 0.5"
            )
        )
        body = body_of(64 * KIB)
        resp = await post(gw, body, path=path)
        assert resp.status == 204
        assert [r.body == body for r in c.requests] == [True]
        m = await scrape(gw.admin_port)
        assert m.by("gateway_upstream_retries_total", "reason", route=case.name) == {
            "timeout": 1,
            "status": 1,
        }
        assert (
            m.value(
                "gateway_upstream_failures_total",
                route=case.name,
                backend=b.url[7:],
                kind="status",
            )
            == 1
        )
    finally:
        for up in (a, b, c):
            await up.stop()


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_every_attempt_failing_gets_the_protocols_answer(
    start_gateway: StartGateway, case: RouteCase
) -> None:
    with refused_port() as p1, refused_port() as p2:
        urls = [f"http://127.0.0.1:{p}{case.path}" for p in (p1, p2)]
        rw, otlp = (urls, None) if not case.otlp else ([u + "x" for u in urls], urls)
        gw = await start_gateway(backends_config(rw, otlp))
        resp = await post(gw, body_of(KIB), path=case.path)
    assert resp.status == case.status(502, 503)
    assert resp.header("Retry-After") is None
    assert_error_body(resp, case)
    m = await scrape(gw.admin_port)
    assert m.value("gateway_upstream_retries_total", route=case.name, reason="connect") == 1
    assert m.sum("gateway_upstream_errors_total", route=case.name, kind="connect") == 2


async def test_a_retry_status_from_the_last_backend_passes_through(
    start_gateway: StartGateway,
) -> None:
    answer = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nRetry-After: 7\r\n\r\nread-only"
    )
    a, b = await start_up(answer_with(answer)), await start_up(answer_with(answer))
    try:
        gw = await two(start_gateway, a, b)
        resp = await post(gw, body_of(KIB))
        assert (resp.status, resp.body, resp.header("Retry-After")) == (503, b"read-only", "7")
        assert (len(a.requests), len(b.requests)) == (1, 1)
    finally:
        await a.stop()
        await b.stop()


async def test_nothing_is_replayed_once_the_answer_started(start_gateway: StartGateway) -> None:
    """A sends a status line and part of its body, then resets: the client
    sees its connection cut (never a short success, never B's answer after
    A's head), and B sees nothing."""

    async def half_answer(conn: UpConn) -> None:
        await conn.next_request()
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        conn.reset()

    a, b = await start_up(half_answer), await start_up()
    try:
        gw = await two(start_gateway, a, b)
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", WRITE, body=body_of(KIB)))
            with pytest.raises(Closed):
                await client.response()
            assert client.raw.startswith(b"HTTP/1.1 200 OK\r\n")
            assert client.raw.count(b"HTTP/1.1") == 1
        assert b.connections == 0
        m = await scrape(gw.admin_port)
        assert m.sum("gateway_upstream_retries_total") == 0
        assert m.sum("gateway_upstream_replayed_bytes_total") == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_5xx_that_is_not_a_retry_status_passes_and_counts_against_the_backend(
    start_gateway: StartGateway,
) -> None:
    answer = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
    a, b = await start_up(answer_with(answer)), await start_up()
    try:
        gw = await two(
            start_gateway, a, b, upstream="eject_base_seconds = 60\neject_max_seconds = 60"
        )
        resp = await post(gw, body_of(KIB))
        assert (resp.status, resp.body) == (500, b"oops")
        assert b.connections == 0
        assert (await post(gw, body_of(KIB))).status == 204  # A is ejected: B
        m = await scrape(gw.admin_port)
        assert (
            m.value(
                "gateway_upstream_failures_total",
                route="remote_write",
                backend=a.url[7:],
                kind="status",
            )
            == 1
        )
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_over_the_replay_buffer_streams_without_a_copy_and_never_truncated(
    start_gateway: StartGateway, framing: str
) -> None:
    """replay_buffer_bytes = 64 KiB, a 256 KiB body, A dies after reading
    it: no copy, so no replay: the client gets 502 (and retries), B never
    sees a byte, let alone a truncated body sent as complete."""
    a, b = await start_up(reset_after_request), await start_up()
    try:
        gw = await two(start_gateway, a, b, rw_keys=f"replay_buffer_bytes = {64 * KIB}")
        resp = await post(gw, body_of(256 * KIB), framing=framing)
        assert resp.status == 502
        assert b.connections == 0
        m = await scrape(gw.admin_port)
        assert (
            m.value("gateway_replay_skipped_total", route="remote_write", reason="too_large") == 1
        )
        assert m.sum("gateway_upstream_retries_total") == 0
        assert m.value("gateway_replay_buffer_bytes") == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_refused_connect_fails_over_whatever_the_body_size(
    start_gateway: StartGateway,
) -> None:
    """Nothing was sent to a backend that refused: the request goes on
    whole even with no replay copy at all."""
    b = await start_up()
    try:
        with refused_port() as dead:
            gw = await start_gateway(
                backends_config(
                    [f"http://127.0.0.1:{dead}{WRITE}", b.url + WRITE],
                    rw_keys='balance = "first_available"\nreplay_buffer_bytes = 0',
                )
            )
            body = body_of(3 * MIB)
            resp = await post(gw, body)
        assert resp.status == 204
        assert [r.body == body for r in b.requests] == [True]
    finally:
        await b.stop()


async def test_replay_memory_is_bounded_per_worker(start_gateway: StartGateway) -> None:
    """replay_memory_bytes = 1 MiB: of three 400 KiB bodies held by A, two
    get a copy (800 KiB in use), the third streams without one (counted).
    A dies: the two are replayed on B, the third gets 502.  The copies are
    given back."""
    release = asyncio.Event()

    async def hold_then_reset(conn: UpConn) -> None:
        await conn.next_request()
        await release.wait()
        conn.reset()

    a, b = await start_up(hold_then_reset), await start_up()
    try:
        gw = await two(start_gateway, a, b, upstream=f"replay_memory_bytes = {MIB}")
        tasks = []
        for n in range(1, 4):
            tasks.append(asyncio.create_task(post(gw, body_of(400 * KIB))))
            await wait_for(lambda n=n: len(a.requests) == n)  # type: ignore[misc]
        m = await scrape(gw.admin_port)
        assert m.value("gateway_replay_buffer_bytes") == 800 * KIB
        assert m.value("gateway_replay_skipped_total", route="remote_write", reason="memory") == 1
        release.set()
        statuses = sorted([(await t).status for t in tasks])
        assert statuses == [204, 204, 502]
        assert len(b.requests) == 2
        m = await scrape(gw.admin_port)
        assert m.value("gateway_replay_buffer_bytes") == 0
    finally:
        release.set()
        await a.stop()
        await b.stop()


async def test_a_chunked_body_grows_its_copy_within_the_bound(start_gateway: StartGateway) -> None:
    """A chunked body's copy reserves memory in steps: a 1 MiB body passes
    with replay_memory_bytes = 1 MiB; a second one streaming at the same
    time finds the pool used up mid-body and continues without a copy."""
    release = asyncio.Event()

    async def hold(conn: UpConn) -> None:
        await conn.next_request()
        await release.wait()
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    a, b = await start_up(hold), await start_up()
    try:
        gw = await two(start_gateway, a, b, upstream=f"replay_memory_bytes = {MIB + 64 * KIB}")
        first = asyncio.create_task(post(gw, body_of(MIB), framing="chunked"))
        await wait_for(lambda: len(a.requests) == 1)
        second = asyncio.create_task(post(gw, body_of(MIB), framing="chunked"))
        await wait_for(lambda: len(a.requests) == 2)
        m = await scrape(gw.admin_port)
        assert m.value("gateway_replay_buffer_bytes") <= MIB + 64 * KIB
        assert m.value("gateway_replay_skipped_total", route="remote_write", reason="memory") == 1
        release.set()
        assert [(await first).status, (await second).status] == [204, 204]
        m = await scrape(gw.admin_port)
        assert m.value("gateway_replay_buffer_bytes") == 0
    finally:
        release.set()
        await a.stop()
        await b.stop()
