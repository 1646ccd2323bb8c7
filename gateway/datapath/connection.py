"""The public listener: one asyncio protocol per client TCP connection.

Parses HTTP/1.1 with llhttp (httptools: strict about CL+TE, duplicate
Content-Length, bad chunk sizes, obs-fold and bare LF), enforces the head
limits, hands each request to an ``Exchange`` in order (pipelined requests
wait, with reading paused), coalesces writes into one syscall per event,
and owns the connection's single deadline (head, body idle, upstream wait,
keep-alive idle, linger) which ``Listener.sweep`` checks a few times a
second instead of arming a timer per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from gateway.datapath.accounting import record_rejected
from gateway.datapath.exchange import Exchange
from gateway.datapath.h2switch import alpn_h2, h2c, hand_over
from gateway.datapath.ports import (
    PAUSE_CONNECT,
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM,
    Deadline,
)
from gateway.datapath.writes import write_coalesced
from gateway.policy.clients import cert_subject
from gateway.policy.errors import Kind, Protocol
from gateway.policy.request import RequestHead

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared

__all__ = ["ClientConnection"]

_perf = time.perf_counter

# The deadline kinds as plain ints: CPython 3.11 specialises comparisons of
# exact ints only, and these are compared on every read.
_NONE, _IDLE, _HEAD, _BODY, _UPSTREAM, _WRITE, _LINGER, _QUEUE = map(int, Deadline)
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 25\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b"too many open connections"
)
# After answering with "Connection: close" while the client may still be
# sending, keep reading (and dropping) for this long so the client reads our
# answer instead of a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024 * 1024


class _Reject(Exception):
    """Raised from a parser callback to stop parsing with an answer."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind


class _Stop(Exception):
    """Raised from a parser callback to stop parsing silently (lingering)."""


