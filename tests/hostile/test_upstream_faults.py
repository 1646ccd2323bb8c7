"""Upstream faults: hangs (504), resets and refusals (502), garbage (502), each
503 on an OTLP route; slow but live answers (passed through), stalls mid-body
(truncated, never a short success), early answers, and dead pooled
connections."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast

import pytest

from gateway.datapath.upstream import Pools
from tests.conftest import TOKEN, StartGateway, config_text, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import Closed, RawClient, raw_client
from tests.support.upstreams import RawUpstream, UpConn, respond_204
from tests.support.wire import ParsedRequest, request

RESPONSE_TIMEOUT = 0.5
SLACK = 1.0
ROUTES = [("/api/v1/write", "remote_write"), ("/v1/traces", "otlp_traces")]


def failed(route: str, remote_write: int) -> int:
    """An upstream failure's status: OTLP routes answer 503 (issue 10 item 13)."""
    return 503 if route == "otlp_traces" else remote_write


async def _hang(conn: UpConn, req: ParsedRequest) -> None:
    await asyncio.Event().wait()


@pytest.mark.parametrize(("path", "route"), ROUTES)
async def test_hanging_upstream_is_a_gateway_timeout_and_the_connection_survives(
    path: str, route: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    strict_upstream.responder = _hang
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        await conn.send(request("POST", path, b"data", token=TOKEN))
        resp = await conn.response(timeout=RESPONSE_TIMEOUT + SLACK + 1)
        elapsed = time.monotonic() - t0
        assert resp.status == failed(route, 504)
        assert RESPONSE_TIMEOUT - 0.05 <= elapsed <= RESPONSE_TIMEOUT + SLACK
        # The hung upstream connection is given up, never reused.
        await wait_for(strict_upstream.conns[0].closed.is_set)
        strict_upstream.responder = respond_204
        await conn.send(request("POST", path, b"again", token=TOKEN))
        assert (await conn.response()).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"data", b"again"]
    assert len(strict_upstream.conns) == 2
    assert gw.stats.routes[route].upstream_errors == {"timeout": 1}


async def _reset(conn: UpConn, req: ParsedRequest) -> None:
    conn.reset()


async def _fin(conn: UpConn, req: ParsedRequest) -> None:
    conn.writer.close()


async def _partial_head_then_reset(conn: UpConn, req: ParsedRequest) -> None:
    await conn.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    conn.reset()


