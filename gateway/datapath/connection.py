"""The public listener: one asyncio protocol per client TCP connection.

Parses HTTP/1.1 with llhttp (httptools: strict about CL+TE, duplicate
Content-Length, bad chunk sizes, obs-fold and bare LF), enforces the head
limits (trailers count against them too) and the header timeout from a
head's first byte, and hands each request to an ``Exchange``.  What it
reads and when, the order of exchanges and the deadline are
``client_state.py``'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final, cast

import httptools

from gateway.datapath.accounting import record_rejected
from gateway.datapath.client_state import LINGER_SECONDS, ClientState
from gateway.datapath.exchange import Exchange
from gateway.datapath.h2switch import alpn_h2, h2c, hand_over
from gateway.datapath.handshake import start_tls
from gateway.datapath.ports import PAUSE_PIPELINE, Deadline
from gateway.policy.clients import cert_subject
from gateway.policy.errors import Kind, Protocol
from gateway.policy.request import RequestHead

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared

__all__ = ["ClientConnection"]

_perf: Final = time.perf_counter

# The deadline kinds as plain ints (see client_state.py).
_NONE: Final = int(Deadline.NONE)
_IDLE: Final = int(Deadline.IDLE)
_HEAD: Final = int(Deadline.HEAD)
_BODY: Final = int(Deadline.BODY)
_UPSTREAM: Final = int(Deadline.UPSTREAM)
_WRITE: Final = int(Deadline.WRITE)
_LINGER: Final = int(Deadline.LINGER)
_QUEUE: Final = int(Deadline.QUEUE)
_OVERLOADED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 25\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b"too many open connections"
)
# Bytes read and dropped while lingering, at most.
LINGER_BYTES: Final = 64 * 1024 * 1024
# Requests taken from one read.  llhttp parses a whole read (256 KiB in
# uvloop) and cannot stop part-way without losing the rest, so a client
# pipelining tiny requests would get thousands answered (or queued) before
# reading can pause; beyond this many, the ones parsed are answered and the
# connection closes (no sender we serve pipelines at all).
MAX_REQUESTS_PER_READ: Final = 256


class _Reject(Exception):
    """Raised from a parser callback to stop parsing with an answer."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind


class _Stop(Exception):
    """Raised from a parser callback to stop parsing silently (lingering)."""


class ClientConnection(ClientState):
    """One client TCP connection; the ``ClientPort`` of its exchanges and a
    ``Tracked`` connection of the process (an ``asyncio.Protocol`` by shape)."""

    __slots__ = (
        "_between",
        "_burst",
        "_head",
        "_head_bytes",
        "_header_count",
        "_in_head",
        "_linger_bytes",
        "_raw_head",
        "_url",
        "parser",
    )

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.parser = httptools.HttpRequestParser(self)
        self._linger_bytes = 0
        self._url = b""
        self._head = RequestHead(0.0)
        self._header_count = 0
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = False
        self._between = True  # between two messages: the next byte starts a head
        self._burst = 0  # requests parsed from the current read

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.peer_bytes = self.peer.encode()
        shared = self.shared
        tls = shared.tls  # the context in force now serves this whole connection
        if len(shared.connections) >= shared.gen.max_connections:
            shared.stats.limit_rejection("connections")
            self._lingering = True
            if tls is None:  # over TLS, an answer would cost the handshake it refuses
                self.transport.write(_OVERLOADED)
            self.transport.close()
            return
        # Counted from accept, TLS or not: a handshake holds a connection too.
        shared.connections.add(self)
        shared.stats.open_connections += 1
        self.set_deadline(_IDLE, shared.gen.header_timeout)
        if tls is not None:
            self.scheme = b"https"
            start_tls(self, self.transport, tls, shared.gen.header_timeout, shared.loop)
        else:
            self.scheme = b"http"

    def tls_established(self, transport: asyncio.Transport) -> None:
        """The handshake finished: from here on, bytes pass through TLS."""
        self.transport = transport
        cert = transport.get_extra_info("peercert")
        if cert:
            self.cert_subject = cert_subject(cert)
        if alpn_h2(transport):  # HTTP/2 from here on (h2switch.py)
            hand_over(self.shared, self, transport, b"")
            return
        self.set_deadline(_IDLE, self.shared.gen.header_timeout)

    # One branch per state of the connection, on every read: a helper call
    # per read would cost more than the branches it hides.
    def data_received(self, data: bytes) -> None:  # noqa: PLR0912
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self.close_now()
            return
        self._burst = 0
        if self._in_head:
            # llhttp buffers a header line until it ends: bound the raw bytes
            # of a head that spans reads.  Checked after parsing: the rest of
            # this read may be body (on_headers_complete starts the count
            # again), and after a pause a TLS read can be larger than the limit.
            self._raw_head += len(data)
        elif self._between:
            if not self._head_by:
                # The first byte of a head: it must be complete within
                # header_timeout of now, however slowly the rest comes.
                self._head_by = self.shared.loop.time() + self.shared.gen.header_timeout
                if self.deadline_kind == _IDLE:
                    self.deadline_kind = _HEAD
                    self.deadline = self._head_by
        else:
            # Body bytes.  What carries none (a chunked trailer, chunk
            # extensions) counts against the head limits: llhttp keeps a
            # trailer line until it ends, as it does a header line.  Checked
            # after parsing too: a body byte in this read (on_body) starts the
            # count again, whatever the size of the read.
            gen = self.shared.gen
            self._raw_head += len(data)
            if self.deadline_kind == _BODY:
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
        else:
            if self._raw_head > self.shared.gen.max_raw_head:
                self._raw_head = 0
                self._reject(Kind.HEADERS_TOO_LARGE)
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
        self._between = False
        if not self._head_by:  # it began in this read, after the previous message
            self._head_by = self.shared.loop.time() + self.shared.gen.header_timeout
        if self.deadline_kind == _IDLE:
            self.deadline_kind = _HEAD
            self.deadline = self._head_by
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
        self._head_by = 0.0
        self._raw_head = 0
        shared = self.shared
        if self._header_count > shared.gen.max_header_count:
            raise _Reject(Kind.HEADERS_TOO_LARGE)
        self._burst += 1
        if self._burst > MAX_REQUESTS_PER_READ:
            self._after_current_close()
            raise _Stop
        head = self._head
        head.finish(self.parser, self._url, shared.next_request_id(), shared.gen.clients.header)
        ex = Exchange(self, shared, head)
        if self.active is None and not self._write_paused:
            self.active = ex
            self.deadline_kind = _NONE
            ex.start()
        else:
            # Pipelined (or the client is not reading): it waits, with
            # reading paused, for the exchanges before it.
            self._pending.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, data: bytes) -> None:
        if self._lingering:
            raise _Stop
        self._raw_head = 0
        (self._pending[-1] if self._pending else self.active).on_body(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._lingering:
            raise _Stop
        self._between = True
        target = self._pending[-1] if self._pending else self.active
        if target is not None:
            target.on_request_complete()

    # -- internals -------------------------------------------------------------------------
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
                # The broken part belongs to the body (or trailer) of the
                # active exchange.
                active.bad_body(kind)
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
