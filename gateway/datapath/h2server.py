"""The public listener's HTTP/2 side: one protocol per client connection
that negotiated ``h2`` in TLS ALPN or opened with the HTTP/2 preface (h2c).

``h2`` (python-hyper, sans-IO) does the framing, HPACK and the flow-control
arithmetic; this module owns everything a hostile peer could use to make
the gateway spend memory or time, and turns each complete request head
into a stream: a ``GrpcExchange`` for a gRPC call (an ``otlp-grpc`` route's
method, or any ``application/grpc`` request), else an ``H2Relay`` for the
HTTP/1.1 routes and ``/health``:

- at most ``MAX_STREAMS`` concurrent streams (SETTINGS, enforced by h2);
- a header list of at most ``server.max_header_bytes`` decoded bytes (the
  HPACK bomb stops while decoding) and ``max_header_count`` fields; a
  header block of at most 64 CONTINUATION frames (h2's backlog);
- request bodies held only up to the windows we grant, which reopen only
  as the upstream takes the bytes: one connection holds at most
  ``_CONNECTION_WINDOW`` of request body however many streams it opens;
- control frames (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, empty DATA,
  unknown types) and client-side stream resets (the 2023 "rapid reset")
  are budgeted per second; past the budget: GOAWAY ENHANCE_YOUR_CALM and
  close (``gateway_limit_rejections_total{reason="h2_flood"}``);
- when the client stops reading, reading stops too (no ACK piles up) and
  no stream sends DATA until it reads again;
- every stream has a deadline (body idle, queue, upstream, write), and an
  idle connection a keep-alive one, checked by the process's sweeper.

Must not know: the HTTP/1.1 parser, routes' upstream addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from gateway.datapath.grpc_exchange import GrpcExchange
from gateway.datapath.h2relay import H2Relay
from gateway.datapath.ports import Deadline
from gateway.policy.errors import Kind
from gateway.policy.request import RequestHead

if TYPE_CHECKING:
    from gateway.datapath.h2stream import Flushable, H2Stream
    from gateway.datapath.shared import Shared

__all__ = ["MAX_STREAMS", "H2ServerConnection"]

Headers = list[tuple[bytes, bytes]]

MAX_STREAMS = 100
_STREAM_WINDOW = 256 * 1024
_CONNECTION_WINDOW = 1024 * 1024
# Per second, per connection.  A gRPC client sends a few PINGs and SETTINGS
# a minute and a WINDOW_UPDATE per response at most; it cancels calls
# rarely.  Real traffic stays far below; floods cross these within a second.
CONTROL_PER_SECOND = 1000
RESETS_PER_SECOND = 200
_ENHANCE_YOUR_CALM = 0xB
_SWEEP = int(Deadline.IDLE)
_CONTROL_EVENTS = (
    h2.events.PingReceived,
    h2.events.RemoteSettingsChanged,
    h2.events.PriorityUpdated,
    h2.events.UnknownFrameReceived,
    h2.events.WindowUpdated,
)


class H2ServerConnection:
    """One client connection speaking HTTP/2; the ``StreamPort`` of its
    streams and a ``Tracked`` connection of the process."""

    __slots__ = (
        "_control",
        "_goaway",
        "_resets",
        "_touched",
        "_window_start",
        "_write_paused",
        "cert_subject",
        "deadline",
        "deadline_kind",
        "h2",
        "idle_until",
        "peer",
        "peer_bytes",
        "scheme",
        "shared",
        "streams",
        "transport",
    )

    def __init__(
        self,
        shared: Shared,
        transport: asyncio.Transport,
        peer: str,
        cert_subject: str,
    ) -> None:
        self.shared = shared
        self.transport = transport
        self.peer = peer
        self.peer_bytes = peer.encode()
        self.cert_subject = cert_subject
        # This connection's own: a reload may have turned TLS on or off since.
        self.scheme = b"https" if transport.get_extra_info("ssl_object") is not None else b"http"
        # Inbound fields are validated (they are the client's); outbound ones
        # are ours or were validated on the way in, so h2 does not redo it.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, H2Stream] = {}
        self._touched: list[Flushable] = []
        self._write_paused = False
        self._goaway = False
        self._control = 0
        self._resets = 0
        self._window_start = 0.0
        # Checked on every sweep: the streams' own deadlines are inside.
        self.deadline = 0.0
        self.deadline_kind = _SWEEP
        self.idle_until = shared.loop.time() + shared.gen.header_timeout

    def start(self, first: bytes) -> None:
        """Take over the transport; ``first``: bytes already read (the preface)."""
        gen = self.shared.gen
        conn = self.h2
        limit = gen.max_header_bytes + gen.max_url_bytes
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limit,
            },
        )
        # Enforced from the first request, not from the SETTINGS ACK on.
        conn.decoder.max_header_list_size = limit
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.transport.set_protocol(self)  # type: ignore[arg-type]
        if first:
            self.data_received(first)
        else:
            self.flush()

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # handed over by h2switch, already connected

    def data_received(self, data: bytes) -> None:
        if self.deadline_kind == 0:
            return  # closed: whatever was still in flight is dropped
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 queued a GOAWAY with the error (a stream-closed error is
            # one too): send it and go.
            self.shared.stats.limit_rejection("h2_protocol")
            self._close()
            return
        try:
            for ev in events:
                self._event(ev)
        except _Closed:
            return
        except Exception as exc:
            self.shared.log.error("connection_fault", error=type(exc).__name__, exc_info=exc)
            self._close()
            return
        self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        shared = self.shared
        if self in shared.connections:
            shared.connections.remove(self)
            shared.stats.open_connections -= 1
        self.deadline_kind = 0
        streams, self.streams = self.streams, {}
        for ex in streams.values():
            ex.client_reset()
        self._flush_upstreams()

    def pause_writing(self) -> None:
        self._write_paused = True  # window() is 0 until the socket drains
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()
            for ex in list(self.streams.values()):
                ex.client_window()
            self.flush()

    # -- events -------------------------------------------------------------
    def _event(self, ev: h2.events.Event) -> None:  # noqa: PLR0912
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            ex = self.streams.get(sid)
            if not ev.data and ev.stream_ended is None:
                self._spend_control()
            if ex is None:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            else:
                ex.on_data(ev.data, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.RequestReceived):
            self._request(ev.stream_id, ev.headers, ev.stream_ended is not None)
        elif isinstance(ev, h2.events.StreamEnded):
            ex = self.streams.get(ev.stream_id)
            if ex is not None and not ex.request_done:
                ex.on_end()
        elif isinstance(ev, h2.events.StreamReset):
            ex = self.streams.pop(ev.stream_id, None)
            if ex is not None:
                self._spend_reset()
                ex.client_reset()
        elif isinstance(ev, _CONTROL_EVENTS):
            self._spend_control()
            if isinstance(ev, h2.events.WindowUpdated) and ev.stream_id:
                ex = self.streams.get(ev.stream_id)
                if ex is not None:
                    ex.client_window()
            elif not isinstance(ev, h2.events.PingReceived):
                for ex in list(self.streams.values()):
                    ex.client_window()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway = True
            if not self.streams:
                self._close()
        elif isinstance(ev, h2.events.TrailersReceived):
            # Request trailers: not part of gRPC; the request ends with them.
            ex = self.streams.get(ev.stream_id)
            if ex is not None and not ex.request_done:
                ex.on_end()

    def _request(self, sid: int, headers: Headers, ended: bool) -> None:
        shared = self.shared
        gen = shared.gen
        head = RequestHead(time.perf_counter())
        method = target = b""
        size = count = 0
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                continue
            size += len(name) + len(value)
            count += 1
            head.header(name, value)
        head.finish_h2(method, target, shared.next_request_id(), gen.clients.header, not ended)
        ex: H2Stream
        if gen.routes.get_grpc(head.path) is not None or _grpc(headers):
            ex = GrpcExchange(self, shared, sid, head)
        else:
            ex = H2Relay(self, shared, sid, head)
        self.streams[sid] = ex
        if size > gen.max_header_bytes or count > gen.max_header_count:
            ex.answer(Kind.HEADERS_TOO_LARGE)
            return
        if len(target) > gen.max_url_bytes:
            ex.answer(Kind.URL_TOO_LONG)
            return
        if head.malformed:
            ex.error = "bad_request"
            ex.answer(Kind.BAD_REQUEST)
            return
        ex.start()

    def _budget_window(self) -> None:
        now = self.shared.loop.time()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._control = 0
            self._resets = 0

    def _spend_control(self) -> None:
        self._budget_window()
        self._control += 1
        if self._control > CONTROL_PER_SECOND:
            self._calm()

    def _spend_reset(self) -> None:
        self._budget_window()
        self._resets += 1
        if self._resets > RESETS_PER_SECOND:
            self._calm()

    def _calm(self) -> None:
        if self._goaway:
            return
        self.shared.stats.limit_rejection("h2_flood")
        self._goaway = True
        # The ACKs h2 queued for the flood are not owed to it: GOAWAY alone.
        self.h2.clear_outbound_data_buffer()
        self.h2.close_connection(_ENHANCE_YOUR_CALM)
        self._close()
        raise _Closed

    # -- StreamPort: used by streams ------------------------------------------
    def send_headers(self, sid: int, headers: Headers, end: bool) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # reset meanwhile
            self.h2.send_headers(sid, headers, end_stream=end)

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        conn = self.h2
        try:
            size = conn.max_outbound_frame_size
            while len(data) > size:
                conn.send_data(sid, data[:size])
                data = data[size:]
            conn.send_data(sid, data, end_stream=end)
        except h2.exceptions.ProtocolError:
            pass

    def window(self, sid: int) -> int:
        if self._write_paused:
            return 0
        try:
            return self.h2.local_flow_control_window(sid)
        except h2.exceptions.ProtocolError:
            return 0

    def ack(self, sid: int, n: int) -> None:
        if n and self.deadline_kind:
            self.h2.acknowledge_received_data(n, sid)

    def reset(self, sid: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(sid, code)

    def touched(self, up: Flushable) -> None:
        if up not in self._touched:
            self._touched.append(up)

    def stream_finished(self, sid: int) -> None:
        self.streams.pop(sid, None)
        if not self.streams:
            now = self.shared.loop.time()
            self.idle_until = now + self.shared.gen.keepalive_timeout
            if self._goaway or self.shared.draining:
                self.close_now()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self._flush_upstreams()

    def _flush_upstreams(self) -> None:
        touched = self._touched
        if touched:
            self._touched = []
            for up in touched:
                up.flush()

    # -- Tracked: used by the process (sweeper, drain) ---------------------------------
    def on_deadline(self, now: float) -> None:
        self.deadline = now  # due again on the next sweep
        streams = self.streams
        if not streams:
            if now >= self.idle_until:
                self.close_now()
            return
        try:
            for ex in list(streams.values()):
                if ex.dkind and now >= ex.deadline:
                    ex.on_deadline()
        except _Closed:
            return
        self.flush()

    def busy(self) -> bool:
        return bool(self.streams)

    def close_now(self) -> None:
        if not self.transport.is_closing():
            if not self._goaway:
                self._goaway = True
                self.h2.close_connection()
            self._close()

    def abort(self) -> None:
        self.transport.abort()

    def _close(self) -> None:
        self.deadline_kind = 0
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self._flush_upstreams()
        self.transport.close()


def _grpc(headers: Headers) -> bool:
    """A gRPC request for a method no route has: answered UNIMPLEMENTED in
    gRPC's terms rather than as an HTTP 404 its client cannot read."""
    for name, value in headers:
        if name == b"content-type":
            return value[:16] == b"application/grpc"
    return False


class _Closed(Exception):
    """Raised out of event handling once the connection has been closed."""
