"""Header attacks: hop-by-hop and Connection-listed fields in both directions,
spoofed forwarding headers, and oversized heads (431) and URLs (414)."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN, StartGateway
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, parse_statuses, request

HOP_BY_HOP_REQUEST = [
    ("Connection", "keep-alive, X-Listed-One, x-listed-two"),
    ("Connection", "X-Listed-Three"),
    ("Keep-Alive", "timeout=5, max=1000"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authorization", "Basic YWRtaW46YWRtaW4="),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("X-Listed-One", "secret-1"),
    ("X-LISTED-TWO", "secret-2"),
    ("x-listed-three", "secret-3"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("Expect", "100-continue"),
]
END_TO_END = [
    ("Content-Type", "application/x-protobuf"),
    ("Content-Encoding", "snappy"),
    ("X-Prometheus-Remote-Write-Version", "0.1.0"),
    ("User-Agent", "vmagent"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("X-Request-Id", "req-123"),
    ("X-Custom", "kept"),
]


async def test_hop_by_hop_and_listed_request_headers_never_reach_upstream(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request(
        "POST",
        "/api/v1/write",
        b"payload",
        token=TOKEN,
        headers=HOP_BY_HOP_REQUEST + END_TO_END,
        host="evil.example",
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        resp = await conn.response()
    assert resp.status == 204
    [req] = strict_upstream.requests
    names = req.names()
    for name, _ in HOP_BY_HOP_REQUEST:
        if name.lower() not in ("x-forwarded-for", "x-forwarded-proto"):
            assert name.lower() not in names, name
    assert "authorization" not in names
    assert b"secret-" not in strict_upstream.received
    assert TOKEN.encode() not in strict_upstream.received
    for name, value in END_TO_END:
        assert req.all(name) == [value], name
    # Rebuilt by the gateway, never taken from an untrusted client.
    assert req.all("Host") == [f"127.0.0.1:{strict_upstream.port}"]
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert req.all("X-Forwarded-Proto") == ["http"]
    assert req.all("Content-Length") == ["7"]
    assert req.body == b"payload"


async def test_connection_cannot_strip_what_the_gateway_adds(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Listing X-Forwarded-For / Host / Content-Length in Connection must not
    remove the gateway's own fields (a known proxy-confusion trick)."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request(
        "POST",
        "/api/v1/write",
        b"abcd",
        token=TOKEN,
        headers=[("Connection", "X-Forwarded-For, Host, Content-Length, X-Request-Id")],
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        resp = await conn.response()
    assert resp.status == 204
    [req] = strict_upstream.requests
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert len(req.all("Host")) == 1
    assert req.all("Content-Length") == ["4"]
    assert req.body == b"abcd"
    assert strict_upstream.errors == []


async def test_hop_by_hop_response_headers_never_reach_client(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def responder(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(
            b"HTTP/1.1 204 No Content\r\n"
            b"Connection: keep-alive, X-Upstream-Secret\r\n"
            b"X-Upstream-Secret: internal\r\n"
            b"Keep-Alive: timeout=99\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Trailer: X-Foo\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Prometheus-Remote-Write-Samples-Written: 42\r\n"
            b"\r\n"
        )

    strict_upstream.responder = responder
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"x", token=TOKEN))
        resp = await conn.response()
    assert resp.status == 204
    assert resp.header("X-Prometheus-Remote-Write-Samples-Written") == "42"
    for name in ("x-upstream-secret", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert name not in resp.names(), name
    assert resp.header("Connection") in (None, "keep-alive")


async def test_response_framing_is_rebuilt(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A chunked upstream answer reaches the client with one framing header."""

    async def responder(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    strict_upstream.responder = responder
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"x", token=TOKEN))
        resp = await conn.response()
    assert resp.status == 400  # passed through verbatim (DESIGN §3)
    assert resp.body == b"hello world"
    assert not (resp.header("Content-Length") and resp.header("Transfer-Encoding"))


