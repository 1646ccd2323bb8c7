"""A request for an HTTP/1.1 route (remote-write, OTLP/HTTP, ``/health``)
that arrived on an HTTP/2 stream: what a Go ``otlptracehttp`` exporter or
curl sends once TLS ALPN offered them ``h2``.

The same policy, status table and accounting as HTTP/1.1: ``policy.decide``
on the stream's ``RequestHead``, answers from ``h2relay_base.py``, and a
proxied request goes to the route's pooled HTTP/1.1 ``UpstreamConnection``,
for which this stream is the ``ResponseSink``.  Toward the upstream the
request is HTTP/1.1 as RFC 9113 §8.2 and RFC 9110 §7.6 want it: hop-by-hop
fields are gone (h2 refuses most on the way in, ``RequestHead`` drops the
rest and ``te``), what HTTP/1.1 could not carry is a 400 (``h1_safe``), and
the body has the client's ``Content-Length`` (h2 holds the DATA to it) or
is chunked.

Flow control both ways: a DATA frame's window is returned to the client
only once its bytes go to an upstream socket that is not pushing back, so a
stream holds at most its window of request body; the response goes out as
the client's window allows, and the upstream is no longer read while more
than ``_HOLD`` bytes wait for it.  The body cap is checked as DATA arrives.
Any abort closes the upstream connection, and the final chunk is written
only when the client's stream ended: an upstream never sees a truncated
body as complete.

Backends: the plan's balancer picks one; the attempt counts as
outstanding on it, and its failures (refused, reset, timeout, a 5xx or a
retry status) and answers feed the backend's passive health as on
HTTP/1.1 (``passive.py``), so a dead backend is ejected for HTTP/2
clients too.  There is one attempt: no failover to another backend and no
replay copy (those are ``failover.py``'s, HTTP/1.1 only so far).

Drives its client connection through ``StreamPort`` and its upstream
through ``UpstreamPort``; knows neither class.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.datapath.exchange_base import State
from gateway.datapath.h2relay_base import H2RelayBase
from gateway.datapath.h2stream import D_BODY, D_NONE, D_QUEUE, D_UPSTREAM, D_WRITE
from gateway.datapath.passive import BACKEND_KINDS, backend_failed, backend_recovered
from gateway.policy.decide import HEALTH_CHECK, PROXY, Refuse
from gateway.policy.errors import Kind
from gateway.policy.errors import Protocol as Wire
from gateway.policy.headers import h1_safe

if TYPE_CHECKING:
    from gateway.datapath.h2stream import StreamPort
    from gateway.datapath.ports import UpstreamPool, UpstreamPort
    from gateway.datapath.shared import Shared
    from gateway.policy.balance import Balancer, Lane
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route

__all__ = ["H2Relay"]

_QUEUED, _CONNECTING = int(State.QUEUED), int(State.CONNECTING)
_SENT, _RESPONDING, _ANSWERED = int(State.SENT), int(State.RESPONDING), int(State.ANSWERED)

_perf = time.perf_counter
_CONTINUE = [(b":status", b"100")]
# Response bytes waiting for the client's window before the upstream's
# socket is no longer read: a stream's window, as on the request side.
_HOLD = 256 * 1024
# As in exchange.py: what each upstream failure answers, and its metric label.
_FAILURES = {
    "connect": Kind.UPSTREAM_CONNECT,
    "connect_timeout": Kind.UPSTREAM_CONNECT,
    "timeout": Kind.UPSTREAM_TIMEOUT,
    "reset": Kind.UPSTREAM_RESET,
    "protocol": Kind.UPSTREAM_PROTOCOL,
}
_ERROR_LABEL = {"connect_timeout": "connect"}


class H2Relay(H2RelayBase):
    """An HTTP/2 stream for an HTTP/1.1 route that decides and proxies; the
    ``ResponseSink`` of the upstream connection it holds and a ``Flushable``
    of its client connection."""

    __slots__ = (
        "_picked",
        "_read_paused",
        "_up_paused",
        "balancer",
        "lane",
        "pool",
        "up_buf",
        "upstream",
    )

    def __init__(self, conn: StreamPort, shared: Shared, sid: int, head: RequestHead) -> None:
        super().__init__(conn, shared, sid, head)
        self.upstream: UpstreamPort | None = None
        self.pool: UpstreamPool | None = None
        self.up_buf: list[bytes] = []  # for the upstream, written at the event's end
        self._up_paused = False  # the upstream's socket pushes back
        self._read_paused = False
        self.balancer: Balancer | None = None
        self._picked: Lane | None = None  # chosen when the head is rendered
        self.lane: Lane | None = None  # the attempt under way, outstanding on its backend

    # ------------------------------------------------------------------
    # Deciding.

    def start(self) -> None:
        head = self.head
        if not h1_safe(head.path + head.query, head.forward):
            self.error = "bad_request"
            self.answer(Kind.BAD_REQUEST)
            return
        route = self.gen.routes.get(head.path)
        if route is not None:
            self.protocol = route.protocol
        d = self.decide(route)
        if d is PROXY:
            assert route is not None
            self._render_head(route)
            self.admit(route)
        elif d is HEALTH_CHECK:
            self._health()
        else:
            assert isinstance(d, Refuse)
            if d.otlp:
                self.protocol = Wire.OTLP
            allow = route.allow_line[7:-2] if d.allow and route is not None else b""
            self._local(d.kind, allow)

    def _render_head(self, route: Route) -> None:
        """The upstream's request head, first in ``up_buf``: body bytes that
        arrive while queued or connecting land after it, in order.  As
        ``Exchange.admit`` does it for HTTP/1.1 (keep the two in step): the
        credential's target (tenancy), its query filter and pinned fields."""
        self.limit = route.max_body_bytes
        head, conn, gen, client = self.head, self.conn, self.gen, self.client
        principal = self.principal
        assert principal is not None
        assert route.plan is not None
        targets = principal.targets
        plan = route.plan if targets is None else targets.get(route.name, route.plan)
        # The plan's balancer chooses the backend; over HTTP/2 a request has
        # one attempt (failover and the replay copy are HTTP/1.1's so far:
        # datapath/failover.py).
        bal = self.balancer = plan.balancer
        lane = bal.first if bal.single else bal.pick(self.shared.loop.time(), 0)
        assert lane is not None
        self._picked = lane
        lane.stats.requests += 1
        self.label = lane.backend.label
        target = self.target = plan.targets[lane.backend.index]
        query = head.query
        stats = self.shared.stats
        if query and target.query is not None:
            request_target, labels, others = target.filtered(query)
            if labels:
                stats.overrides_dropped(self.credential, "extra_label", labels)
            if others:
                stats.overrides_dropped(self.credential, "query_arg", others)
        else:
            request_target = target.render(query)
        pinned = target.headers
        self.up_buf.append(
            head.upstream_head(
                request_target,
                target.upstream.host_header,
                conn.peer_bytes,
                gen.clients.proxied and gen.clients.trusted(conn.peer),
                conn.scheme,
                conn.peer_bytes if client is conn.peer else client.encode(),
                gen.underscores_in_headers,
                pinned,
            )
        )
        if head.underscored:
            stats.header_dropped("underscore", len(head.underscored) // 2)
        if pinned is not None and head.pinned_dropped:
            stats.overrides_dropped(self.credential, "header", head.pinned_dropped)

    def _end_attempt(self) -> Lane | None:
        """The attempt is over: no longer outstanding on its backend."""
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.state.outstanding -= 1
        return lane

    def _drop_upstream(self) -> None:
        self._end_attempt()
        self.up_buf = []
        up, self.upstream = self.upstream, None
        self.pool = None
        if up is not None:
            up.abort()  # a socket closed mid-body: never a complete request
        self._return_window()
        if self.state == _QUEUED and self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None

    # ------------------------------------------------------------------
    # Proxying.

    def _proxy(self, route: Route) -> None:
        rstats = self.rstats = self.shared.stats.route(route.name)
        rstats.in_flight += 1
        if self.head.expect_continue and not self.request_done:
            self.conn.send_headers(self.sid, _CONTINUE, False)
        lane = self.lane = self._picked
        assert lane is not None
        lane.state.outstanding += 1
        target = self.target
        assert target is not None
        pool = self.pool = self.shared.pools.get(target.upstream)
        conn = pool.acquire()
        if conn is not None:
            self._attach(conn)
            return
        self.state = _CONNECTING
        self.dkind = D_NONE  # bounded by connect_timeout
        self._task = self.shared.loop.create_task(self._connect(pool))

    async def _connect(self, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect(self.gen.connect_timeout)
        except TimeoutError:
            self.upstream_failed("connect_timeout")
        except OSError:
            self.upstream_failed("connect")
        except Exception as exc:  # noqa: BLE001  (resolver and ssl errors are not OSErrors)
            self.shared.log.warning(
                "upstream_connect_error", route=self.route_name, error=type(exc).__name__
            )
            self.upstream_failed("connect")
        else:
            if self.state != _CONNECTING:
                pool.release(conn, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                self._attach(conn)
                self.flush()
        self.conn.flush()

    def _attach(self, conn: UpstreamPort) -> None:
        conn.attach(self)
        self.upstream = conn
        self.state = _SENT
        self.t_sent = _perf()
        self._return_window()  # what arrived while queued or connecting
        self.conn.touched(self)
        self._arm()

    def flush(self) -> None:
        """``Flushable``: what this event produced for the upstream, in one write."""
        up = self.upstream
        if up is not None and self.up_buf:
            buf, self.up_buf = self.up_buf, []
            up.send(buf)

    # ------------------------------------------------------------------
    # Request side: the client connection's events.

    def on_data(self, data: bytes, flow: int) -> None:
        n = len(data)
        self.body_in += n
        state = self.state
        if not n or state < _QUEUED or state > _RESPONDING or self._resp_end:
            # Nothing to forward (an empty chunk would end a chunked body),
            # or answered here: read and dropped.
            self.conn.ack(self.sid, flow)
            return
        if self.body_in > self.limit:
            self.conn.ack(self.sid, flow)
            self._abort(Kind.TOO_LARGE, "body_too_large")
            return
        if self.head.chunked:
            self.up_buf += (b"%x\r\n" % n, data, b"\r\n")
        else:
            self.up_buf.append(data)
        if self.upstream is not None and not self._up_paused:
            self.conn.ack(self.sid, flow)
            self.conn.touched(self)
        else:
            self._backlog += flow
        if self.dkind == D_BODY:
            now = self.shared.loop.time()
            self.deadline = now + self.gen.body_idle_timeout
            if self.too_slow(now):
                self._abort(Kind.CLIENT_TIMEOUT, "client_timeout")

    def on_end(self) -> None:
        self.request_done = True
        state = self.state
        if state >= _ANSWERED:
            self._maybe_finish()
            return
        if _QUEUED <= state <= _RESPONDING and not self._resp_end:
            if self.head.chunked:
                self.up_buf.append(b"0\r\n\r\n")
            if self.upstream is not None:
                self.conn.touched(self)
        self._arm()

    def _arm(self) -> None:
        if self.state >= _ANSWERED:
            return
        if not self.request_done and not self._up_paused:
            self._set_deadline(D_BODY, self.gen.body_idle_timeout)
        elif self.state >= _SENT:
            # Also while the upstream's socket is full: it must drain in time.
            self._set_deadline(D_UPSTREAM, self.gen.response_timeout)

    def on_deadline(self) -> None:
        kind, self.dkind = self.dkind, D_NONE
        if kind == D_BODY and self.state == _ANSWERED:
            self._stop_request()  # the rest of an answered request's body did not come
            self._maybe_finish()
        elif kind == D_BODY:
            self._abort(Kind.CLIENT_TIMEOUT, "client_timeout")
        elif kind == D_QUEUE:
            self._overloaded("queue_timeout")
        elif kind == D_UPSTREAM:
            self.upstream_failed("timeout")
        elif kind == D_WRITE:
            self._abort(Kind.CLIENT_TIMEOUT, "client_write_timeout")

    # ------------------------------------------------------------------
    # Response side: the upstream connection's ``ResponseSink``.

    def response_head(
        self,
        status: int,
        reason: bytes,
        headers: bytes,
        keep_alive: bool,
        chunked: bool,
        length: int | None,
    ) -> None:
        """``headers``: the upstream's end-to-end fields as HTTP/1.1 lines,
        already without hop-by-hop ones; HTTP/2 wants them lower case."""
        lane, bal = self.lane, self.balancer
        if lane is not None and bal is not None:
            if status >= 500 or status in bal.set.retry_statuses:
                backend_failed(self.shared, bal, lane, "status")
            elif lane.state.fails or lane.state.ejections:
                backend_recovered(self.shared, self.route_name, lane)
        self.upstream_seconds = _perf() - self.t_sent
        self.status = status
        self.state = _RESPONDING
        self.responded = True
        fields = [(b":status", b"%d" % status)]
        for line in headers.split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                fields.append((name.lower(), value.strip(b" \t")))
        if length is not None and status not in (204, 304):
            fields.append((b"content-length", b"%d" % length))
        self._ended = length == 0
        self.conn.send_headers(self.sid, fields, self._ended)
        self._arm()

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._resp.append(data)
        self._resp_len += len(data)
        self._pump()
        up = self.upstream
        if self._resp_len > _HOLD and up is not None and not self._read_paused:
            self._read_paused = True
            up.pause_reading()

    def response_complete(self) -> None:
        self._end_attempt()
        up, self.upstream = self.upstream, None
        pool, self.pool = self.pool, None
        if up is not None:
            if self._read_paused:
                self._read_paused = False
                up.resume_reading()
            if self.request_done and not self.up_buf and pool is not None:
                pool.release(up, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                up.abort()  # it answered early; the rest of our body is not wanted
                self.up_buf = []
        self._resp_end = True
        self._pump()

    def upstream_failed(self, kind: str) -> None:
        if self.state >= _ANSWERED:
            return
        self.shared.stats.upstream_error(self.route_name, _ERROR_LABEL.get(kind, kind))
        lane, bal = self._end_attempt(), self.balancer
        if lane is not None and bal is not None:
            backend_failed(self.shared, bal, lane, BACKEND_KINDS.get(kind, kind))
        # The status already went out: a reset stream, never a short success.
        self._abort(_FAILURES[kind], "upstream_" + kind)

    def upstream_paused(self, paused: bool) -> None:
        # While its socket is full the client's window stays shut.
        self._up_paused = paused
        self._arm()
        if not paused:
            self._return_window()
            self.conn.flush()

    def flush_client(self) -> None:
        self.conn.flush()

    def _pump(self) -> None:
        super()._pump()
        up = self.upstream
        if self._read_paused and up is not None and self._resp_len <= _HOLD:
            self._read_paused = False
            up.resume_reading()
