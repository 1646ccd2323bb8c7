"""The exchange, in memory: driven as the client connection drives it,
against a fake ``ClientPort`` and a fake upstream (``UpstreamPort``), with
the real config, decide, error table and accounting.  What reaches the
fake upstream is read back with the hostile tier's strict parser."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from gateway.config.loader import loads
from gateway.datapath.exchange import Exchange, State
from gateway.datapath.ports import PAUSE_UPSTREAM, Deadline, ResponseSink
from gateway.datapath.shared import Shared
from gateway.policy.generation import Generation
from gateway.telemetry import log
from gateway.telemetry.counters import Stats
from tests.conftest import TOKEN, config_text
from tests.support.heads import parse_head
from tests.support.wire import Incomplete, parse_request, parse_statuses


@dataclass
class FakePort:
    """A ClientPort that records everything the exchange asks of it."""

    peer: str = "192.0.2.10"
    peer_bytes: bytes = b"192.0.2.10"
    scheme: bytes = b"http"
    cert_subject: str = ""
    out: list[bytes] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    paused: int = 0
    deadline: int = Deadline.NONE
    closed: bool = False
    finished: list[object] = field(default_factory=list)

    def flush(self) -> None:
        for piece in self.out:
            self.sent += piece
        self.out = []

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def resume(self, reasons: int) -> None:
        self.paused &= ~reasons

    def set_deadline(self, kind: int, timeout: float) -> None:
        self.deadline = kind

    def clear_deadline(self) -> None:
        self.deadline = Deadline.NONE

    def close_now(self) -> None:
        self.closed = True

    def exchange_finished(self, ex: object) -> None:
        self.finished.append(ex)


@dataclass
class FakeUpstream:
    """An UpstreamPort: keeps the bytes sent to it, and whether it was aborted."""

    data: bytearray = field(default_factory=bytearray)
    sink: ResponseSink | None = None
    aborted: bool = False
    reading: bool = True

    def attach(self, sink: ResponseSink) -> None:
        self.sink = sink

    def send(self, pieces: list[bytes]) -> None:
        self.data += b"".join(pieces)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        self.aborted = True

    def reusable(self) -> bool:
        return not self.aborted


@dataclass
class FakePool:
    idle: list[FakeUpstream] = field(default_factory=list)
    released: list[FakeUpstream] = field(default_factory=list)

    def acquire(self) -> FakeUpstream | None:
        return self.idle.pop() if self.idle else None

    def release(self, conn: FakeUpstream, idle_until: float) -> None:
        self.released.append(conn)


@dataclass
class FakePools:
    pool: FakePool = field(default_factory=FakePool)

    def get(self, upstream: object) -> FakePool:
        return self.pool


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_shared(loop: asyncio.AbstractEventLoop, **config: Any) -> Shared:
    settings = loads(config_text(**config), environ={})
    return Shared(
        loop, Generation(settings), Stats(), cast(Any, FakePools()), None, log.get_logger()
    )


def request(path: str = "/api/v1/write", body: bytes = b"x" * 1024, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {TOKEN}"]
    if "Transfer_Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def start(
    shared: Shared, raw: bytes, upstream: FakeUpstream | None = None
) -> tuple[Exchange, FakePort]:
    if upstream is not None:
        cast(FakePools, shared.pools).pool.idle.append(upstream)
    port = FakePort()
    ex = Exchange(port, shared, parse_head(raw))
    ex.start()
    return ex, port


def test_a_proxied_request_reaches_the_upstream_whole_and_the_answer_the_client(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    ex, port = start(shared, request(), up)
    assert ex.state == State.SENT
    ex.on_body(b"x" * 1000)
    ex.flush_upstream()
    ex.on_body(b"x" * 24)
    ex.on_request_complete()
    ex.flush_upstream()
    assert port.deadline == Deadline.UPSTREAM
    seen, used = parse_request(bytes(up.data))
    assert used == len(up.data)
    assert (seen.method, seen.target, seen.body) == ("POST", "/api/v1/write", b"x" * 1024)
    assert seen.header("Authorization") is None
    assert seen.all("X-Forwarded-For") == ["192.0.2.10"]
    ex.response_head(204, b"No Content", b"X-Up: 1\r\n", True, False, 0)
    ex.response_complete()
    port.flush()
    assert port.sent.startswith(b"HTTP/1.1 204 No Content\r\nX-Up: 1\r\n")
    assert ex.finished
    assert port.finished == [ex]
    assert cast(FakePools, shared.pools).pool.released == [up]
    pair = shared.stats.pairs["remote_write", "ingest"]
    assert (pair.codes, pair.request_bytes) == ({204: 1}, 1024)
    assert shared.stats.routes["remote_write"].in_flight == 0


def test_a_refused_request_never_touches_an_upstream(loop: asyncio.AbstractEventLoop) -> None:
    shared = make_shared(loop)
    raw = request().replace(f"Authorization: Bearer {TOKEN}\r\n".encode(), b"")
    ex, port = start(shared, raw)
    assert ex.state == State.ANSWERED  # the body is still to be read and dropped
    ex.on_body(b"x" * 1024)
    ex.on_request_complete()
    port.flush()
    assert parse_statuses(bytes(port.sent)) == [401]
    assert ex.finished
    assert cast(FakePools, shared.pools).pool.released == []
    assert shared.stats.auth_failures == {("missing", "none", "none"): 1}


def test_a_streamed_body_over_the_limit_aborts_the_upstream_unterminated(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shared = make_shared(loop, max_body_bytes=1000)
    up = FakeUpstream()
    ex, port = start(shared, request(body=b"", Transfer_Encoding="chunked"), up)
    ex.on_body(b"y" * 600)
    ex.flush_upstream()
    ex.on_body(b"y" * 600)
    ex.flush_upstream()
    port.flush()
    assert up.aborted
    assert parse_statuses(bytes(port.sent)) == [413]
    with pytest.raises(Incomplete):  # no final chunk: never a complete body
        parse_request(bytes(up.data))
    assert ex.close
    assert ex.error == "body_too_large"


def test_an_upstream_failing_before_its_answer_is_502_for_remote_write(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    ex, port = start(shared, request(), up)
    ex.on_body(b"x" * 1024)
    ex.on_request_complete()
    ex.upstream_failed("reset")
    port.flush()
    assert parse_statuses(bytes(port.sent)) == [502]
    assert up.aborted
    assert shared.stats.routes["remote_write"].upstream_errors == {"reset": 1}


def test_a_client_gone_mid_body_is_499_and_aborts_the_upstream(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    ex, _ = start(shared, request(), up)
    ex.on_body(b"x" * 10)
    ex.client_lost()
    assert up.aborted
    assert ex.finished
    assert shared.stats.pairs["remote_write", "ingest"].codes == {499: 1}


def test_an_early_answer_stops_the_upload_and_closes(loop: asyncio.AbstractEventLoop) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    ex, port = start(shared, request(), up)
    ex.on_body(b"x" * 10)
    ex.response_head(400, b"Bad Request", b"", True, False, 0)
    ex.response_complete()
    port.flush()
    assert parse_statuses(bytes(port.sent)) == [400]
    assert b"Connection: close\r\n" in port.sent
    assert up.aborted
    assert ex.finished


def test_flow_control_follows_both_peers(loop: asyncio.AbstractEventLoop) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    ex, port = start(shared, request(), up)
    ex.upstream_paused(True)
    assert port.paused & PAUSE_UPSTREAM
    ex.upstream_paused(False)
    assert not port.paused
    ex.client_write_paused(True)
    assert not up.reading
    ex.client_write_paused(False)
    assert up.reading


def test_a_pipelined_request_waits_with_its_body_and_replays_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shared = make_shared(loop)
    up = FakeUpstream()
    port = FakePort()
    ex = Exchange(port, shared, parse_head(request(body=b"abc")))
    ex.on_body(b"abc")  # parsed while the previous exchange is in flight
    ex.on_request_complete()
    assert ex.state == State.WAITING
    assert up.data == b""
    cast(FakePools, shared.pools).pool.idle.append(up)
    ex.start()
    ex.flush_upstream()
    seen, _ = parse_request(bytes(up.data))
    assert seen.body == b"abc"
    assert ex.request_done


def test_a_refused_expect_continue_request_closes_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """No 100 Continue was sent, so the body may never come (RFC 9110
    §10.1.1): the answer says close instead of waiting to drop the body."""
    shared = make_shared(loop)
    raw = request(body=b"x" * 100, Expect="100-continue")
    ex, port = start(shared, raw.replace(f"Authorization: Bearer {TOKEN}\r\n".encode(), b""))
    port.flush()
    assert parse_statuses(bytes(port.sent)) == [401]
    assert b"\r\nConnection: close\r\n" in port.sent
    assert b"100 Continue" not in port.sent
    assert ex.finished
    assert port.deadline == Deadline.NONE  # no body-idle wait for a body that may never come


def test_an_admitted_request_trades_its_queue_deadline_for_the_upstream_one(
    loop: asyncio.AbstractEventLoop,
) -> None:
    extra = "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 1"
    shared = make_shared(loop, extra=extra)
    first, _ = start(shared, request(body=b""), FakeUpstream())
    first.on_request_complete()
    up = FakeUpstream()
    cast(FakePools, shared.pools).pool.idle.append(up)
    second, port = start(shared, request(body=b""))
    assert (second.state, port.deadline) == (State.QUEUED, Deadline.QUEUE)
    second.on_request_complete()  # complete while queued
    first.response_head(204, b"No Content", b"", True, False, 0)
    first.response_complete()  # frees the slot: the second is admitted and sent
    assert (second.state, port.deadline) == (State.SENT, Deadline.UPSTREAM)
    second.queue_timeout()  # a stale queue deadline firing now refuses nothing
    port.flush()
    assert port.sent == b""
    assert second.state == State.SENT
