"""Hostile HTTP/2 clients of HTTP/1.1 routes: bodies over the cap, stalled
and reset mid-body, empty DATA frames, lengths that lie, windows that never
open, and a hundred streams on one connection against the concurrency
limits.  The raw upstream records every byte it got with a strict parser,
so "never complete" means its parser never saw the request end; memory is
the gateway process's traced peak over the attack."""

from __future__ import annotations

import asyncio
import contextlib
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import WindowUpdateFrame

from tests.conftest import TOKEN, StartGateway, wait_for
from tests.hostile.conftest import hostile_config
from tests.hostile.test_h2 import MEMORY_BOUND, Attacker, peak_memory
from tests.support.grpc_peers import TRACE_METHOD
from tests.support.h2client import H2Client
from tests.support.metrics import scrape
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest

# An otlp-grpc route is what makes the gateway speak h2c at all.
GRPC_ROUTE = f"""
[[routes]]
name = "grpc_traces"
path = "{TRACE_METHOD}"
protocol = "otlp-grpc"
upstream = "http://127.0.0.1:9"
"""
AUTH = [("authorization", f"Bearer {TOKEN}")]
BODY_IDLE = 0.5  # hostile_config's FAST_SERVER
CAP = 1024 * 1024  # hostile_config's max_body_bytes
CANCEL, NO_ERROR = 8, 0


def h2_hostile_config(up: RawUpstream, extra: str = "") -> str:
    text = hostile_config(up, extra=GRPC_ROUTE + extra)
    return text.replace(
        'routes = ["remote_write", "otlp_traces"]',
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]',
        1,
    )


def never_complete(up: RawUpstream) -> None:
    """The upstream saw request bytes but never a whole request, and no framing error."""
    assert up.received
    assert up.requests == []
    assert up.errors == []