def _garbage(data: bytes) -> object:
    async def respond(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(data)

    return respond


FAULTS = {
    "reset": _reset,
    "close_without_answer": _fin,
    "partial_head_then_reset": _partial_head_then_reset,
    "garbage": _garbage(b"garbage garbage\r\n\r\n"),
    "not_http": _garbage(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40),
    "bad_status": _garbage(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    "bad_header_line": _garbage(b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n"),
    "cl_and_te": _garbage(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "negative_cl": _garbage(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    "switching_protocols": _garbage(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize(("path", "route"), ROUTES)
async def test_broken_upstream_answer_is_a_bad_gateway(
    fault: str, path: str, route: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    strict_upstream.responder = FAULTS[fault]  # type: ignore[assignment]
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", path, b"data", token=TOKEN))
        resp = await conn.response(timeout=RESPONSE_TIMEOUT + SLACK)
        assert resp.status == failed(route, 502)
        assert b"127.0.0.1" not in resp.body  # never an upstream address
        # The client connection stays usable.
        strict_upstream.responder = respond_204
        await conn.send(request("POST", path, b"next", token=TOKEN))
        assert (await conn.response()).status == 204
    assert sum(gw.stats.routes[route].upstream_errors.values()) == 1


@pytest.mark.parametrize(("path", "route"), ROUTES)
async def test_refused_upstream_is_a_bad_gateway(
    path: str, route: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connections are refused
        strict_upstream.port = dead
        gw = await start_gateway(hostile_config(strict_upstream))
        async with raw_client(gw.port) as conn:
            await conn.send(request("POST", path, b"data", token=TOKEN))
            resp = await conn.response()
    assert resp.status == failed(route, 502)
    assert gw.stats.routes[route].upstream_errors == {"connect": 1}


async def test_slow_but_live_upstream_is_passed_through(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Each gap is under the response timeout, the total is well over it."""

    async def slow(conn: UpConn, req: ParsedRequest) -> None:
        await asyncio.sleep(0.3)
        await conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"one", b"two", b"three", b"four"):
            await asyncio.sleep(0.3)
            await conn.write(b"%x\r\n%s\r\n" % (len(part), part))
        await conn.write(b"0\r\n\r\n")

    strict_upstream.responder = slow
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        await conn.send(request("POST", "/v1/traces", b"data", token=TOKEN))
        resp = await conn.response(timeout=5.0)
        assert time.monotonic() - t0 > 3 * RESPONSE_TIMEOUT
    assert resp.status == 200
    assert resp.body == b"onetwothreefour"


async def test_upstream_stalling_mid_body_truncates_the_response(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Status already sent: the client must see a cut connection, not a
    complete short response it would take for success."""

    async def stall(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"h" * 10)
        await asyncio.Event().wait()

    strict_upstream.responder = stall
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/v1/traces", b"data", token=TOKEN))
        with pytest.raises(Closed):
            await conn.response(timeout=RESPONSE_TIMEOUT + SLACK + 1)
    await wait_for(strict_upstream.conns[0].closed.is_set)


async def test_upstream_closing_mid_body_truncates_the_response(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def cut(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.writer.close()

    strict_upstream.responder = cut
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/v1/traces", b"data", token=TOKEN))
        with pytest.raises(Closed):
            await conn.response()


@pytest.mark.parametrize("ending", ["fin", "rst"])
async def test_close_delimited_answer_is_complete_only_at_a_clean_close(
    ending: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A response without a length ends at the upstream's close (RFC 9112
    §6.3).  A FIN ends it; a reset may have cut it short, so the client must
    see a truncated answer, never a complete one."""

    async def close_delimited(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        if ending == "rst":
            conn.reset()
        else:
            conn.writer.close()

    strict_upstream.responder = close_delimited
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/v1/traces", b"data", token=TOKEN))
        if ending == "fin":
            resp = await conn.response()
            assert (resp.status, resp.body) == (200, b"partial")
            assert resp.header("Transfer-Encoding") == "chunked"
        else:
            with pytest.raises(Closed):
                await conn.response()
    expected = {} if ending == "fin" else {"reset": 1}
    assert gw.stats.routes["otlp_traces"].upstream_errors == expected


async def test_slow_connect_is_bounded_by_the_connect_timeout_not_the_response_timeout(
    start_gateway: StartGateway,
) -> None:
    """The upstream's accept queue is full, so its SYN is dropped and sent
    again a second later (TCP's initial retransmit timeout): the connect
    takes about 1 s, over response_timeout (0.5 s), under connect_timeout
    (3 s).  A request complete while connecting is sent when the connection
    is made and gets the upstream's answer, not a 504 (the socket fuzz's
    case 1506: a whole request, then trailing bytes, answered 504)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(2):  # fill the accept queue (backlog 0 holds one)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)  # the fillers' handshakes complete in the kernel
        url = f"http://127.0.0.1:{port}"
        gw = await start_gateway(
            config_text(
                url + "/api/v1/write",
                url + "/v1/traces",
                server="header_timeout_seconds = 5",
                upstream="connect_timeout_seconds = 3\nresponse_timeout_seconds = 0.5",
            )
        )

        async def serve() -> bytes:
            # Free the queue, then take the gateway's connection once its
            # retransmitted SYN gets through, and answer its request.
            await asyncio.sleep(0.3)
            while True:
                accepted, _ = await loop.sock_accept(listener)
                data = await loop.sock_recv(accepted, 65536)
                if not data:  # a filler
                    accepted.close()
                    continue
                while b"accepted" not in data:
                    data += await loop.sock_recv(accepted, 65536)
                await loop.sock_sendall(accepted, b"HTTP/1.1 204 No Content\r\n\r\n")
                accepted.close()
                return data

        server = asyncio.create_task(serve())
        try:
            async with raw_client(gw.port) as conn:
                t0 = time.monotonic()
                await conn.send(request("POST", "/api/v1/write", b"accepted", token=TOKEN))
                for filler in fillers:
                    filler.close()
                resp = await conn.response(timeout=5.0)
                elapsed = time.monotonic() - t0
            assert resp.status == 204, f"answered {resp.status} after {elapsed:.2f} s"
            seen = await asyncio.wait_for(server, 5.0)
        finally:
            server.cancel()
    assert elapsed > 0.5  # the connect really was slower than the response timeout
    assert seen.endswith(b"\r\n\r\naccepted")


async def test_upstream_answering_before_the_body_ends(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """An early 413 from the upstream is passed through verbatim; the rest of
    the client's body is not wanted and the upstream connection is dropped."""

    async def early(conn: UpConn) -> None:
        await conn.head_seen.wait()
        await conn.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")

    gw = await start_gateway(
        hostile_config(strict_upstream, server="body_idle_timeout_seconds = 5")
    )

    async def watcher(conn: UpConn) -> None:
        asyncio.get_running_loop().create_task(early(conn))

    strict_upstream.on_connect = watcher
    async with raw_client(gw.port) as conn:
        await conn.send(
            b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"b" * 1000
        )
        resp = await conn.response()
        assert resp.status == 413
        assert resp.body == b"too big!"
        assert resp.header("Connection") == "close"
        assert await conn.closed(3.0)
    await wait_for(strict_upstream.conns[0].closed.is_set)
    assert strict_upstream.requests == []


async def test_upstream_5xx_is_passed_through_verbatim(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def five_hundred(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nX-Vm: 1\r\n\r\noops"
        )

    strict_upstream.responder = five_hundred
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"data", token=TOKEN))
        resp = await conn.response()
    assert (resp.status, resp.body, resp.header("X-Vm")) == (500, b"oops", "1")


async def test_pooled_connection_closed_by_upstream_is_not_reused(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN))
        assert (await conn.response()).status == 204
        # The upstream closes its idle keep-alive connection (its own idle timeout).
        strict_upstream.conns[0].writer.close()
        await wait_for(strict_upstream.conns[0].closed.is_set)
        # Wait until the gateway has seen the FIN and dropped the pooled
        # socket (internal state: there is no public signal for it).
        assert gw.shared is not None
        [pool] = cast(Pools, gw.shared.pools)._pools.values()
        await wait_for(lambda: not pool._idle)
        await conn.send(request("POST", "/api/v1/write", b"two", token=TOKEN))
        assert (await conn.response()).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"one", b"two"]


async def test_client_leaving_while_upstream_works_aborts_upstream(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    strict_upstream.responder = _hang
    gw = await start_gateway(
        hostile_config(strict_upstream, upstream="response_timeout_seconds = 30")
    )
    conn = await RawClient.open(gw.port)
    await conn.send(request("POST", "/api/v1/write", b"data", token=TOKEN))
    await wait_for(lambda: len(strict_upstream.requests) == 1)
    conn.abort()
    await wait_for(strict_upstream.conns[0].closed.is_set)
    assert gw.stats.pairs["remote_write", "ingest"].codes == {499: 1}
