"""DESIGN §3 rows "draining" and "client went away", for both route
protocols: while draining, new requests get 503 + Retry-After (never 429 or
500) and in-flight ones finish with their real status; a client that goes
away mid-body gets its upstream request aborted (never seen complete) and
is counted as 499."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest

from gateway.process.gateway import Gateway
from tests.conftest import RecordingUpstream, StartGateway, config_text, wait_for
from tests.support.client import raw_client
from tests.support.metrics import scrape
from tests.support.routes import ROUTE_IDS, ROUTES, THREE_CREDENTIALS, RouteCase, assert_error_body
from tests.support.wire import chunked, request_bytes


async def start_for(start_gateway: StartGateway, upstream: RecordingUpstream) -> Gateway:
    return await start_gateway(
        config_text(
            upstream.url + "/api/v1/write",
            upstream.url + "/v1/traces",
            credentials=THREE_CREDENTIALS,
        )
    )


async def readyz(admin_port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp,
    ):
        return resp.status


async def wait_not_ready(admin_port: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while await readyz(admin_port) != 503:
        assert loop.time() < deadline, "/readyz never reported draining"


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_draining_answers_new_requests_503_and_lets_in_flight_finish(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    upstream.hold = True
    upstream.status = 200
    upstream.response_body = b"accepted"
    gw = await start_for(start_gateway, upstream)
    assert await readyz(gw.admin_port) == 200
    async with raw_client(gw.port) as in_flight, raw_client(gw.port) as other:
        # 1. A proxied request the upstream is still working on.
        await in_flight.send(request_bytes("POST", case.path, body=b"in-flight body"))
        await wait_for(lambda: len(upstream.complete) == 1)
        # 2. Another connection in the middle of a request: answered (401),
        #    its small body still being read, so it is not idle.
        await other.send(request_bytes("POST", case.path, token=None, content_length=1000))
        await other.send(b"a" * 500)
        assert (await other.response()).status == 401
        # 3. Drain starts.
        drain = asyncio.create_task(gw.drain(timeout=10.0))
        try:
            await wait_not_ready(gw.admin_port)
            # 4. A new request on the open connection: 503 + Retry-After.
            await other.send(b"a" * 500 + request_bytes("POST", case.path, body=b"new"))
            resp = await other.response()
            assert resp.status == 503
            assert resp.header("Retry-After") is not None
            assert_error_body(resp, case)
            assert await other.closed()
            # 5. New connections are no longer accepted.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", gw.port)
            # 6. The in-flight request finishes with the upstream's real answer.
            assert not drain.done()
            upstream.release.set()
            answer = await in_flight.response()
            assert answer.status == 200
            assert answer.body == b"accepted"
            await asyncio.wait_for(drain, 5.0)
        finally:
            upstream.release.set()
            if not drain.done():
                await drain
    assert len(upstream.requests) == 1  # the request made while draining never went upstream


async def test_drain_timeout_cuts_what_is_left(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    upstream.hold = True
    gw = await start_for(start_gateway, upstream)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=b"x"))
        await wait_for(lambda: len(upstream.complete) == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await gw.drain(timeout=0.3)
        assert loop.time() - started < 2.0
        assert await client.closed()


def captured(events: list[MutableMapping[str, Any]], status: int) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e.get("event") == "request" and e.get("status") == status]


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("how", ["reset", "fin"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_abort_mid_body_aborts_upstream_and_counts_499(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    log_capture: list[MutableMapping[str, Any]],
    case: RouteCase,
    how: str,
    framing: str,
) -> None:
    gw = await start_for(start_gateway, upstream)
    part = b"p" * 65536
    if framing == "chunked":
        data = request_bytes("POST", case.path, [("Transfer-Encoding", "chunked")])
        data += chunked(part, end=False)
    else:
        data = request_bytes("POST", case.path, content_length=1024 * 1024) + part
    async with raw_client(gw.port) as client:
        await client.send(data)
        await wait_for(lambda: bool(upstream.requests) and upstream.requests[0].received > 0)
        if how == "reset":
            client.abort()
        else:
            client.writer.write_eof()  # sender closed its side mid-body
            assert await client.closed()
    await wait_for(lambda: upstream.requests[0].error is not None)
    assert upstream.complete == []
    assert upstream.requests[0].received <= len(part)
    await wait_for(lambda: bool(captured(log_capture, 499)))
    [line] = captured(log_capture, 499)
    assert line["route"] == case.name
    assert line["credential"] == "ingest"
    metrics = await scrape(gw.admin_port)
    assert (
        metrics.sum("gateway_requests_total", route=case.name, credential="ingest", code="499") == 1
    )
    assert metrics.sum("gateway_requests_in_flight", route=case.name) == 0


async def test_client_abort_while_waiting_for_the_answer(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    # The body was complete; the client gave up waiting: still 499, and the
    # upstream connection is not left hanging in the gateway.
    upstream.hold = True
    gw = await start_for(start_gateway, upstream)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=b"complete"))
        await wait_for(lambda: len(upstream.complete) == 1)
        client.abort()
    await wait_for(lambda: bool(captured(log_capture, 499)))
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route="remote_write", code="499") == 1
    assert metrics.sum("gateway_requests_in_flight", route="remote_write") == 0
