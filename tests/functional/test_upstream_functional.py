"""DESIGN §3 upstream rows over real sockets, for both route protocols: an
upstream that refuses, is unreachable, resets or talks garbage before its
response head is 502; one that does not answer in time is 504 (on OTLP routes
both are 503 without Retry-After: the Go SDK before v1.20 drops 502 and 504,
issue 10 item 13); and whatever
an upstream does answer passes through verbatim (status, Retry-After,
remote-write *-Written headers, OTLP partial_success bodies), minus
hop-by-hop headers."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from gateway.process.gateway import Gateway
from tests.conftest import (
    RecordingUpstream,
    StartGateway,
    StartRawUpstream,
    config_text,
    wait_for,
)
from tests.support.client import raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.routes import ROUTE_IDS, ROUTES, THREE_CREDENTIALS, RouteCase, assert_error_body
from tests.support.sockets import refused_port, unreachable_port
from tests.support.upstreams import (
    Behaviour,
    UpConn,
    answer_with,
    close_after_head,
    hang,
    reset_after_head,
)
from tests.support.wire import Response, request_bytes

BODY = b"\x0a\x0bsnappy\x00\xff" * 64


async def start_for(start_gateway: StartGateway, url: str, upstream_cfg: str = "") -> Gateway:
    return await start_gateway(
        config_text(
            url + "/api/v1/write",
            url + "/v1/traces",
            credentials=THREE_CREDENTIALS,
            upstream=upstream_cfg,
        )
    )


async def post(gw: Gateway, case: RouteCase, body: bytes = BODY) -> Response:
    headers = [("Content-Type", "application/x-protobuf")]
    return await raw_request(gw.port, request_bytes("POST", case.path, headers, body), timeout=10)


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_upstream_refused_is_502_and_503_on_otlp(
    start_gateway: StartGateway, case: RouteCase
) -> None:
    with refused_port() as port:
        gw = await start_for(start_gateway, f"http://127.0.0.1:{port}")
        resp = await post(gw, case)
    assert resp.status == case.status(502, 503)
    assert resp.header("Retry-After") is None  # the SDKs' own backoff outlasts "1"
    assert_error_body(resp, case)
    assert str(port).encode() not in resp.raw
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route=case.name, kind="connect") == 1
    code = str(case.status(502, 503))
    assert metrics.sum("gateway_requests_total", route=case.name, code=code) == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_upstream_unreachable_is_502_and_503_on_otlp(
    start_gateway: StartGateway, case: RouteCase
) -> None:
    # "refused / unreachable / reset before response headers → 502" (§3): a
    # connect that times out is an unreachable upstream, not a slow answer.
    with unreachable_port() as port:
        gw = await start_for(
            start_gateway, f"http://127.0.0.1:{port}", "connect_timeout_seconds = 0.3"
        )
        resp = await post(gw, case)
    assert resp.status == case.status(502, 503)
    assert_error_body(resp, case)
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route=case.name, kind="connect") == 1


PREMATURE: list[tuple[str, Behaviour]] = [
    ("reset-after-request-head", reset_after_head),
    ("fin-after-request-head", close_after_head),
]


async def partial_head_then_reset(conn: UpConn) -> None:
    await conn.read_head()
    await conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
    conn.writer.transport.abort()


async def garbage(conn: UpConn) -> None:
    await conn.read_head()
    await conn.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "behaviour",
    [reset_after_head, close_after_head, partial_head_then_reset, garbage],
    ids=["reset", "fin", "partial-head-reset", "garbage"],
)
async def test_upstream_failing_before_response_head_is_502_and_503_on_otlp(
    start_gateway: StartGateway,
    raw_upstream: StartRawUpstream,
    case: RouteCase,
    behaviour: Behaviour,
) -> None:
    up = await raw_upstream(behaviour)
    gw = await start_for(start_gateway, up.url)
    resp = await post(gw, case)
    assert resp.status == case.status(502, 503)
    assert resp.header("Retry-After") is None
    assert_error_body(resp, case)
    assert up.connections >= 1
    metrics = await scrape(gw.admin_port)
    errors = metrics.sum("gateway_upstream_errors_total", route=case.name)
    assert errors >= 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_upstream_hanging_is_504_and_503_on_otlp(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, case: RouteCase
) -> None:
    up = await raw_upstream(hang)
    gw = await start_for(start_gateway, up.url, "response_timeout_seconds = 0.4")
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await post(gw, case)
    waited = loop.time() - started
    assert resp.status == case.status(504, 503)
    assert resp.header("Retry-After") is None
    assert_error_body(resp, case)
    assert 0.35 <= waited < 3.0
    # The upstream did get the whole request; it just never answered.
    assert up.received.endswith(BODY)
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route=case.name, kind="timeout") == 1
    code = str(case.status(504, 503))
    assert metrics.sum("gateway_requests_total", route=case.name, code=code) == 1


async def test_gateway_recovers_after_upstream_failures(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    calls = 0

    async def flaky(conn: UpConn) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await reset_after_head(conn)
        else:
            await answer_with(b"HTTP/1.1 204 No Content\r\n\r\n")(conn)

    up = await raw_upstream(flaky)
    gw = await start_for(start_gateway, up.url)
    assert (await post(gw, ROUTES[0])).status == 502
    for _ in range(3):
        assert (await post(gw, ROUTES[0])).status == 204


PASS_THROUGH = [
    (200, {"Content-Type": "application/json"}, b'{"ok":true}'),
    (204, {"X-Prometheus-Remote-Write-Samples-Written": "10"}, b""),
    (400, {"Content-Type": "text/plain"}, b"cannot decode snappy block\n"),
    (401, {"WWW-Authenticate": 'Basic realm="vm"'}, b"upstream auth\n"),
    (404, {}, b"no such tenant\n"),
    (413, {}, b"too big for vminsert\n"),
    (415, {"Content-Type": "text/plain"}, b"unsupported content-encoding\n"),
    (429, {"Retry-After": "7"}, b"slow down\n"),
    (500, {}, b"internal upstream error\n"),
    (502, {}, b"vminsert has no storage nodes\n"),
    (503, {"Retry-After": "30"}, b"overloaded\n"),
    (504, {}, b"storage timeout\n"),
]


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    ("status", "headers", "body"), PASS_THROUGH, ids=[str(p[0]) for p in PASS_THROUGH]
)
async def test_upstream_answers_pass_through_verbatim(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    case: RouteCase,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    upstream.status = status
    upstream.response_headers = {**headers, "X-Upstream-Marker": "m1"}
    upstream.response_body = body
    gw = await start_for(start_gateway, upstream.url)
    resp = await post(gw, case)
    assert resp.status == status
    assert resp.body == body
    assert resp.header("X-Upstream-Marker") == "m1"
    for name, value in headers.items():
        assert resp.all(name) == [value]
    if status in (429, 503) and "Retry-After" not in headers:
        raise AssertionError("test table must give Retry-After with 429/503")
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route=case.name, code=str(status)) == 1
    assert metrics.sum("gateway_upstream_errors_total") == 0


async def test_remote_write_written_headers_pass_through(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    # Remote-write 2.0 senders read these to tell 1.0 receivers apart.
    written = {
        "X-Prometheus-Remote-Write-Samples-Written": "1200",
        "X-Prometheus-Remote-Write-Histograms-Written": "3",
        "X-Prometheus-Remote-Write-Exemplars-Written": "0",
    }
    upstream.response_headers = written
    gw = await start_for(start_gateway, upstream.url)
    resp = await post(gw, ROUTES[0])
    assert resp.status == 204
    for name, value in written.items():
        assert resp.all(name) == [value]


async def test_otlp_partial_success_body_passes_through(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    answer = trace_service_pb2.ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 3
    answer.partial_success.error_message = "3 spans had an empty trace id"
    upstream.status = 200
    upstream.response_headers = {"Content-Type": "application/x-protobuf"}
    upstream.response_body = answer.SerializeToString()
    gw = await start_for(start_gateway, upstream.url)
    resp = await post(gw, ROUTES[1])
    assert resp.status == 200
    assert resp.header("Content-Type") == "application/x-protobuf"
    decoded = trace_service_pb2.ExportTraceServiceResponse()
    decoded.ParseFromString(resp.body)
    assert decoded.partial_success.rejected_spans == 3
    assert decoded.partial_success.error_message == "3 spans had an empty trace id"


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_response_hop_by_hop_headers_are_dropped(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, case: RouteCase
) -> None:
    body = b'{"partialSuccess":{}}'
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: keep-alive, X-Up-Hop\r\n"
        b"X-Up-Hop: internal\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Authenticate: Basic realm=internal\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Content-Encoding: gzip\r\n"
        b"X-Keep: yes\r\n"
        b"Server: VictoriaMetrics\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    up = await raw_upstream(answer_with(response))
    gw = await start_for(start_gateway, up.url)
    resp = await post(gw, case)
    assert resp.status == 200
    assert resp.body == body
    for gone in (
        "X-Up-Hop",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Connection",
        "Trailer",
        "Upgrade",
    ):
        assert resp.header(gone) is None, gone
    assert "x-up-hop" not in (resp.header("Connection") or "").lower()
    assert resp.header("X-Keep") == "yes"
    assert resp.header("Server") == "VictoriaMetrics"
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.header("Content-Type") == "application/json"


async def test_upstream_1xx_is_not_forwarded_as_final(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    up = await raw_upstream(
        answer_with(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\nX-Final: 1\r\n\r\n"
        )
    )
    gw = await start_for(start_gateway, up.url)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=BODY))
        resp = await client.response()
        assert resp.status == 204
        assert resp.header("X-Final") == "1"
        # Keep-alive still works after the interim answers.
        await client.send(request_bytes("POST", "/api/v1/write", body=BODY))
        assert (await client.response()).status == 204
    await wait_for(lambda: len(up.requests) == 2)


async def stop_reading_after_head(conn: UpConn) -> None:
    """Read the head, then never read again (a wedged receiver): the
    gateway's writes back up and the client must be paused, not blamed."""
    await conn.read_head()
    with suppress(ConnectionError):
        await conn.writer.wait_closed()


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_upstream_not_reading_the_body_is_a_gateway_timeout_not_a_client_timeout(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, case: RouteCase
) -> None:
    up = await raw_upstream(stop_reading_after_head)
    gw = await start_gateway(
        config_text(
            up.url + "/api/v1/write",
            up.url + "/v1/traces",
            server="body_idle_timeout_seconds = 0.3",
            upstream="response_timeout_seconds = 1.0",
        )
    )
    size = 48 * 1024 * 1024  # under the route limit, far over socket buffers
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", case.path, content_length=size))

        async def feed() -> None:
            block = bytes(1024 * 1024)
            for _ in range(size // len(block)):
                await client.send(block)  # blocks once the gateway stops reading

        feeder = asyncio.create_task(feed())
        try:
            resp = await client.response(timeout=10)
        finally:
            feeder.cancel()
            with suppress(asyncio.CancelledError, ConnectionError):
                await feeder
    # The sender kept sending; the receiver was the one that stopped.
    assert resp.status == case.status(504, 503)
    assert_error_body(resp, case)
