"""DESIGN §3 rows 5-6 over real sockets, for both route protocols: bodies over
the route limit get 413 (declared: before any upstream contact; streamed:
the upstream never sees a complete body), and a client that stalls mid-body
gets 408 on remote-write but 503 + Retry-After on OTLP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.conftest import (
    RecordingUpstream,
    StartGateway,
    StartRawUpstream,
    config_text,
    wait_for,
)
from tests.support.client import raw_client
from tests.support.metrics import scrape
from tests.support.routes import (
    OTLP,
    ROUTE_IDS,
    ROUTES,
    THREE_CREDENTIALS,
    RouteCase,
    assert_error_body,
)
from tests.support.upstreams import answer_with
from tests.support.wire import chunked, request_bytes

LIMIT = 64 * 1024
IDLE = 0.3  # body_idle_timeout_seconds for the stall tests


def received_at_least(upstream: RecordingUpstream, n: int) -> Callable[[], bool]:
    return lambda: bool(upstream.requests) and upstream.requests[0].received >= n


def gateway_config(url: str, **kwargs: str) -> str:
    return config_text(
        url + "/api/v1/write",
        url + "/v1/traces",
        max_body_bytes=LIMIT,
        credentials=THREE_CREDENTIALS,
        **kwargs,
    )


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100"])
async def test_declared_length_over_limit_is_413_before_upstream_contact(
    start_gateway: StartGateway,
    raw_upstream: StartRawUpstream,
    case: RouteCase,
    expect_continue: bool,
) -> None:
    up = await raw_upstream(answer_with(b"HTTP/1.1 204 No Content\r\n\r\n"))
    gw = await start_gateway(gateway_config(up.url))
    extra = [("Expect", "100-continue")] if expect_continue else []
    async with raw_client(gw.port) as client:
        # Only the head: the answer must not wait for the body.
        await client.send(request_bytes("POST", case.path, extra, content_length=LIMIT + 1))
        resp = await client.response()
        assert resp.status == 413
        assert not client.raw.startswith(b"HTTP/1.1 100"), "must not invite the body"
        assert_error_body(resp, case)
        if expect_continue:
            # Refused without 100 Continue: the client may rightly never send
            # the body (RFC 9110 §10.1.1), so its next bytes could be either:
            # the connection ends (a client that sends it anyway is not reset).
            assert resp.header("Connection") == "close"
            await client.send(b"x" * (LIMIT + 1))
            assert await client.closed()
            assert up.connections == 0
            return
        # A small excess is read and dropped; the connection stays usable.
        await client.send(b"x" * (LIMIT + 1))
        await client.send(request_bytes("POST", case.path, body=b"a" * LIMIT))
        # At the limit exactly it passes (the cap is inclusive).
        assert (await client.response()).status == 204
    assert up.connections == 1
    [seen] = up.requests
    assert seen.raw.endswith(b"\r\n\r\n" + b"a" * LIMIT)
    assert b"x" not in seen.raw


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_huge_declared_length_is_413_and_closes(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, case: RouteCase
) -> None:
    up = await raw_upstream(answer_with(b"HTTP/1.1 204 No Content\r\n\r\n"))
    gw = await start_gateway(gateway_config(up.url))
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", case.path, content_length=2**40) + b"x" * 1000)
        resp = await client.response()
        assert resp.status == 413
        assert resp.header("Connection") == "close"
        assert_error_body(resp, case)
        assert await client.closed()
    assert up.connections == 0
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route=case.name, code="413") == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_streamed_body_over_limit_is_413_and_upstream_never_sees_it_complete(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(gateway_config(upstream.url))
    piece = bytes(range(256)) * 64  # 16 KiB
    async with raw_client(gw.port) as client:
        await client.send(
            request_bytes("POST", case.path, [("Transfer-Encoding", "chunked")])
            + chunked(piece, piece, end=False)
        )
        # The upstream is streaming this request already ...
        await wait_for(received_at_least(upstream, 1))
        # ... when the rest pushes it over the limit.
        await client.send(chunked(piece, piece, piece, piece, piece))
        resp = await client.response()
        assert resp.status == 413
        assert_error_body(resp, case)
    await wait_for(lambda: upstream.requests[0].error is not None)
    [seen] = upstream.requests
    assert not seen.complete
    assert seen.received <= LIMIT
    assert upstream.complete == []
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route=case.name, code="413") == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_chunked_body_at_the_limit_passes(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(gateway_config(upstream.url))
    body = b"z" * LIMIT
    async with raw_client(gw.port) as client:
        await client.send(
            request_bytes("POST", case.path, [("Transfer-Encoding", "chunked")])
            + chunked(body[: LIMIT // 2], body[LIMIT // 2 :])
        )
        assert (await client.response()).status == 204
    [seen] = upstream.complete
    assert seen.body == body


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_stalling_mid_body(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase, framing: str
) -> None:
    gw = await start_gateway(
        gateway_config(upstream.url, server=f"body_idle_timeout_seconds = {IDLE}")
    )
    first = b"s" * 1000
    if framing == "chunked":
        data = request_bytes("POST", case.path, [("Transfer-Encoding", "chunked")])
        data += chunked(first, end=False)
    else:
        data = request_bytes("POST", case.path, content_length=10_000) + first
    loop = asyncio.get_running_loop()
    async with raw_client(gw.port) as client:
        await client.send(data)
        started = loop.time()
        resp = await client.response(timeout=5.0)
        waited = loop.time() - started
        assert resp.status == case.status(remote_write=408, otlp=503)
        if case.otlp:
            assert resp.header("Retry-After") is not None
        assert_error_body(resp, case)
        assert IDLE * 0.9 <= waited < IDLE + 2.0
        assert await client.closed()
    await wait_for(lambda: bool(upstream.requests) and upstream.requests[0].error is not None)
    assert upstream.complete == []
    metrics = await scrape(gw.admin_port)
    code = str(case.status(remote_write=408, otlp=503))
    assert metrics.sum("gateway_requests_total", route=case.name, code=code) == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_slow_but_steady_client_is_not_cut_off(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    # The idle timeout is per gap, not for the whole body.
    gw = await start_gateway(
        gateway_config(upstream.url, server=f"body_idle_timeout_seconds = {IDLE}")
    )
    pieces = [bytes([i]) * 100 for i in range(8)]
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", case.path, content_length=800))
        for i, piece in enumerate(pieces):
            await client.send(piece)
            # Each piece reaches the upstream before the next is sent; the
            # whole upload takes longer than the idle timeout.
            await wait_for(received_at_least(upstream, 100 * (i + 1)))
            await asyncio.sleep(IDLE / 3)  # pacing the sender, not synchronisation
        resp = await client.response()
    assert resp.status == 204
    [seen] = upstream.complete
    assert seen.body == b"".join(pieces)


async def test_otlp_json_requests_get_json_errors(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        gateway_config(upstream.url, server=f"body_idle_timeout_seconds = {IDLE}")
    )
    json_type = [("Content-Type", "application/json")]
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/v1/traces", json_type, content_length=2**30))
        resp = await client.response()
        assert resp.status == 413
        assert_error_body(resp, OTLP, as_json=True)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/v1/traces", json_type, content_length=10) + b"{")
        resp = await client.response()
        assert resp.status == 503
        assert_error_body(resp, OTLP, as_json=True)
