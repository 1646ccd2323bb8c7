"""Upstream side of the data path: keep-alive connections and their pool.

``UpstreamConnection`` is an asyncio protocol that parses one HTTP/1.1
response at a time with llhttp (httptools) and hands the pieces to the
exchange that owns it; it never decides a status code.  ``Pool`` keeps idle
connections per upstream address (LIFO, so the warmest socket is reused)
and closes them before the upstream's own idle timeout would.

Must not know: routes, credentials, the client side, metrics.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

import httptools

from gateway.datapath.writes import write_coalesced
from gateway.policy.headers import RESPONSE_DROP, strip_listed

if TYPE_CHECKING:
    from gateway.datapath.ports import ResponseSink, UpstreamPort
    from gateway.policy.routing import Upstream

__all__ = ["Pool", "Pools", "UpstreamConnection"]


# Response header names as sent → role; cached per spelling (bounded).
_FORWARD: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CONNECTION: Final = 3
_DROP: Final = 4
_RESPONSE_KNOWN: Final[dict[bytes, int]] = {}
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
# "Connection: keep-alive" / "close" name no other field: nothing to strip.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})
_KNOWN_MAX: Final = 1024


def _classify_response(name: bytes) -> int:
    lname = name.lower()
    if lname == b"content-length":
        action = _LENGTH
    elif lname == b"transfer-encoding":
        action = _CHUNKED
    elif lname == b"connection":
        action = _CONNECTION
    elif lname in RESPONSE_DROP:
        action = _DROP
    else:
        action = _FORWARD
    if len(_RESPONSE_KNOWN) < _KNOWN_MAX:
        _RESPONSE_KNOWN[name] = action
    return action


def _not_connected(pieces: list[bytes]) -> None:
    raise RuntimeError("upstream connection not made yet")


# No asyncio.Protocol base, as ClientConnection (connection.py): uvloop only
# calls the methods, and mypyc makes the class native only without it.
class UpstreamConnection:
    """One keep-alive connection to an upstream; the ``UpstreamPort`` of the
    exchange that holds it (an ``asyncio.Protocol`` by shape)."""

    __slots__ = (
        "_chunked",
        "_headers",
        "_length",
        "_status",
        "closed",
        "deadline",
        "parser",
        "pool",
        "send",
        "sink",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.send: Callable[[list[bytes]], None] = _not_connected
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.closed = False
        self.deadline = 0.0  # loop time: idle expiry in the pool, read timeout in use
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._chunked = False
        self._length: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # UpstreamPort.send, bound once: a partial is called from C, so the
        # exchange's flush costs one Python call (write_coalesced), not two.
        self.send = partial(write_coalesced, self.transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes while idle violate HTTP/1.1; the socket cannot be trusted.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.sink is not None:
                self.sink.upstream_failed("protocol")
            self.abort()
        except httptools.HttpParserUpgrade:
            # A 101 we never asked for.
            if self.sink is not None:
                self.sink.upstream_failed("protocol")
            self.abort()
        sink.flush_client()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if self._status and self._length is None and not self._chunked and exc is None:
            # Close-delimited response body (RFC 9112 §6.3 rule 8): a clean
            # EOF ends it.  A reset (exc set) may have cut it short: failed.
            sink.response_complete()
        else:
            sink.upstream_failed("reset")
        sink.flush_client()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(False)

    # -- llhttp callbacks ------------------------------------------------------
    # No on_message_begin / on_status callbacks (each costs a Python call
    # per response): state is reset when a response ends, and the reason
    # phrase, which clients ignore (RFC 9112 §4), comes from our table.
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []
            return  # interim response (100 Continue, 103): not forwarded
        self._status = status
        chunked = False
        length: int | None = None
        listed: list[bytes] | None = None
        block: list[bytes] = []
        known = _RESPONSE_KNOWN
        for name, value in self._headers:
            action = known.get(name)
            if action is None:
                action = _classify_response(name)
            if action == _FORWARD:
                block += (name, b": ", value, b"\r\n")
            elif action == _LENGTH:
                length = int(value)  # llhttp has validated digits and uniqueness
            elif action == _CHUNKED:
                chunked = True
            elif action == _CONNECTION:
                listed = [*(listed or []), value]
        if listed is not None and not all(v.lower() in _PLAIN_CONNECTION for v in listed):
            # Rare: Connection names an end-to-end field (RFC 9110 §7.6.1).
            block = strip_listed(block, listed)
        if status in (204, 304):
            length = 0
        self._chunked = chunked
        self._length = length
        if self.sink is not None:
            self.sink.response_head(
                status,
                _REASONS.get(status, b""),
                b"".join(block),
                self.parser.should_keep_alive(),
                chunked,
                length,
            )

    def on_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(data)

    def on_message_complete(self) -> None:
        if not self._status:
            return  # end of an interim response
        sink, self.sink = self.sink, None
        self._status = 0
        self._headers = []
        if sink is not None:
            sink.response_complete()

    # -- UpstreamPort: used by the exchange ---------------------------------------
    def attach(self, sink: ResponseSink) -> None:
        self.sink = sink

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return not self.closed and self.sink is None and self.parser.should_keep_alive()


class Pool:
    """Idle keep-alive connections to one upstream address."""

    __slots__ = ("_idle", "_ssl", "loop", "max_idle", "upstream")

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: Upstream, max_idle: int) -> None:
        self.loop = loop
        self.upstream = upstream
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )

    def acquire(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        up = self.upstream
        async with asyncio.timeout(timeout):
            _, protocol = await self.loop.create_connection(
                lambda: cast(asyncio.Protocol, UpstreamConnection(self)),
                up.host,
                up.port,
                ssl=self._ssl,
                server_hostname=up.host if self._ssl else None,
            )
        return cast(UpstreamConnection, protocol)

    def release(self, conn: UpstreamPort, idle_until: float) -> None:
        assert isinstance(conn, UpstreamConnection)  # what acquire() / connect() gave out
        if conn.reusable() and len(self._idle) < self.max_idle:
            conn.deadline = idle_until
            self._idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def expire(self, now: float) -> None:
        keep = []
        for conn in self._idle:
            if conn.deadline <= now:
                conn.abort()
            else:
                keep.append(conn)
        self._idle[:] = keep

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


class Pools:
    """All pools of a process, keyed by (scheme, host, port); outlive reloads."""

    __slots__ = ("_pools", "loop", "max_idle")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle: int) -> None:
        self.loop = loop
        self.max_idle = max_idle
        self._pools: dict[tuple[str, str, int], Pool] = {}

    def get(self, upstream: Upstream) -> Pool:
        pool = self._pools.get(upstream.key)
        if pool is None:
            pool = self._pools[upstream.key] = Pool(self.loop, upstream, self.max_idle)
        return pool

    def expire(self, now: float) -> None:
        for pool in self._pools.values():
            pool.expire(now)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
