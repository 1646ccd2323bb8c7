"""Upstream side of HTTP/2: multiplexed connections to a gRPC upstream.

``H2Upstream`` is one HTTP/2 client connection (h2c, or h2 over TLS) that
carries many streams at once; ``H2Pool`` keeps a few per upstream address
and opens another only when every open one is at the upstream's
``MAX_CONCURRENT_STREAMS``.  Each stream belongs to one ``StreamSink`` (a
gRPC exchange), which gets the response's headers, DATA, trailers and end,
and is told when the upstream's windows open.  Nothing here decides a
status: failures are reported as words ("connect", "reset", "protocol").

Writes are coalesced: the methods only feed h2's buffer and mark the
connection dirty; whoever handled the event calls ``flush`` once.

Must not know: routes, credentials, the client side, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple

if TYPE_CHECKING:
    from gateway.policy.routing import Upstream

__all__ = ["H2Pool", "H2Pools", "H2Upstream", "StreamSink"]

Headers = list[tuple[bytes, bytes]]

# Per-stream receive window for responses (gRPC answers are small) and the
# connection's; both bound what one upstream can make us hold.
_STREAM_WINDOW = 256 * 1024
_CONNECTION_WINDOW = 1024 * 1024
# Connections per upstream address: each carries up to the upstream's
# MAX_CONCURRENT_STREAMS (100 for grpc-go and grpcio) streams.
MAX_CONNECTIONS = 8
_CANCEL = 8  # h2 ErrorCodes.CANCEL
_UNINDEXED = NeverIndexedHeaderTuple


class StreamSink(Protocol):
    """What an upstream stream reports to its exchange."""

    def up_headers(self, headers: Headers, end: bool) -> None: ...
    def up_data(self, data: bytes, flow: int, end: bool) -> None: ...
    def up_trailers(self, headers: Headers) -> None: ...
    def up_window(self) -> None: ...
    def up_failed(self, kind: str) -> None: ...
    def flush_client(self) -> None: ...


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an upstream; streams keyed by id."""

    __slots__ = ("closed", "h2", "idle_until", "pool", "sinks", "transport")

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # Outbound fields were validated when the client sent them.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.sinks: dict[int, StreamSink] = {}
        self.closed = False
        self.idle_until = 0.0

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.flush()

    # One branch per event type, in the order they are most frequent.
    def data_received(self, data: bytes) -> None:  # noqa: PLR0912
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._fail_all("protocol")
            self.abort()
            return
        sinks = self.sinks
        touched: list[StreamSink] = []
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            sink = sinks.get(sid) if sid else None
            if sink is not None and sink not in touched:
                touched.append(sink)
            if isinstance(ev, h2.events.DataReceived):
                if sink is None:
                    # A stream we gave up on: keep the connection's window open.
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                else:
                    sink.up_data(ev.data, ev.flow_controlled_length, ev.stream_ended is not None)
            elif isinstance(ev, h2.events.ResponseReceived):
                if sink is not None:
                    sink.up_headers(ev.headers, ev.stream_ended is not None)
            elif isinstance(ev, h2.events.TrailersReceived):
                if sink is not None:
                    sink.up_trailers(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                sinks.pop(sid, None)
            elif isinstance(ev, h2.events.StreamReset):
                sinks.pop(sid, None)
                if sink is not None:
                    sink.up_failed("reset")
            elif isinstance(ev, h2.events.WindowUpdated):
                targets = list(sinks.values()) if sid == 0 else [sink] if sink else []
                for s in targets:
                    s.up_window()
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                for s in list(sinks.values()):
                    s.up_window()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                # GOAWAY: streams above last_stream_id were never processed.
                self.closed = True
                last = ev.last_stream_id or 0
                for s_id in [s for s in sinks if s > last]:
                    lost = sinks.pop(s_id)
                    lost.up_failed("reset")
                    touched.append(lost)
        self.flush()
        for sink in touched:
            sink.flush_client()
        if self.closed and not self.sinks:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._fail_all("reset")

    def eof_received(self) -> bool:
        return False

    # -- used by exchanges --------------------------------------------------
    def capacity(self) -> bool:
        if self.closed:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return self.h2.open_outbound_streams < limit

    def open(self, sink: StreamSink, headers: Headers, end: bool) -> int:
        sid = self.h2.get_next_available_stream_id()
        # x-request-id differs on every call: entered into HPACK's dynamic
        # table it would only evict the fields that repeat, and lengthen the
        # encoder's linear search of that table for every field (3-4 % of
        # the gateway's instructions per call, bench/README.md).
        headers = [_UNINDEXED(n, v) if n == b"x-request-id" else (n, v) for n, v in headers]
        self.h2.send_headers(sid, headers, end_stream=end)
        self.sinks[sid] = sink
        return sid

    def window(self, sid: int) -> int:
        try:
            return self.h2.local_flow_control_window(sid)
        except h2.exceptions.StreamClosedError:
            return 0

    def send(self, sid: int, data: bytes, end: bool) -> None:
        """``data`` must fit ``window(sid)``; sent in frames of the peer's size."""
        conn = self.h2
        size = conn.max_outbound_frame_size
        view = memoryview(data)
        while len(view) > size:
            conn.send_data(sid, view[:size].tobytes())
            view = view[size:]
        conn.send_data(sid, view.tobytes(), end_stream=end)

    def end(self, sid: int) -> None:
        self.h2.end_stream(sid)

    def ack(self, sid: int, n: int) -> None:
        """The client consumed ``n`` bytes of this stream's response."""
        # A closed stream still returns its bytes to the connection's window.
        self.h2.acknowledge_received_data(n, sid)

    def cancel(self, sid: int) -> None:
        """The upstream must never take this request as complete."""
        self.sinks.pop(sid, None)
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.reset_stream(sid, _CANCEL)

    def release(self, sid: int) -> None:
        self.sinks.pop(sid, None)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- internals ------------------------------------------------------------
    def _fail_all(self, kind: str) -> None:
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.up_failed(kind)
            sink.flush_client()


def _retrieve(task: asyncio.Task[H2Upstream]) -> None:
    # Every waiter may have timed out: the dial's failure is theirs, not a
    # "never retrieved" warning.
    if not task.cancelled():
        task.exception()


class H2Pool:
    """The HTTP/2 connections to one upstream address."""

    __slots__ = ("_connecting", "_ssl", "conns", "loop", "upstream")

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: Upstream) -> None:
        self.loop = loop
        self.upstream = upstream
        self.conns: list[H2Upstream] = []
        self._connecting: asyncio.Task[H2Upstream] | None = None
        ctx = None
        if upstream.scheme == "https":
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["h2"])
        self._ssl = ctx

    def acquire(self) -> H2Upstream | None:
        """An open connection with room for one more stream, if any."""
        for conn in self.conns:
            if conn.capacity():
                return conn
        return None

    async def connect(self, timeout: float) -> H2Upstream:
        """Wait for a connection with room; concurrent callers share one dial."""
        async with asyncio.timeout(timeout):
            while True:
                conn = self.acquire()
                if conn is not None:
                    return conn
                task = self._connecting
                if task is None:
                    task = self._connecting = self.loop.create_task(self._dial(timeout))
                    task.add_done_callback(_retrieve)
                await asyncio.shield(task)

    async def _dial(self, timeout: float) -> H2Upstream:
        up = self.upstream
        try:
            if len(self.conns) >= MAX_CONNECTIONS:
                raise ConnectionRefusedError("upstream connection limit")
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: H2Upstream(self),
                    up.host,
                    up.port,
                    ssl=self._ssl,
                    server_hostname=up.host if self._ssl else None,
                )
            self.conns.append(conn)
            return conn
        finally:
            self._connecting = None

    def forget(self, conn: H2Upstream) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    def expire(self, now: float, idle_seconds: float) -> None:
        for conn in list(self.conns):
            if conn.sinks:
                conn.idle_until = 0.0
            elif conn.idle_until == 0.0:
                conn.idle_until = now + idle_seconds
            elif conn.idle_until <= now:
                self.forget(conn)
                conn.abort()

    def close(self) -> None:
        for conn in self.conns:
            conn.abort()
        self.conns.clear()


class H2Pools:
    """All HTTP/2 pools of a process, keyed by (scheme, host, port)."""

    __slots__ = ("_pools", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pools: dict[tuple[str, str, int], H2Pool] = {}

    def get(self, upstream: Upstream) -> H2Pool:
        pool = self._pools.get(upstream.key)
        if pool is None:
            pool = self._pools[upstream.key] = H2Pool(self.loop, upstream)
        return pool

    def expire(self, now: float, idle_seconds: float) -> None:
        for pool in self._pools.values():
            pool.expire(now, idle_seconds)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
