"""The client connection's flow over real sockets: pipelined requests whose
body comes later, the header timeout measured from a head's first byte,
refused ``Expect: 100-continue`` requests, HTTP/1.0 with chunked framing,
and the number of requests taken from one read (issue 10 items 5-7).

The trickling senders pace themselves with sleeps: that is the attack, not
synchronisation; every wait on the gateway is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.conftest import TOKEN, StartGateway, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import RawClient, raw_client
from tests.support.upstreams import RawUpstream, Responder, UpConn
from tests.support.wire import ParsedRequest, parse_statuses, request

SLACK = 1.0  # the sweeper ticks every timeout / 5; a loaded CI box


async def _trickle(conn: RawClient, data: bytes, every: float) -> None:
    """One byte every ``every`` seconds until done or refused."""
    for i in range(len(data)):
        try:
            await conn.send(data[i : i + 1])
        except (ConnectionResetError, BrokenPipeError):
            return
        await asyncio.sleep(every)


def _small_buffer_socket(port: int) -> socket.socket:
    """A connected client socket with a 4 KiB receive buffer: what it does not
    read backs up into the gateway's side quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _answer_of(size: int) -> Responder:
    """An upstream responder: 200 with a body of ``size`` bytes."""

    async def answer(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"s" * size)

    return answer


# -- item 5: a pipelined request whose body comes after its head ---------------------


@pytest.mark.parametrize("when", ["after_the_first_answer", "while_the_first_is_in_flight"])
async def test_pipelined_request_whose_body_comes_later_is_read(
    when: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Request 1 whole, request 2's head and half its body, then the rest:
    both are answered 2xx and the upstream sees both bodies complete."""
    release = asyncio.Event()

    async def responder(conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"one":
            await release.wait()
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    strict_upstream.responder = responder
    gw = await start_gateway(hostile_config(strict_upstream))
    second = request("POST", "/api/v1/write", b"b" * 2000, token=TOKEN)
    half = len(second) - 1000
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN) + second[:half])
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        if when == "after_the_first_answer":
            release.set()
            first = await conn.response()
            await conn.send(second[half:])
        else:
            await conn.send(second[half:])
            release.set()
            first = await conn.response()
        then = await conn.response(timeout=0.5 + SLACK)  # body_idle_timeout is 0.5
    assert (first.status, then.status) == (204, 204)
    assert [r.body for r in strict_upstream.requests] == [b"one", b"b" * 2000]
    assert strict_upstream.errors == []


# -- item 6: the header timeout bounds the head, from its first byte -----------------


async def test_slow_head_pipelined_behind_a_request_gets_the_header_timeout(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Request 1 whole, then request 2's head one byte per 100 ms: the head
    started with request 1's segment and is cut at header_timeout, not kept
    until the keep-alive timeout (30 s here)."""
    header_timeout = 1.0
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server=f"header_timeout_seconds = {header_timeout}\nkeepalive_timeout_seconds = 30",
        )
    )
    second = request("POST", "/api/v1/write", b"two", token=TOKEN)
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN) + second[:10])
        assert (await conn.response()).status == 204
        sender = asyncio.create_task(_trickle(conn, second[10:], 0.1))  # about 12 s
        try:
            closed = await conn.closed(header_timeout + SLACK + 1)
            elapsed = time.monotonic() - t0
        finally:
            sender.cancel()
    assert closed, "a trickled head outlived the header timeout"
    assert header_timeout - 0.05 <= elapsed <= header_timeout + SLACK, elapsed
    assert [r.body for r in strict_upstream.requests] == [b"one"]


async def test_header_timeout_counts_from_the_first_byte_not_the_target(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The method, then silence, then the rest of the head trickled: the
    head is cut header_timeout after its first byte ("P"), not after the
    first byte of its target."""
    header_timeout = 2.0
    gw = await start_gateway(
        hostile_config(strict_upstream, server=f"header_timeout_seconds = {header_timeout}")
    )
    rest = request("POST", "/api/v1/write", b"x", token=TOKEN)[4:]
    async with raw_client(gw.port) as conn:
        await conn.send(b"POST")
        t0 = time.monotonic()
        await asyncio.sleep(1.7)  # still inside the first idle wait (header_timeout)
        sender = asyncio.create_task(_trickle(conn, rest, 0.1))
        try:
            closed = await conn.closed(2 * header_timeout + SLACK)
            elapsed = time.monotonic() - t0
        finally:
            sender.cancel()
    assert closed
    assert header_timeout - 0.05 <= elapsed <= header_timeout + SLACK, elapsed
    assert strict_upstream.requests == []


async def test_idle_keep_alive_connection_gets_the_keepalive_timeout(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Idle between requests is the keep-alive timeout's, not the header
    timeout's: open well past header_timeout, closed at keepalive_timeout."""
    gw = await start_gateway(
        hostile_config(
            strict_upstream, server="header_timeout_seconds = 0.3\nkeepalive_timeout_seconds = 2"
        )
    )
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN))
        assert (await conn.response()).status == 204
        t0 = time.monotonic()
        assert not await conn.closed(1.0)
        # Still usable, then closed at the keep-alive deadline.
        await conn.send(request("POST", "/api/v1/write", b"two", token=TOKEN))
        assert (await conn.response()).status == 204
        t0 = time.monotonic()
        assert await conn.closed(2.0 + SLACK)
        assert time.monotonic() - t0 >= 2.0 - 0.05


