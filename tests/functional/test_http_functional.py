"""HTTP/1.1 edge cases at both edges of the proxy, over raw sockets: framing
the gateway must refuse (request smuggling shapes) before any upstream
contact, keep-alive and pipelining, the upstream pool honouring
``Connection: close``, early and truncated upstream answers, and a corpus
of odd requests that must never produce a 500 or kill the listener."""

from __future__ import annotations

import asyncio

import pytest

from gateway.process.gateway import Gateway
from tests.conftest import (
    TOKEN,
    RecordingUpstream,
    StartGateway,
    StartRawUpstream,
    config_text,
    wait_for,
)
from tests.support.client import Closed, raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.upstreams import UpConn, answer_with
from tests.support.wire import chunked, request_bytes

OK_204 = b"HTTP/1.1 204 No Content\r\n\r\n"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


async def start_for(start_gateway: StartGateway, url: str, upstream: str = "") -> Gateway:
    return await start_gateway(
        config_text(url + "/api/v1/write", url + "/v1/traces", upstream=upstream)
    )


SMUGGLING = [
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
        + AUTH
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="cl-and-te",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
        + AUTH
        + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        id="two-content-lengths",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
        + AUTH
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        id="te-gzip-chunked",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
        + AUTH
        + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        id="te-chunked-not-last",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Length: -1\r\n\r\n",
        id="negative-length",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Length: 1x\r\n\r\nx",
        id="junk-length",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Length : 3\r\n\r\nabc",
        id="space-before-colon",
    ),
    pytest.param(
        b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
        + AUTH
        + b"X-Folded: a\r\n b\r\nContent-Length: 3\r\n\r\nabc",
        id="obs-fold",
    ),
]


@pytest.mark.parametrize("data", SMUGGLING)
async def test_ambiguous_framing_is_400_and_never_reaches_upstream(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, data: bytes
) -> None:
    up = await raw_upstream(answer_with(OK_204))
    gw = await start_for(start_gateway, up.url)
    async with raw_client(gw.port) as client:
        await client.send(data)
        resp = await client.response()
        assert resp.status == 400
        assert await client.closed()
    assert up.connections == 0
    assert (
        await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"ok"))
    ).status == 204


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"3\r\nabc0\r\n\r\n"],
    ids=["bad-size", "overlong-chunk", "missing-crlf"],
)
async def test_malformed_chunked_body_never_completes_upstream(
    start_gateway: StartGateway, upstream: RecordingUpstream, body: bytes
) -> None:
    # The head was fine, so the upstream may have been contacted; what it
    # must never see is a complete body.  The client gets no success.
    gw = await start_for(start_gateway, upstream.url)
    async with raw_client(gw.port) as client:
        await client.send(
            request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
            + chunked(b"x" * 100, end=False)
        )
        await wait_for(lambda: bool(upstream.requests) and upstream.requests[0].received > 0)
        await client.send(body)
        assert await client.closed()
    assert b"HTTP/1.1 2" not in client.raw
    assert b"HTTP/1.1 5" not in client.raw
    await wait_for(lambda: upstream.requests[0].error is not None)
    assert upstream.complete == []


