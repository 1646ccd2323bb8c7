"""One gRPC call: an HTTP/2 stream's way from the client to its answer.

The same policy as HTTP/1.1 (``policy.decide`` on a ``RequestHead`` built
from the HTTP/2 fields, the same admission slots and rate buckets, the same
accounting), carried out on streams: a refusal is a trailers-only answer
(``grpc_stream.py``); a proxied call opens a stream on a pooled
``H2Upstream`` and relays both ways with flow control.  Each direction
forwards what fits the receiver's window and returns to the sender's window
only what was forwarded, so neither side can make the gateway hold more
than one window per stream; the body cap is checked as DATA arrives.
Headers and trailers pass through as the upstream sent them; the request
goes to the credential's target (its own backend and pinned fields, if its
forward table sets them).

Drives its client connection through ``StreamPort`` and its upstream
stream through ``H2Upstream``'s methods; knows neither connection class.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.datapath.exchange_base import State
from gateway.datapath.grpc_stream import GrpcStream
from gateway.datapath.h2stream import D_BODY, D_NONE, D_QUEUE, D_UPSTREAM, D_WRITE, Headers
from gateway.policy.decide import PROXY, Refuse
from gateway.policy.errors import Kind

if TYPE_CHECKING:
    from gateway.datapath.h2upstream import H2Pool, H2Upstream
    from gateway.policy.routing import Route

__all__ = ["GrpcExchange"]

_QUEUED, _CONNECTING, _SENT = int(State.QUEUED), int(State.CONNECTING), int(State.SENT)
_RESPONDING, _ANSWERED = int(State.RESPONDING), int(State.ANSWERED)

_FAILURES = {
    "connect": Kind.UPSTREAM_CONNECT,
    "reset": Kind.UPSTREAM_RESET,
    "protocol": Kind.UPSTREAM_PROTOCOL,
    "timeout": Kind.UPSTREAM_TIMEOUT,
}
# The trailers of a response cut short after its headers went out: the
# client must see a retryable status, not a short success.
_CUT = [(b"grpc-status", b"14"), (b"grpc-message", b"upstream connection failed")]


class GrpcExchange(GrpcStream):
    """A gRPC stream that decides, and proxies what it does not answer itself."""

    __slots__ = ()

    # ------------------------------------------------------------------
    # Deciding: the one policy both protocols share (h2stream.py).

    def start(self) -> None:
        route = self.gen.routes.get_grpc(self.head.path)
        d = self.decide(route)
        if d is PROXY:
            assert route is not None
            self.limit = route.max_body_bytes
            self.admit(route)
            return
        # /health is not a gRPC method, and HEALTH_CHECK needs a route that
        # get_grpc never returns: anything else is a refusal.
        assert isinstance(d, Refuse)
        self.answer(d.kind)

    # ------------------------------------------------------------------
    # Proxying.

    def _proxy(self, route: Route) -> None:
        rstats = self.rstats = self.shared.stats.route(route.name)
        rstats.in_flight += 1
        principal = self.principal
        assert principal is not None
        assert route.plan is not None
        # The credential's own plan for this route (tenancy), else the route's;
        # a gRPC route has one backend (config/routes.py).
        targets = principal.targets
        plan = route.plan if targets is None else targets.get(route.name, route.plan)
        target = self.target = plan.targets[0]
        self.label = plan.balancer.first.backend.label
        pool = self.shared.h2pool(target.upstream)
        conn = pool.acquire()
        if conn is not None:
            self._open(conn)
            return
        self.state = _CONNECTING
        self.dkind = D_NONE  # bounded by connect_timeout
        self._task = self.shared.loop.create_task(self._connect(pool))

    async def _connect(self, pool: H2Pool) -> None:
        try:
            conn = await pool.connect(self.gen.connect_timeout)
        except Exception as exc:  # noqa: BLE001  (timeouts, OSErrors, TLS and resolver errors)
            if not isinstance(exc, OSError | TimeoutError):
                self.shared.log.warning(
                    "upstream_connect_error", route=self.route_name, error=type(exc).__name__
                )
            self.up_failed("connect")
        else:
            if self.state == _CONNECTING:
                self._open(conn)
                conn.flush()
        self.conn.flush()

    def _open(self, up: H2Upstream) -> None:
        head, pinned = self.head, self.target
        assert pinned is not None
        target = pinned.upstream
        fields = head.h2_fields()
        if pinned.headers is not None:
            # The credential's fields replace the client's copies, in any spelling.
            fields, dropped = pinned.headers.strip_pairs(fields)
            if dropped:
                self.shared.stats.overrides_dropped(self.credential, "header", dropped)
        peer = self.conn.peer_bytes
        clients = self.gen.clients
        xff = head.xff + b", " + peer if head.xff and clients.trusted(self.conn.peer) else peer
        headers: Headers = [
            (b":method", head.method),
            (b":scheme", b"https" if target.scheme == "https" else b"http"),
            (b":path", head.path),
            (b":authority", target.host_header),
            (b"te", b"trailers"),
            *fields,
            (b"x-request-id", head.request_id),
            (b"x-forwarded-for", xff),
            (b"x-forwarded-proto", self.conn.scheme),
        ]
        self.up = up
        self.up_sid = up.open(self, headers, end=self.request_done and not self._req)
        self.end_sent = self.request_done and not self._req
        self.state = _SENT
        self.t_sent = time.perf_counter()
        self.conn.touched(up)
        self._pump_request()
        self._arm()

    # ------------------------------------------------------------------
    # Request side: the client connection's events.

    def on_data(self, data: bytes, flow: int) -> None:
        self.body_in += len(data)
        if self.state >= _ANSWERED:
            self.conn.ack(self.sid, flow)  # answered: read and dropped
            return
        if self.body_in > self.limit and self.state >= _QUEUED:
            self._abort(Kind.TOO_LARGE, "body_too_large")
            self.conn.ack(self.sid, flow)
            return
        self._req.append((data, flow))
        self._pump_request()
        if self.dkind == D_BODY:
            now = self.shared.loop.time()
            self.deadline = now + self.gen.body_idle_timeout
            if self.too_slow(now):
                self._abort(Kind.CLIENT_TIMEOUT, "client_timeout")

    def on_end(self) -> None:
        self.request_done = True
        if self.state >= _ANSWERED:
            self._maybe_finish()
            return
        self._pump_request()
        self._arm()

    def client_window(self) -> None:
        self._pump_response()

    def _pump_request(self) -> None:
        up = self.up
        if up is None or self.end_sent:
            return
        req = self._req
        sid, usid = self.sid, self.up_sid
        ended = False
        while req:
            room = up.window(usid)
            if room <= 0:
                break
            data, flow = req[0]
            if len(data) <= room:
                req.pop(0)
                ended = self.request_done and not req
                up.send(usid, data, end=ended)
                self.conn.ack(sid, flow)
            else:
                up.send(usid, data[:room], end=False)
                req[0] = (data[room:], flow - room)
                self.conn.ack(sid, room)
        if self.request_done and not req and not ended:
            up.end(usid)
            ended = True
        self.end_sent = ended
        self.conn.touched(up)

    # ------------------------------------------------------------------
    # Response side: the upstream stream's ``StreamSink``.

    def up_headers(self, headers: Headers, end: bool) -> None:
        if self.state >= _ANSWERED:
            return
        self.upstream_seconds = time.perf_counter() - self.t_sent
        self.state = _RESPONDING
        self.responded = True
        for name, value in headers:
            if name == b":status":
                self.status = int(value)
            elif name == b"grpc-status":
                self.grpc_status = value.decode("ascii", "replace")[:4]
        self.conn.send_headers(self.sid, headers, end)
        if end:
            self._answered()
        else:
            self._arm()

    def up_data(self, data: bytes, flow: int, end: bool) -> None:
        if self.state >= _ANSWERED:
            return
        self.bytes_out += len(data)
        self._resp.append((data, flow))
        if end:
            self._trailers = []  # ended without trailers: END_STREAM on DATA
        self._pump_response()

    def up_trailers(self, headers: Headers) -> None:
        if self.state >= _ANSWERED:
            return
        for name, value in headers:
            if name == b"grpc-status":
                self.grpc_status = value.decode("ascii", "replace")[:4]
        self._trailers = headers
        self._pump_response()

    def up_window(self) -> None:
        self._pump_request()

    def flush_client(self) -> None:
        self.conn.flush()

    def up_failed(self, kind: str) -> None:
        if self.state >= _ANSWERED:
            return
        self.shared.stats.upstream_error(self.route_name, kind)
        self.error = "upstream_" + kind
        self._drop_upstream()
        if not self.responded:
            self.answer(_FAILURES[kind])
            return
        self._resp = []
        self.conn.send_headers(self.sid, _CUT, True)
        self._answered()

    def _pump_response(self) -> None:
        resp = self._resp
        sid = self.sid
        up = self.up
        while resp:
            room = self.conn.window(sid)
            if room <= 0:
                self._set_deadline(D_WRITE, self.gen.body_idle_timeout)
                return
            data, flow = resp[0]
            if len(data) <= room:
                resp.pop(0)
                self.conn.send_data(sid, data, False)
                if up is not None:
                    up.ack(self.up_sid, flow)
            else:
                self.conn.send_data(sid, data[:room], False)
                resp[0] = (data[room:], flow - room)
                if up is not None:
                    up.ack(self.up_sid, room)
        if up is not None:
            self.conn.touched(up)
        trailers = self._trailers
        if trailers is not None:
            if trailers:
                self.conn.send_headers(sid, trailers, True)
            else:
                self.conn.send_data(sid, b"", True)
            self._answered()
        else:
            self._arm()

    def on_deadline(self) -> None:
        kind, self.dkind = self.dkind, D_NONE
        if kind == D_BODY:
            self._abort(Kind.CLIENT_TIMEOUT, "client_timeout")
        elif kind == D_QUEUE:
            self._overloaded("queue_timeout")
        elif kind == D_UPSTREAM:
            self.up_failed("timeout")
        elif kind == D_WRITE:
            self.error = "client_write_timeout"
            self._abort(Kind.CLIENT_TIMEOUT, "client_write_timeout")
