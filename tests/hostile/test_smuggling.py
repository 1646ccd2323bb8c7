"""Request smuggling and framing attacks over raw sockets.

Each case asserts the status the client got *and* what the recording
upstream (its own strict parser, not llhttp) saw: exactly the intended
requests and bodies, never a second request hidden in a body or header, and
never a complete body for a request that was refused midway.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import TOKEN, StartGateway, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, parse_statuses, request

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
RW = b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\n" + AUTH
# A complete, authenticated request: what an attacker tries to hide.
SMUGGLED = b"POST /v1/traces HTTP/1.1\r\nHost: gw\r\n" + AUTH + b"Content-Length: 8\r\n\r\nSMUGGLED"


async def _exchange(port: int, data: bytes) -> bytes:
    """Send, half-close, and read everything until the gateway closes."""
    async with raw_client(port) as conn:
        await conn.send(data)
        conn.half_close()
        return await conn.eof(timeout=5.0)


async def _settled(up: RawUpstream) -> None:
    """Every upstream connection holding a partial request has been aborted."""
    await wait_for(lambda: all(c.closed.is_set() or not c.leftover for c in up.conns), 3.0)


# Malformed heads: refused by the parser before authentication, 400, and the
# upstream is never contacted.
HEAD_ATTACKS = {
    "cl_te": RW + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_cl": RW + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "duplicate_cl_differ": RW + b"Content-Length: 0\r\nContent-Length: 78\r\n\r\n" + SMUGGLED,
    "duplicate_cl_same": RW + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_list": RW + b"Content-Length: 4, 4\r\n\r\nabcd",
    "cl_plus": RW + b"Content-Length: +4\r\n\r\nabcd",
    "cl_negative": RW + b"Content-Length: -1\r\n\r\n" + SMUGGLED,
    "cl_hex": RW + b"Content-Length: 0x4\r\n\r\nabcd",
    "cl_inner_space": RW + b"Content-Length: 1 0\r\n\r\nabcdefghij",
    "cl_overflow": RW + b"Content-Length: 184467440737095516160\r\n\r\nabcd",
    "obs_fold_te": RW + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs_fold_cl": RW + b"Content-Length: 0\r\n 78\r\n\r\n" + SMUGGLED,
    "obs_fold_plain": RW + b"X-Folded: a\r\n b\r\nContent-Length: 4\r\n\r\nabcd",
    "bare_lf_request_line": (
        b"POST /api/v1/write HTTP/1.1\nHost: gw\r\n" + AUTH + b"Content-Length: 4\r\n\r\nabcd"
    ),
    "bare_lf_headers": (
        b"POST /api/v1/write HTTP/1.1\r\nHost: gw\n"
        + AUTH
        + b"Content-Length: 0\nContent-Length: 78\r\n\r\n"
        + SMUGGLED
    ),
    "bare_lf_end_of_head": RW + b"Content-Length: 4\n\nabcd",
    "bare_cr_in_value": RW + b"X-A: a\rContent-Length: 78\r\nContent-Length: 0\r\n\r\n",
    "te_chunked_not_last": (RW + b"Transfer-Encoding: chunked, gzip\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"),
    "te_identity": RW + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED,
    "te_xchunked": RW + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_space_before_colon": RW + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "cl_space_before_colon": RW + b"Content-Length : 78\r\n\r\n" + SMUGGLED,
    "te_vertical_tab": RW + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "nul_in_header_value": RW + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space_in_header_name": RW + b"X A: b\r\nContent-Length: 0\r\n\r\n",
    # RFC 9112 §3.2: a request without Host, or with two, MUST get a 400.
    "no_host": b"POST /api/v1/write HTTP/1.1\r\n" + AUTH + b"Content-Length: 4\r\n\r\nabcd",
    "duplicate_host": RW + b"Host: other\r\nContent-Length: 4\r\n\r\nabcd",
}


@pytest.mark.parametrize("name", sorted(HEAD_ATTACKS))
async def test_malformed_framing_is_400_and_nothing_reaches_upstream(
    name: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    stream = await _exchange(gw.port, HEAD_ATTACKS[name])
    assert parse_statuses(stream) == [400], stream[:300]
    await _settled(strict_upstream)
    assert strict_upstream.requests == []
    assert b"SMUGGLED" not in strict_upstream.received
    assert strict_upstream.errors == []


# Transfer codings the gateway cannot pass on undecoded (RFC 9112 §6.1):
# llhttp accepts them when chunked comes last; the gateway refuses after
# authenticating, before anything is forwarded.
CODING_ATTACKS = {
    "te_gzip_chunked": RW + b"Transfer-Encoding: gzip, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "te_two_fields": (
        RW + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    ),
    "upgrade_with_body": (
        RW + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 78\r\n\r\n" + SMUGGLED
    ),
}


@pytest.mark.parametrize("name", sorted(CODING_ATTACKS))
async def test_unsupported_transfer_coding_is_400(
    name: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    stream = await _exchange(gw.port, CODING_ATTACKS[name])
    assert parse_statuses(stream)[:1] == [400], stream[:300]
    assert b"204" not in stream.split(b"\r\n")[0]
    await _settled(strict_upstream)
    assert strict_upstream.requests == []
    assert b"SMUGGLED" not in strict_upstream.received


# Broken chunked bodies: the head was valid and authenticated, so the
# gateway may already be streaming; the upstream must never see a complete
# request (the last chunk is never sent, the connection is aborted).
CHUNK_ATTACKS = {
    "size_not_hex": b"4\r\nabcd\r\nzz\r\nabcd\r\n0\r\n\r\n",
    "size_negative": b"4\r\nabcd\r\n-4\r\nabcd\r\n0\r\n\r\n",
    "size_0x_prefix": b"4\r\nabcd\r\n0x4\r\nabcd\r\n0\r\n\r\n",
    "size_overflow": b"4\r\nabcd\r\nfffffffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
    "data_longer_than_size": b"4\r\nabcdEF\r\n0\r\n\r\n",
    "data_shorter_than_size": b"6\r\nabcd\r\n0\r\n\r\n" + SMUGGLED,
    "size_bare_lf": b"4\nabcd\r\n0\r\n\r\n",
    "size_with_space_inside": b"1 0\r\nabcdefghijklmnop\r\n0\r\n\r\n",
    "size_trailing_space": b"4 \r\nabcd\r\n0\r\n\r\n",
    "content_length_in_trailer": b"4\r\nabcd\r\n0\r\nContent-Length: 78\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("name", sorted(CHUNK_ATTACKS))
async def test_invalid_chunk_is_400_and_upstream_never_sees_complete_body(
    name: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = RW + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK_ATTACKS[name]
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [400], stream[:300]
    await _settled(strict_upstream)
    assert strict_upstream.requests == []
    for conn in strict_upstream.conns:
        # Whatever was streamed never ends with the last-chunk marker.
        assert not conn.data.endswith(b"0\r\n\r\n")
        assert conn.closed.is_set() or not conn.data
    assert b"SMUGGLED" not in strict_upstream.received


async def test_request_hidden_in_chunk_data_stays_body(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A chunk whose data looks like an end marker plus a request is data."""
    gw = await start_gateway(hostile_config(strict_upstream))
    payload = b"0\r\n\r\n" + SMUGGLED
    data = RW + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(payload) + payload
    data += b"\r\n0\r\n\r\n"
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [204]
    [req] = strict_upstream.requests
    assert (req.method, req.target, req.body) == ("POST", "/api/v1/write", payload)
    assert req.chunked
    assert strict_upstream.errors == []