async def test_body_over_the_cap_without_a_length_is_413_and_never_complete(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    with peak_memory() as peak:
        sid = await client.start("POST", "/api/v1/write", AUTH)
        sending = asyncio.create_task(client.send(sid, b"x" * (4 * CAP), end=True))
        resp = await client.wait(sid)
        sending.cancel()
        await wait_for(strict_upstream.conns[0].closed.is_set)
    assert resp.status == 413
    assert resp.body == b"request body exceeds the route limit\n"
    never_complete(strict_upstream)
    # Chunked upstream: what it got stops before the final chunk.
    assert b"0\r\n\r\n" not in strict_upstream.received
    assert peak[0] < MEMORY_BOUND
    # The connection is still good for the next request.
    again = await client.request("POST", "/api/v1/write", AUTH, b"small")
    await client.close()
    assert again.status == 204
    assert [r.body for r in strict_upstream.requests] == [b"small"]


async def test_a_stalled_body_is_timed_out_and_the_upstream_request_aborted(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    t0 = time.monotonic()
    sid = await client.start("POST", "/v1/traces", [*AUTH, ("content-length", "5000")])
    await client.send(sid, b"y" * 1000)  # the other 4000 never come
    resp = await client.wait(sid, timeout=5)
    elapsed = time.monotonic() - t0
    # OTLP route: 503 + Retry-After, so the exporter retries.
    assert resp.status == 503
    assert resp.header("retry-after") == "1"
    assert BODY_IDLE - 0.05 <= elapsed < BODY_IDLE + 2.0
    await wait_for(strict_upstream.conns[0].closed.is_set)
    never_complete(strict_upstream)
    # The stream ends (reset, after one more idle period), and leaves the connection.
    shared = gw.shared
    assert shared is not None
    await wait_for(lambda: all(not getattr(c, "streams", None) for c in shared.connections))
    await client.close()
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route="otlp_traces", code="503") == 1


async def test_client_reset_mid_body_aborts_the_upstream_request(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", [*AUTH, ("content-length", "100000")])
    await client.send(sid, b"z" * 30_000)
    await wait_for(lambda: len(strict_upstream.received) > 30_000)
    await client.reset(sid, CANCEL)
    await wait_for(strict_upstream.conns[0].closed.is_set)
    never_complete(strict_upstream)
    again = await client.request("POST", "/api/v1/write", AUTH, b"next")
    await client.close()
    assert again.status == 204
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route="remote_write", code="499") == 1
    assert metrics.sum("gateway_requests_total", route="remote_write", code="204") == 1


async def test_empty_data_frames_never_end_a_chunked_body(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", AUTH)  # no length: chunked upstream
    await client.send(sid, b"first")
    for _ in range(5):
        client.h2.send_data(sid, b"")
        await client.send(sid, b"")
    await client.send(sid, b"")  # flushes the empty frames
    await wait_for(lambda: b"first" in strict_upstream.received)
    await asyncio.sleep(0.1)
    assert strict_upstream.requests == []  # an empty chunk would have ended it
    await client.send(sid, b"second", end=True)
    resp = await client.wait(sid)
    await client.close()
    assert resp.status == 204
    assert [r.body for r in strict_upstream.requests] == [b"firstsecond"]


async def test_a_body_shorter_than_its_length_never_reaches_upstream_complete(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", [*AUTH, ("content-length", "10000")])
    await client.send(sid, b"q" * 4000)
    await wait_for(lambda: len(strict_upstream.received) > 4000)
    await client.send(sid, b"", end=True)  # 6000 bytes short
    await asyncio.wait_for(client.closed.wait(), 5)
    await wait_for(strict_upstream.conns[0].closed.is_set)
    never_complete(strict_upstream)
    assert client.goaway == 1  # PROTOCOL_ERROR
    await client.close()


async def test_a_client_that_never_opens_its_window_cannot_make_the_gateway_hold_the_answer(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    big = 20 * 1024 * 1024

    async def flood(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
        chunk = b"r" * 65536
        for _ in range(big // len(chunk)):
            await conn.write(chunk)

    strict_upstream.responder = flood
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port, auto_ack=False)  # 64 KiB, never reopened
    with peak_memory() as peak:
        t0 = time.monotonic()
        resp = await client.request("POST", "/api/v1/write", AUTH, b"ask")
        elapsed = time.monotonic() - t0
        await wait_for(strict_upstream.conns[0].closed.is_set)
    await client.close()
    assert resp.status == 200
    assert resp.reset == CANCEL  # never a short body taken as whole
    assert len(resp.body) == 65535
    assert elapsed < BODY_IDLE + 3.0
    assert peak[0] < MEMORY_BOUND


async def test_an_upstream_that_stops_reading_shuts_the_clients_window(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def stop_reading(conn: UpConn) -> None:
        await conn.read_head()
        await asyncio.Event().wait()  # never reads the body

    strict_upstream.behaviour = stop_reading
    # A long body-idle timeout: twenty bodies through one test process's loop
    # (traced by tracemalloc) may leave a stream unserved for half a second.
    text = h2_hostile_config(strict_upstream).replace(
        "body_idle_timeout_seconds = 0.5", "body_idle_timeout_seconds = 5.0"
    )
    gw = await start_gateway(text)
    client = await H2Client.open(gw.port)
    with peak_memory() as peak:
        sids = []
        for _ in range(20):
            sid = await client.start("POST", "/api/v1/write", [*AUTH, ("content-length", str(CAP))])
            sids.append(sid)
        body = b"w" * CAP  # one buffer for every stream: the attacker's memory is traced too
        sends = [asyncio.create_task(client.send(sid, body, end=True)) for sid in sids]
        answers = [await client.wait(sid, timeout=10) for sid in sids]
        for task in sends:
            task.cancel()
    await client.close()
    # The upstream must drain within the response timeout: 504, never held forever.
    assert {r.status for r in answers} == {504}
    assert peak[0] < MEMORY_BOUND
    assert strict_upstream.requests == []


async def test_a_hundred_streams_are_held_to_the_concurrency_limits(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    release = asyncio.Event()
    active = [0, 0]  # now, most at once

    async def hold(conn: UpConn, req: ParsedRequest) -> None:
        active[0] += 1
        active[1] = max(active)
        try:
            await release.wait()
        finally:
            active[0] -= 1
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    strict_upstream.responder = hold
    limits = "\n[limits]\nmax_concurrent_requests = 4\nqueue_size = 4\nqueue_timeout_seconds = 5\n"
    text = h2_hostile_config(strict_upstream, limits).replace(
        "response_timeout_seconds = 0.5", "response_timeout_seconds = 5"
    )
    gw = await start_gateway(text)
    client = await H2Client.open(gw.port)
    with peak_memory() as peak:
        sids = [
            await client.start("POST", "/api/v1/write", [*AUTH, ("content-length", "4")])
            for _ in range(100)
        ]
        for sid in sids:
            await client.send(sid, b"data", end=True)
        await wait_for(lambda: sum(r.done.is_set() for r in client.responses.values()) >= 92)
        await wait_for(lambda: active[0] == 4)
        refused = [r for r in client.responses.values() if r.done.is_set()]
        release.set()
        answers = [await client.wait(sid) for sid in sids]
    await client.close()
    assert {r.status for r in refused} == {429}
    assert all(r.header("retry-after") == "1" for r in refused)
    assert sorted(r.status for r in answers).count(204) == 8  # 4 admitted + 4 queued
    assert active[1] == 4
    assert strict_upstream.connections <= 8
    assert peak[0] < MEMORY_BOUND
    assert gw.stats.limit_rejections == {"concurrency": 92}


async def test_an_early_upstream_answer_is_relayed_and_its_connection_never_reused(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def early(conn: UpConn) -> None:
        # Answers on the head alone and keeps the connection: a reused one
        # would take the rest of this body for the next request's head.
        await conn.read_head()
        await conn.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope")
        await conn.read_to_eof()

    strict_upstream.behaviour = early
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", [*AUTH, ("content-length", "60000")])
    await client.send(sid, b"e" * 20_000)
    resp = await client.wait(sid)
    assert (resp.status, resp.body) == (400, b"nope")
    await wait_for(strict_upstream.conns[0].closed.is_set)
    strict_upstream.behaviour = None
    again = await client.request("POST", "/api/v1/write", AUTH, b"fresh")
    await client.close()
    assert again.status == 204
    assert strict_upstream.connections == 2
    assert [r.body for r in strict_upstream.requests] == [b"fresh"]


class EarlyGrpcUpstream:
    """An h2c gRPC upstream (h2 on a socket) that answers every call
    trailers-only as soon as its HEADERS arrive, never reading the message:
    what a receiver does when it refuses a call up front."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.calls = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.calls += 1
                        fields = [(":status", "200"), ("content-type", "application/grpc")]
                        fields += [("grpc-status", "8"), ("grpc-message", "too big")]
                        conn.send_headers(ev.stream_id, fields, end_stream=True)
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                writer.write(conn.data_to_send())
        writer.close()


async def test_an_upstream_answering_a_call_early_frees_its_stream(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    # Each early answer must end the upstream stream on our side too: left
    # half-open, every one would hold one of the upstream connection's 100
    # streams for good, and the pool would run out of connections.
    up = EarlyGrpcUpstream()
    await up.start()
    text = h2_hostile_config(strict_upstream).replace("http://127.0.0.1:9", up.url)
    gw = await start_gateway(text)
    client = await H2Client.open(gw.port)
    grpc = [*AUTH, ("content-type", "application/grpc"), ("te", "trailers")]
    try:
        for _ in range(150):
            sid = await client.start("POST", TRACE_METHOD, grpc)
            await client.send(sid, b"\x00\x00\x00\x10\x00" + b"m" * 1000)  # not ended
            resp = await client.wait(sid)
            assert dict(resp.headers).get("grpc-status") == "8", resp
    finally:
        await client.close()
        await up.stop()
    assert up.calls == 150
    assert up.connections == 1


async def test_a_client_that_stops_reading_its_socket_cannot_make_the_gateway_buffer_its_windows(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    # Huge windows, then the socket is never read: what the gateway may send
    # is bounded by the windows, what it may hold must not be.
    big = 96 * 1024 * 1024

    async def flood(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
        chunk = b"s" * 65536
        for _ in range(big // len(chunk)):
            await conn.write(chunk)

    strict_upstream.responder = flood
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    window = 2**31 - 1
    peer = await Attacker.open(gw.port, settings={0x4: window})
    fields = [(":method", "POST"), (":scheme", "http"), (":path", "/api/v1/write")]
    fields += [(":authority", "gw"), *AUTH]
    block = peer.encoder.encode(fields)
    with peak_memory() as peak:
        await peer.send(
            WindowUpdateFrame(0, window_increment=window - 65535).serialize()
            + peer.headers(1, block=block, end=True)
        )
        await wait_for(
            lambda: bool(strict_upstream.conns) and strict_upstream.conns[0].closed.is_set(), 10
        )
    peer.close()
    assert peak[0] < MEMORY_BOUND


async def test_an_upstream_cut_mid_answer_resets_the_stream_never_a_short_success(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    async def cut(conn: UpConn, req: ParsedRequest) -> None:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"p" * 100)
        conn.reset()

    strict_upstream.responder = cut
    gw = await start_gateway(h2_hostile_config(strict_upstream))
    client = await H2Client.open(gw.port)
    resp = await client.request("POST", "/api/v1/write", AUTH, b"x")
    again = await client.request("POST", "/api/v1/write", AUTH, b"y")  # the connection lives
    await client.close()
    assert resp.status == 200
    assert resp.header("content-length") == "1000"
    assert resp.reset == CANCEL
    assert not resp.ended
    assert len(resp.body) == 100
    assert again.status == 200
    assert again.reset == CANCEL
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route="remote_write", kind="reset") == 2