# No asyncio.Protocol base: uvloop only calls the methods, and a class with
# a Python base cannot be a mypyc native class (attributes in a dict, not
# slots; methods called through the generic path).
class ClientConnection:
    """One client TCP connection; the ``ClientPort`` of its exchanges and a
    ``Tracked`` connection of the process (an ``asyncio.Protocol`` by shape)."""

    __slots__ = (
        "_advancing",
        "_head",
        "_head_bytes",
        "_header_count",
        "_in_head",
        "_linger_bytes",
        "_lingering",
        "_paused",
        "_pending",
        "_raw_head",
        "_url",
        "_write_paused",
        "active",
        "cert_subject",
        "deadline",
        "deadline_kind",
        "out",
        "parser",
        "peer",
        "peer_bytes",
        "scheme",
        "shared",
        "transport",
    )

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.peer_bytes = b""
        self.cert_subject = ""
        self.scheme = b"https" if shared.tls else b"http"
        self.out: list[bytes] = []
        self.active: Exchange | None = None
        self._pending: deque[Exchange] = deque()
        self._paused = 0
        self._write_paused = False
        self._lingering = False
        self._advancing = False
        self._linger_bytes = 0
        self._url = b""
        self._head = RequestHead(0.0)
        self._header_count = 0
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = False
        self.deadline = 0.0
        self.deadline_kind = _NONE  # a Deadline value

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.peer_bytes = self.peer.encode()
        shared = self.shared
        if len(shared.connections) >= shared.gen.max_connections:
            shared.stats.limit_rejection("connections")
            self._lingering = True
            self.transport.write(_OVERLOADED)
            self.transport.close()
            return
        shared.connections.add(self)
        shared.stats.open_connections += 1
        if shared.tls:
            cert = transport.get_extra_info("peercert")
            if cert:
                self.cert_subject = cert_subject(cert)
            if alpn_h2(transport):  # HTTP/2 from here on (h2switch.py)
                hand_over(shared, self, self.transport, b"")
                return
        self.set_deadline(_IDLE, shared.gen.header_timeout)

    # One branch per state of the connection, on every read: a helper call
    # per read would cost more than the branches it hides.
    def data_received(self, data: bytes) -> None:  # noqa: PLR0912
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self.close_now()
            return
        if self._in_head:
            # llhttp buffers a header line until it ends: bound the raw bytes
            # of a head that spans reads (one read may also carry some body).
            self._raw_head += len(data)
            if self._raw_head > self.shared.gen.max_raw_head:
                self._reject(Kind.HEADERS_TOO_LARGE)
                self.flush()
                return
        elif self.deadline_kind == _BODY:
            gen = self.shared.gen
            now = self.shared.loop.time()
            self.deadline = now + gen.body_idle_timeout
            active = self.active
            if gen.min_body_rate and active is not None and active.too_slow(now, len(data)):
                active.client_timeout()
                self.flush()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.kind)
            elif not isinstance(cause, _Stop):
                self._fault(cause or exc)
        except httptools.HttpParserUpgrade:
            # The request before the upgrade is complete and dispatched; what
            # follows is another protocol, which we never speak.
            self._after_current_close()
        except httptools.HttpParserError:
            # Or the HTTP/2 preface where the first request would start (h2c).
            if self._url != b"*" or self.active is not None or not h2c(self.shared, self, data):
                self._reject(Kind.BAD_REQUEST)
        except Exception as exc:  # noqa: BLE001  (never let a bug kill the loop's callback)
            self._fault(exc)
        self.flush()
        active = self.active
        if active is not None and active.up_buf:
            active.flush_upstream()

    def eof_received(self) -> bool:
        active = self.active
        if active is not None and active.request_done and not active.finished:
            # Half-close after a complete request: answer, then close.
            active.close = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.shared.connections:
            self.shared.connections.remove(self)
            self.shared.stats.open_connections -= 1
        self.deadline_kind = _NONE
        active, self.active = self.active, None
        self._pending.clear()
        if active is not None:
            active.client_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.active is not None:
            self.active.client_write_paused(True)
        self.set_deadline(_WRITE, self.shared.gen.body_idle_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.active is not None:
            self.active.client_write_paused(False)

    # -- llhttp callbacks ------------------------------------------------------------
    # No on_message_begin: every request starts with its target, so the
    # first on_url of a message begins it (one Python callback fewer).
    def on_url(self, part: bytes) -> None:
        if self._in_head:
            url = self._url = self._url + part
            if len(url) > self.shared.gen.max_url_bytes:
                raise _Reject(Kind.URL_TOO_LONG)
            return
        if self._lingering:
            raise _Stop
        if self.active is not None:
            self.pause(PAUSE_PIPELINE)
        elif self.deadline_kind == _IDLE:
            self.set_deadline(_HEAD, self.shared.gen.header_timeout)
        self._url = part
        self._head = RequestHead(_perf())
        self._header_count = 0
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = True
        if len(part) > self.shared.gen.max_url_bytes:
            raise _Reject(Kind.URL_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # after the head: chunked trailer fields, not forwarded
            self._head_bytes += len(name) + len(value)
            self._header_count += 1
            if self._head_bytes > self.shared.gen.max_header_bytes:
                raise _Reject(Kind.HEADERS_TOO_LARGE)
            self._head.header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        shared = self.shared
        if self._header_count > shared.gen.max_header_count:
            raise _Reject(Kind.HEADERS_TOO_LARGE)
        head = self._head
        head.finish(self.parser, self._url, shared.next_request_id(), shared.gen.clients.header)
        ex = Exchange(self, shared, head)
        if self.active is None:
            self.active = ex
            self.deadline_kind = _NONE
            ex.start()
        else:
            self._pending.append(ex)

    def on_body(self, data: bytes) -> None:
        if self._lingering:
            raise _Stop
        (self._pending[-1] if self._pending else self.active).on_body(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._lingering:
            raise _Stop
        target = self._pending[-1] if self._pending else self.active
        if target is not None:
            target.on_request_complete()

    # -- ClientPort: used by exchanges -------------------------------------------------
    def flush(self) -> None:
        out = self.out
        if out:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                write_coalesced(transport, out)
            self.out = []

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reasons: int) -> None:
        if self._paused and not (self._paused & ~reasons):
            self._paused = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        else:
            self._paused &= ~reasons

    def set_deadline(self, kind: int, timeout: float) -> None:
        if kind == _UPSTREAM and self._write_paused:
            return  # the client is not reading: the write deadline stays in force
        self.deadline_kind = kind
        self.deadline = self.shared.loop.time() + timeout

    def clear_deadline(self) -> None:
        self.deadline_kind = _NONE

    def close_now(self) -> None:
        """Flush what is queued and close (no more requests on this connection)."""
        self._lingering = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def exchange_finished(self, ex: object) -> None:
        active = self.active
        if active is None or ex is not active:
            return
        self.active = None
        if active.close:
            self._close_after(active)
            return
        if self._advancing:
            return  # the loop below, further up the stack, starts the next one
        # Pipelined requests answered synchronously finish inside start():
        # iterate instead of recursing, however many were queued.
        self._advancing = True
        try:
            while self.active is None and self._pending:
                nxt = self._pending.popleft()
                self.active = nxt
                self.deadline_kind = _NONE
                nxt.start()
                # Started outside the client's data_received (often from the
                # upstream's, as the previous answer ended): send its head now.
                nxt.flush_upstream()
        finally:
            self._advancing = False
        if self.active is None and not self._lingering:
            self.resume(PAUSE_PIPELINE)
            self.set_deadline(_IDLE, self.shared.gen.keepalive_timeout)

    # -- Tracked: used by the process (sweeper, drain) ---------------------------------
    def busy(self) -> bool:
        return self.active is not None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------
    def _close_after(self, ex: Exchange) -> None:
        self._pending.clear()
        self._lingering = True
        self.flush()
        transport = self.transport
        if transport is None:
            return
        if ex.request_done:
            transport.close()
            return
        # The client may still be sending: signal the end, keep reading and
        # dropping for a while, then close, so it sees our answer, not a reset.
        self.resume(PAUSE_PIPELINE | PAUSE_CONNECT | PAUSE_UPSTREAM)
        if transport.can_write_eof():
            transport.write_eof()
        self.set_deadline(_LINGER, LINGER_SECONDS)

    def _after_current_close(self) -> None:
        """Stop parsing; close once the current exchange has answered."""
        active = self.active
        if active is None:
            self.close_now()
            return
        active.close = True
        self._lingering = True

    def _reject(self, kind: Kind) -> None:
        """A request that cannot be parsed or exceeds head limits."""
        if self._lingering:
            return  # already answered and closing: what follows is dropped
        active = self.active
        if active is not None and not self._in_head and not self._pending:
            if active.request_done:
                # Bytes after a request that ended the connection ("close",
                # HTTP/1.0): answer that request, ignore the rest (RFC 9112 §9.6).
                active.close = True
                self._lingering = True
            else:
                # The broken part belongs to the body of the active exchange.
                active.bad_body()
            return
        self._pending.clear()
        if self.active is not None:
            # Answer the request in progress first; close after it.
            self._after_current_close()
            return
        errors = self.shared.gen.errors
        status, data, _ = errors.render(kind, Protocol.PLAIN, False, self.shared.date_line, True)
        self.out.append(data)
        self._lingering = True
        self.flush()
        record_rejected(self.shared, status, kind.name.lower(), self.peer, self._head.t0)
        if self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.set_deadline(_LINGER, LINGER_SECONDS)

    def _fault(self, exc: BaseException) -> None:
        self.shared.log.error("connection_fault", error=type(exc).__name__, exc_info=exc)
        active = self.active
        if active is not None and not active.finished:
            active.fault(exc)
        else:
            self.close_now()

    def on_deadline(self, now: float) -> None:
        """Called by the sweeper when ``now >= self.deadline``."""
        kind = self.deadline_kind
        self.deadline_kind = _NONE
        active = self.active
        if kind in (_IDLE, _LINGER, _WRITE) or (kind == _HEAD and active is None):
            if kind == _WRITE and active is not None:
                active.error = "client_write_timeout"
                active.client_lost()
            if self.transport is not None:
                self.transport.abort() if kind == _WRITE else self.transport.close()
            return
        if active is None:
            return
        if kind == _BODY:
            active.client_timeout()
        elif kind == _QUEUE:
            active.queue_timeout()
        elif kind == _UPSTREAM:
            active.upstream_timeout()
        self.flush()