async def test_chunk_extensions_and_trailers_are_not_forwarded(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = (
        RW
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b'4;ext=1\r\nabcd\r\n3;name="q"\r\nefg\r\n0\r\n'
        + b"X-Trailer: evil\r\nX-Other: 1\r\n\r\n"
    )
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [204]
    [req] = strict_upstream.requests
    assert req.body == b"abcdefg"
    assert req.trailers == []
    assert b"evil" not in strict_upstream.received
    assert b"ext=" not in strict_upstream.received


async def test_authorization_in_trailers_does_not_authenticate(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = (
        b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n" + AUTH + b"\r\n"
    )
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [401]
    assert strict_upstream.conns == []


async def test_body_of_a_locally_answered_request_is_not_parsed_as_a_request(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """/health with a body that is itself a request: one answer, no proxying."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = b"GET /health HTTP/1.1\r\nHost: gw\r\n" + AUTH
    data += b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [200]
    assert strict_upstream.conns == []


async def test_unauthenticated_body_is_not_parsed_as_a_request(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    data = b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\n"
    data += b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [401]
    assert strict_upstream.conns == []


async def test_content_length_body_forwarded_exactly(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Bytes after Content-Length are the next request, parsed on their own."""
    gw = await start_gateway(hostile_config(strict_upstream))
    first = RW + b"Content-Length: 4\r\n\r\nabcd"
    stream = await _exchange(gw.port, first + SMUGGLED)
    assert parse_statuses(stream) == [204, 204]
    assert [(r.target, r.body) for r in strict_upstream.requests] == [
        ("/api/v1/write", b"abcd"),
        ("/v1/traces", b"SMUGGLED"),
    ]
    for req in strict_upstream.requests:
        assert req.all("Content-Length") == [str(len(req.body))]
        assert req.header("Transfer-Encoding") is None


async def test_pipelined_requests_answered_in_order(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The first request's upstream answers last; answers still come in order."""
    release = asyncio.Event()

    async def responder(conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"first":
            await release.wait()
            await conn.write(b"HTTP/1.1 204 No Content\r\nX-Which: first\r\n\r\n")
        else:
            await conn.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                b"Content-Length: 6\r\nX-Which: second\r\n\r\nsecond"
            )

    strict_upstream.responder = responder
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(
            request("POST", "/api/v1/write", b"first", token=TOKEN)
            + request("POST", "/v1/traces", b"second", token=TOKEN)
            + request("GET", "/health", token=TOKEN)
            + request("GET", "/nope", token=TOKEN)
            + request("POST", "/api/v1/write", b"x")  # no token
        )
        # Reading is paused while the first is in flight: nothing else is sent.
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        release.set()
        responses = [await conn.response() for _ in range(5)]
    assert [r.status for r in responses] == [204, 200, 200, 404, 401]
    assert responses[0].header("X-Which") == "first"
    assert responses[1].body == b"second"
    assert [r.body for r in strict_upstream.requests] == [b"first", b"second"]
    assert strict_upstream.errors == []


async def test_many_pipelined_requests_in_one_segment(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    n = 200
    data = b"".join(request("POST", "/api/v1/write", b"%d" % i, token=TOKEN) for i in range(n))
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [204] * n
    assert [r.body for r in strict_upstream.requests] == [b"%d" % i for i in range(n)]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/v1/write HTTP/1.0\r\nHost: gw\r\n" + AUTH,
        RW + b"Connection: close\r\n",
    ],
    ids=["http10", "connection_close"],
)
async def test_bytes_after_a_closing_request_do_not_void_it(
    head: bytes, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """RFC 9112 §9.6: the request carrying "close" is answered; what follows
    it on the connection is not processed (and does not cancel it)."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = head + b"Content-Length: 4\r\n\r\nabcd" + SMUGGLED
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [204], stream[:300]
    [req] = strict_upstream.requests
    assert req.body == b"abcd"
    assert b"SMUGGLED" not in strict_upstream.received


async def test_upgrade_is_never_honoured(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """An Upgrade request is proxied as plain HTTP (Upgrade stripped) and the
    connection ends after it: the bytes after it are never taken as HTTP."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = RW + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n" + SMUGGLED
    stream = await _exchange(gw.port, data)
    assert parse_statuses(stream) == [204]
    [req] = strict_upstream.requests
    assert req.body == b""
    assert "upgrade" not in req.names()
    assert "connection" not in req.names()
    assert b"SMUGGLED" not in strict_upstream.received


@pytest.mark.parametrize(
    "data",
    [
        b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /nope HTTP/1.1\r\nHost: gw\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["401", "404"],
)
async def test_refused_chunked_request_followed_by_a_bad_chunk(
    data: bytes,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answered (and write_eof'd) at its head, then a parse error in the same
    segment: one answer, a clean close, and no exception escaping the
    protocol callback (asyncio's "Fatal error on transport")."""
    gw = await start_gateway(hostile_config(strict_upstream))
    stream = await _exchange(gw.port, data)
    assert len(parse_statuses(stream)) == 1
    await wait_for(lambda: gw.stats.open_connections == 0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage() + str(errors[0].exc_info)