async def test_keep_alive_and_pooled_upstream_connection(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    up = await raw_upstream(answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    gw = await start_for(start_gateway, up.url)
    async with raw_client(gw.port) as client:
        for i in range(10):
            await client.send(request_bytes("POST", "/api/v1/write", body=b"n%d" % i))
            resp = await client.response()
            assert (resp.status, resp.body) == (200, b"ok")
    assert len(up.requests) == 10
    assert up.connections == 1  # one pooled upstream connection, reused


async def test_pipelined_requests_are_answered_in_order(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_for(start_gateway, upstream.url)
    data = (
        request_bytes("POST", "/api/v1/write", body=b"first")
        + request_bytes("GET", "/nope")
        + request_bytes("POST", "/v1/traces", body=b"second")
        + request_bytes("POST", "/api/v1/write", body=b"x", token=None)
        + request_bytes("GET", "/health")
    )
    async with raw_client(gw.port) as client:
        await client.send(data)
        statuses = [(await client.response(timeout=2)).status for _ in range(5)]
    assert statuses == [204, 404, 204, 401, 200]
    assert [r.body for r in upstream.complete] == [b"first", b"second"]


async def test_pipelined_requests_reusing_a_pooled_upstream_connection(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    # The second request starts when the first one's upstream answer
    # completes, on the connection that answer just returned to the pool.
    gw = await start_for(start_gateway, upstream.url)
    data = request_bytes("POST", "/api/v1/write", body=b"one") + request_bytes(
        "POST", "/api/v1/write", body=b"two"
    )
    async with raw_client(gw.port) as client:
        await client.send(data)
        assert (await client.response(timeout=2)).status == 204
        assert (await client.response(timeout=2)).status == 204
    assert [r.body for r in upstream.complete] == [b"one", b"two"]


async def test_upstream_connection_close_is_not_reused(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    # The upstream says "Connection: close" but leaves the socket open: the
    # gateway must not send another request on it.
    up = await raw_upstream(answer_with(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
    gw = await start_for(start_gateway, up.url)
    for _ in range(3):
        resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"x"))
        assert resp.status == 204
    assert up.connections == 3


async def test_upstream_closing_idle_keep_alive_connection_is_not_a_502(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    # A Go upstream closes idle keep-alive connections on its own schedule.
    async def answer_then_close(conn: UpConn) -> None:
        await conn.next_request()
        await conn.write(OK_204)
        conn.close()

    up = await raw_upstream(answer_then_close)
    gw = await start_for(start_gateway, up.url)
    for _ in range(5):
        resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"x"))
        assert resp.status == 204
    assert len(up.requests) == 5


async def test_upstream_answering_early_is_passed_through(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    # vminsert may refuse a request before reading its body.
    async def refuse_early(conn: UpConn) -> None:
        await conn.read_head()
        await conn.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n")
        await conn.read_to_eof()

    up = await raw_upstream(refuse_early)
    gw = await start_for(start_gateway, up.url)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", content_length=1 << 20))
        await client.send(b"x" * 4096)
        resp = await client.response()
        assert (resp.status, resp.body) == (413, b"too big\n")
    body_received = up.received.partition(b"\r\n\r\n")[2]
    assert len(body_received) < 1 << 20


async def test_upstream_reset_mid_response_truncates_never_completes(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    # Status already sent: the client must see a broken response, not a short success.
    async def reset_mid_body(conn: UpConn) -> None:
        await conn.next_request()
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        conn.writer.transport.abort()

    up = await raw_upstream(reset_mid_body)
    gw = await start_for(start_gateway, up.url)
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=b"x"))
        with pytest.raises(Closed, match="connection closed before a response"):
            await client.response()
        assert b"HTTP/1.1 200 OK" in client.raw
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route="remote_write") == 1


async def test_upstream_stalling_mid_response_is_cut(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    async def stall_mid_body(conn: UpConn) -> None:
        await conn.next_request()
        await conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.read_to_eof()  # until the gateway gives up

    up = await raw_upstream(stall_mid_body)
    gw = await start_for(start_gateway, up.url, upstream="response_timeout_seconds = 0.3")
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=b"x"))
        with pytest.raises(Closed, match="connection closed before a response"):
            await client.response(timeout=5)
        assert b"hello" in client.raw
        assert b"0\r\n\r\n" not in client.raw  # never a final chunk


async def test_close_delimited_upstream_body_is_reframed(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    async def close_delimited(conn: UpConn) -> None:
        await conn.next_request()
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-eof")
        conn.close()

    up = await raw_upstream(close_delimited)
    gw = await start_for(start_gateway, up.url)
    resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"x"))
    assert (resp.status, resp.body) == (200, b"until-eof")


async def test_expect_100_continue(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_for(start_gateway, upstream.url)
    async with raw_client(gw.port) as client:
        await client.send(
            request_bytes("POST", "/api/v1/write", [("Expect", "100-continue")], content_length=4)
        )
        await client.received(b"HTTP/1.1 100 Continue\r\n\r\n")
        await client.send(b"body")
        assert (await client.response()).status == 204
    [seen] = upstream.complete
    assert seen.body == b"body"
    assert "Expect" not in seen.headers


async def test_http10_client(start_gateway: StartGateway, upstream: RecordingUpstream) -> None:
    upstream.status = 200
    upstream.response_body = b"for an old client"
    gw = await start_for(start_gateway, upstream.url)
    data = request_bytes("POST", "/api/v1/write", body=b"old").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    async with raw_client(gw.port) as client:
        await client.send(data)
        assert await client.closed()
    assert client.raw.startswith(b"HTTP/1.1 200 ")
    assert client.raw.endswith(b"for an old client")
    assert b"Transfer-Encoding: chunked" not in client.raw
    assert upstream.complete[0].body == b"old"


async def test_slow_head_and_idle_connections_are_closed(start_gateway: StartGateway) -> None:
    gw = await start_gateway(
        config_text(server="header_timeout_seconds = 0.3\nkeepalive_timeout_seconds = 0.3")
    )
    loop = asyncio.get_running_loop()
    async with raw_client(gw.port) as client:  # slowloris: a head that never ends
        await client.send(b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH)
        started = loop.time()
        assert await client.closed()
        assert 0.25 <= loop.time() - started < 2.0
        assert b"HTTP/1.1 5" not in client.raw
    async with raw_client(gw.port) as client:  # keep-alive idle after an answer
        await client.send(request_bytes("GET", "/health"))
        assert (await client.response()).status == 200
        started = loop.time()
        assert await client.closed()
        assert 0.25 <= loop.time() - started < 2.0


CORPUS = [
    b"GET / HTTP/1.1\r\n\r\n",
    b"get /health HTTP/1.1\r\nHost: g\r\n" + AUTH + b"\r\n",
    b"BREW /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"\r\n",
    b"POST /api/v1/write HTTP/2.0\r\nHost: g\r\n" + AUTH + b"Content-Length: 0\r\n\r\n",
    b"POST /api/v1/write HTTP/1.1\r\n" + AUTH + b"Content-Length: 1\r\n\r\nx",
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n"
    + AUTH
    + b"X-Request-Id: "
    + b"r" * 500
    + b"\r\nContent-Length: 1\r\n\r\nx",
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"X-Request-Id: \xff\xfe\r\n"
    b"Content-Length: 1\r\n\r\nx",
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v1/traces HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer \x00\x01\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: Upgrade\r\n"
    b"Upgrade: h2c\r\nContent-Length: 0\r\n\r\n",
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n" + AUTH + b"\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: g\r\n" + AUTH + b"\r\n",
    b"POST http://g:80/api/v1/write HTTP/1.1\r\nHost: other\r\n"
    + AUTH
    + b"Content-Length: 1\r\n\r\nx",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: g\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: g\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    b"POST /api/v1/write HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n0\r\nTrailer-Field: x\r\n\r\n",
]
ALLOWED = {200, 204, 400, 401, 403, 404, 405, 408, 413, 414, 431, 502, 503, 504}


async def test_odd_requests_never_get_500_or_kill_the_listener(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_for(start_gateway, upstream.url)
    seen: list[int | None] = []
    for data in CORPUS:
        async with raw_client(gw.port) as client:
            await client.send(data)
            try:
                seen.append((await client.response(timeout=3)).status)
            except Closed:
                seen.append(None)  # closed without an answer
    answered = [s for s in seen if s is not None]
    assert set(answered) <= ALLOWED, list(zip(CORPUS, seen, strict=True))
    assert len(answered) == len(CORPUS), seen  # every one gets an answer
    # Still serving.
    ok = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"after"))
    assert ok.status == 204
    metrics = await scrape(gw.admin_port)
    assert 'code="500"' not in metrics.text


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("no Host on HTTP/1.1", b"POST /api/v1/write HTTP/1.1\r\n"),
        ("two Host fields", b"POST /api/v1/write HTTP/1.1\r\nHost: a\r\nHost: b\r\n"),
        ("HTTP/2.0 request line", b"POST /api/v1/write HTTP/2.0\r\nHost: a\r\n"),
    ],
)
async def test_malformed_heads_are_400_and_never_reach_the_upstream(
    start_gateway: StartGateway, upstream: RecordingUpstream, name: str, head: bytes
) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host (400
    otherwise); only HTTP/1.x is spoken on this port."""
    gw = await start_for(start_gateway, upstream.url)
    data = head + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1\r\n\r\nx".encode()
    resp = await raw_request(gw.port, data)
    assert resp.status == 400, name
    assert upstream.requests == []