async def test_two_authorization_headers_are_refused(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request(
        "POST", "/api/v1/write", b"x", token=TOKEN, headers=[("Authorization", "Bearer x")]
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        resp = await conn.response()
    assert resp.status == 401
    assert strict_upstream.conns == []


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", f"Bearer  {TOKEN} x", f"Token {TOKEN}", TOKEN],
)
async def test_malformed_authorization_is_401(
    value: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request("POST", "/api/v1/write", b"x", headers=[("Authorization", value)])
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        resp = await conn.response()
    assert resp.status == 401
    assert (
        resp.header(
            "WWW-Authenticate",
        )
        is not None
    )
    assert TOKEN.encode() not in resp.body
    assert strict_upstream.conns == []


async def _head_status(port: int, data: bytes) -> tuple[list[int], bytes]:
    async with raw_client(port) as conn:
        await conn.send(data)
        conn.half_close()
        stream = await conn.eof()
    return parse_statuses(stream), stream


async def test_huge_header_is_431(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request("POST", "/api/v1/write", b"x", token=TOKEN, headers=[("X-Big", "a" * 20_000)])
    statuses, stream = await _head_status(gw.port, data)
    assert statuses == [431]
    assert b"aaaa" not in stream
    assert strict_upstream.conns == []


async def test_many_headers_are_431_and_the_limit_itself_passes(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    # Host, Authorization and Content-Length count too: 97 + 3 = 100 (the default).
    ok = request(
        "POST",
        "/api/v1/write",
        b"x",
        token=TOKEN,
        headers=[(f"X-H{i}", "v") for i in range(97)],
    )
    assert (await _head_status(gw.port, ok))[0] == [204]
    [req] = strict_upstream.requests
    assert req.header("X-H96") == "v"
    too_many = request(
        "POST",
        "/api/v1/write",
        b"x",
        token=TOKEN,
        headers=[(f"X-H{i}", "v") for i in range(98)],
    )
    assert (await _head_status(gw.port, too_many))[0] == [431]
    assert len(strict_upstream.requests) == 1


async def test_many_tiny_headers_over_the_byte_limit_are_431(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Header bytes are counted across fields, not per field."""
    gw = await start_gateway(
        hostile_config(strict_upstream, server="max_header_count = 1000\nmax_header_bytes = 4096")
    )
    data = request(
        "POST",
        "/api/v1/write",
        b"x",
        token=TOKEN,
        headers=[(f"X-{i:04}", "v" * 40) for i in range(200)],
    )
    assert (await _head_status(gw.port, data))[0] == [431]
    assert strict_upstream.conns == []


async def test_431_is_answered_before_authentication(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request("POST", "/api/v1/write", b"x", headers=[("X-Big", "a" * 20_000)])
    assert (await _head_status(gw.port, data))[0] == [431]


async def test_long_url_is_414_and_the_limit_itself_passes(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    prefix = "/api/v1/write?q="
    at_limit = prefix + "a" * (8192 - len(prefix))
    assert (await _head_status(gw.port, request("POST", at_limit, b"x", token=TOKEN)))[0] == [204]
    [req] = strict_upstream.requests
    assert req.target == at_limit
    over = at_limit + "a"
    assert (await _head_status(gw.port, request("POST", over, b"x", token=TOKEN)))[0] == [414]
    huge = prefix + "a" * 100_000
    statuses, stream = await _head_status(gw.port, request("POST", huge, b"x"))
    assert statuses == [414]
    assert len(stream) < 1000
    assert len(strict_upstream.requests) == 1


async def test_head_over_limit_in_tiny_segments_is_431(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The limit holds however the head is split across reads."""
    gw = await start_gateway(hostile_config(strict_upstream, server="header_timeout_seconds = 5.0"))
    data = request("POST", "/api/v1/write", b"x", token=TOKEN, headers=[("X-Big", "b" * 17_000)])
    async with raw_client(gw.port) as conn:
        for i in range(0, len(data), 1000):
            try:
                await conn.send(data[i : i + 1000])
            except (ConnectionResetError, BrokenPipeError):
                break
        stream = await conn.eof()
    assert parse_statuses(stream) == [431]
    assert strict_upstream.conns == []


@pytest.mark.parametrize("value", ["r" * 200, "\u00e9t\u00e9"], ids=["over_128_bytes", "not_ascii"])
async def test_unusable_request_id_is_replaced_not_duplicated(
    value: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The upstream sees one X-Request-Id: the gateway's own when the
    client's cannot be used (two would leave the upstream to guess)."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request("POST", "/api/v1/write", b"x", token=TOKEN, headers=[("X-Request-Id", value)])
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        assert (await conn.response()).status == 204
    [req] = strict_upstream.requests
    ids = req.all("X-Request-Id")
    assert len(ids) == 1, ids
    assert ids[0] != value


async def test_usable_request_id_is_kept_once(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = request(
        "POST", "/api/v1/write", b"x", token=TOKEN, headers=[("X-Request-Id", "abc-123")]
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        assert (await conn.response()).status == 204
    [req] = strict_upstream.requests
    assert req.all("X-Request-Id") == ["abc-123"]