async def test_pipelined_head_sent_promptly_is_not_cut_while_the_first_is_slow(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The gateway reads a pipelined head as it arrives: an upstream slower
    than header_timeout does not make a promptly sent head late."""

    async def slow(conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"one":
            await asyncio.sleep(1.5)
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    strict_upstream.responder = slow
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server="header_timeout_seconds = 1.0",
            upstream="response_timeout_seconds = 5",
        )
    )
    second = request("POST", "/api/v1/write", b"two", token=TOKEN)
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"one", token=TOKEN) + second[:20])
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        await conn.send(second[20:])
        responses = [await conn.response(timeout=5.0) for _ in range(2)]
    assert [r.status for r in responses] == [204, 204]
    assert [r.body for r in strict_upstream.requests] == [b"one", b"two"]


# -- item 7: a refused Expect: 100-continue request -----------------------------------


@pytest.mark.parametrize("client", ["waits", "sends_anyway"])
async def test_refused_expect_continue_closes_the_connection(
    client: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Refused at its head (401, no 100 Continue): the client may rightly
    never send the body (RFC 9110 §10.1.1), so what it sends next cannot be
    told from that body.  The answer says close and the connection ends; the
    next request is never taken for body bytes, nor forwarded."""
    gw = await start_gateway(hostile_config(strict_upstream))
    head = request(
        "POST", "/api/v1/write", b"x" * 100, headers=[("Expect", "100-continue")]
    ).removesuffix(b"x" * 100)
    follow = request("POST", "/api/v1/write", b"y" * 60, token=TOKEN)
    async with raw_client(gw.port) as conn:
        await conn.send(head)
        resp = await conn.response(interim=True)
        assert resp.status == 401
        assert resp.header("Connection") == "close"
        await conn.send((b"x" * 100 if client == "sends_anyway" else b"") + follow)
        stream = await conn.eof(timeout=2.0 + SLACK + 1)  # closed by the linger at the latest
    assert parse_statuses(stream) == []
    assert strict_upstream.requests == []


# -- suspicion: HTTP/1.0 with Transfer-Encoding ---------------------------------------


async def test_http10_with_transfer_encoding_is_answered_then_closed(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has framing
    that cannot be trusted: process it, then close, even with keep-alive."""
    gw = await start_gateway(hostile_config(strict_upstream))
    data = (
        b"POST /api/v1/write HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        + request("POST", "/api/v1/write", b"SMUGGLED", token=TOKEN)
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        resp = await conn.response()
        rest = await conn.eof(timeout=3.0)
    assert resp.status == 204
    assert resp.header("Connection") == "close"
    assert parse_statuses(rest) == []
    assert [r.body for r in strict_upstream.requests] == [b"hello"]


# -- requests taken from one read -------------------------------------------------------


async def test_requests_pipelined_in_one_read_are_capped(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """2000 tiny pipelined requests in one write: the gateway answers what
    it takes from one read (at most 256), in order, then closes, instead of
    queueing or answering thousands before reading can pause."""
    gw = await start_gateway(
        hostile_config(strict_upstream, extra="[limits]\nauth_failure_limit = 0")
    )
    one = b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n"
    async with raw_client(gw.port) as conn:
        await conn.send(one * 2000)
        stream = await conn.eof(timeout=5.0)
    answered = stream.count(b"HTTP/1.1 401 ")
    assert 256 <= answered < 2000, answered
    assert set(parse_statuses(b"\r\n" + stream)) == {401}


# -- /health with a body ----------------------------------------------------------------


async def test_health_with_a_stalled_body_is_closed_at_the_body_idle_timeout(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """/health is answered at its head; the body left to drop has the body
    idle deadline of every local answer (it had none: held forever)."""
    body_idle = 0.5
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(
            request("GET", "/health", token=TOKEN, headers=[("Content-Length", "100")]) + b"abc"
        )
        assert (await conn.response()).status == 200
        t0 = time.monotonic()
        closed = await conn.closed(body_idle + SLACK + 2)
        elapsed = time.monotonic() - t0
    assert closed, "a stalled /health body held the connection"
    assert elapsed <= body_idle + SLACK


async def test_capped_pipeline_to_a_client_that_pauses_reading_is_answered_in_full(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Proxied requests pipelined past the cap, 64 KiB answers, a client with
    a small receive buffer that reads only after a second: the gateway stops
    while it does not read, then answers every request it took, in order,
    and closes."""
    body = b"r" * 65536

    async def big(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-N: %s\r\n\r\n" % (len(body), req.body)
            + body
        )

    strict_upstream.responder = big
    gw = await start_gateway(
        hostile_config(strict_upstream, server="body_idle_timeout_seconds = 5")
    )
    sock = _small_buffer_socket(gw.port)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    conn = RawClient(reader, writer)
    try:
        await conn.send(
            b"".join(request("POST", "/api/v1/write", b"%d" % i, token=TOKEN) for i in range(600))
        )
        await asyncio.sleep(1.0)  # not reading: that is the case under test
        held = len(strict_upstream.requests)
        answers = [await conn.response(timeout=10.0) for _ in range(held)]
        rest = await conn.eof(timeout=10.0)
    finally:
        await conn.close()
    assert held < 256, "the gateway kept starting requests for a client that did not read"
    assert [r.header("X-N") for r in answers] == [str(i) for i in range(held)]
    n = held + rest.count(b"HTTP/1.1 200 ")
    assert 256 <= n < 600, n
    assert [r.body for r in strict_upstream.requests] == [b"%d" % i for i in range(n)]


async def test_a_slow_reader_that_keeps_reading_is_not_cut_off(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """One 3 MiB answer to a client with a small receive buffer that reads
    8 KiB every 20 ms (about 400 KiB/s, eight seconds in all) while the
    idle timeout is one second: it never stops reading for a second, so it
    gets the whole answer.  The write deadline is an idle timeout, as the
    README says: it used to run from when the client's side paused until
    the buffer drained below its low-water mark, which with megabytes
    queued in the kernel took longer than the timeout however steadily the
    client read (how the capped-pipeline test above flaked on a loaded box)."""
    size = 3 << 20
    strict_upstream.responder = _answer_of(size)
    gw = await start_gateway(
        hostile_config(strict_upstream, server="body_idle_timeout_seconds = 1")
    )
    loop = asyncio.get_running_loop()
    sock = _small_buffer_socket(gw.port)
    sock.setblocking(False)
    got = 0
    try:
        await loop.sock_sendall(sock, request("POST", "/api/v1/write", b"x", token=TOKEN))
        deadline = time.monotonic() + 40  # bounds the loop: 8 s expected
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 8192), 5.0)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += len(chunk)
            if got >= size:
                break
    finally:
        sock.close()
    assert got >= size, f"cut off after {got} of {size} bytes while reading steadily"


async def test_a_reader_slower_than_the_minimum_rate_is_cut_off(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The same 3 MiB answer to a client that takes 4 KiB every quarter
    second (16 KiB/s) while the minimum rate is 64 KiB/s: it makes progress,
    but too little to hold a connection for, so it is closed within a couple
    of idle timeouts, not kept for as long as it trickles (the rate a client
    must keep is the request bodies' ``min_body_rate_bytes_per_second``)."""
    size = 3 << 20
    strict_upstream.responder = _answer_of(size)
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server="body_idle_timeout_seconds = 1",
            extra="[limits]\nmin_body_rate_bytes_per_second = 65536",
        )
    )
    loop = asyncio.get_running_loop()
    sock = _small_buffer_socket(gw.port)
    sock.setblocking(False)

    async def trickle() -> None:
        for _ in range(240):  # 60 s at most
            await asyncio.sleep(0.25)
            try:
                if not await loop.sock_recv(sock, 4096):
                    return
            except OSError:
                return

    reading = asyncio.create_task(trickle())
    bound = 2 * 1 + 2 * SLACK + 2
    try:
        await loop.sock_sendall(sock, request("POST", "/api/v1/write", b"x", token=TOKEN))
        await wait_for(lambda: gw.stats.open_connections == 1, 5.0)
        t0 = time.monotonic()
        await wait_for(lambda: gw.stats.open_connections == 0, bound)
        assert time.monotonic() - t0 <= bound
    finally:
        reading.cancel()
        sock.close()
