"""One exchange: a request's way from the client to its answer.

``dispatch.py`` decides whether the gateway answers itself or proxies;
this module carries the decision out: local answers, admission into the
concurrency limits (with a short queue), then streaming both ways with
flow control, the body cap enforced while streaming, upstream failures
mapped to the contract's statuses, and one ``account`` call at the end.

States: an exchange is *started* once dispatched; it is *finished* when
its response is complete and its request body has been read, or when the
client connection is being closed.  Upstream aborts never send a final
chunk, so an upstream never sees a truncated body as complete.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.datapath.accounting import account
from gateway.datapath.health import (
    DEEP_TIMEOUT_SECONDS,
    check_upstreams,
    health_response,
    wants_deep,
)
from gateway.policy.decide import dispatch
from gateway.policy.errors import CLIENT_CLOSED, Kind, Protocol
from gateway.policy.headers import write_coalesced

if TYPE_CHECKING:
    from gateway.datapath.connection import ClientConnection
    from gateway.datapath.upstream import Pool, UpstreamConnection
    from gateway.policy.auth import Principal
    from gateway.policy.limits import Slots
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route
    from gateway.telemetry.counters import RouteStats

__all__ = ["DISCARD_LIMIT", "Exchange"]

# A request answered without proxying still has its body on the wire: up to
# this size it is read and dropped to keep the connection; beyond, the
# connection is closed after the answer.
DISCARD_LIMIT = 256 * 1024

_perf = time.perf_counter
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FAILURES = {
    "connect": Kind.UPSTREAM_CONNECT,
    "connect_timeout": Kind.UPSTREAM_CONNECT,  # unreachable: nothing was sent
    "timeout": Kind.UPSTREAM_TIMEOUT,
    "reset": Kind.UPSTREAM_RESET,
    "protocol": Kind.UPSTREAM_PROTOCOL,
    "internal": Kind.INTERNAL,
}
# upstream_errors_total{kind} values: connect, timeout, reset, protocol.
_ERROR_LABEL = {"connect_timeout": "connect", "internal": "internal"}


class Exchange:
    __slots__ = (
        "_body_t0",
        "_connect_task",
        "_early",
        "_early_done",
        "_held",
        "_queued_on",
        "body_in",
        "bytes_out",
        "chunked_out",
        "client",
        "close",
        "conn",
        "credential",
        "error",
        "finished",
        "gen",
        "head",
        "limit",
        "pool",
        "principal",
        "protocol",
        "proxying",
        "request_done",
        "response_done",
        "response_started",
        "route",
        "route_name",
        "rstats",
        "shared",
        "started",
        "status",
        "t_sent",
        "token_id",
        "up_buf",
        "upstream",
        "upstream_seconds",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead) -> None:
        self.conn = conn
        self.shared = conn.shared
        self.gen = conn.shared.gen
        self.head = head
        self.route: Route | None = None
        self.route_name = "unmatched"
        self.protocol = Protocol.PLAIN
        self.principal: Principal | None = None
        self.credential = "none"
        self.token_id = ""
        self.client = conn.peer
        self.status = 0
        self.error = ""
        self.body_in = 0
        self.bytes_out = 0
        self.limit = DISCARD_LIMIT
        self.started = False
        self.proxying = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.close = False
        self.chunked_out = False
        self.upstream: UpstreamConnection | None = None
        self.pool: Pool | None = None
        self.rstats: RouteStats | None = None
        self.up_buf: list[bytes] = []
        self.t_sent = 0.0
        self.upstream_seconds = -1.0
        # The event loop keeps only a weak reference to tasks: hold ours so a
        # pending connect or deep probe cannot be collected mid-flight.
        self._connect_task: object = None
        self._early: list[bytes] | None = None
        self._early_done = False
        self._held: list[Slots] = []  # concurrency slots to release at the end
        self._queued_on: Slots | None = None
        self._body_t0 = 0.0

    # ------------------------------------------------------------------
    # Request side, driven by the client connection's parser callbacks.

    def start(self) -> None:
        """Dispatch (DESIGN §3 order); replays body parsed while queued."""
        self.started = True
        self.gen = gen = self.shared.gen
        head = self.head
        try:
            dispatch(self, gen, head)
        except Exception as exc:  # noqa: BLE001  (a bug must cost a 503, not the connection)
            self._internal(exc)
        early, self._early = self._early, None
        if early:
            for chunk in early:
                self.on_body(chunk)
        if self._early_done:
            self.on_request_complete()

    def on_body(self, data: bytes) -> None:
        if not self.started:
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        n = len(data)
        self.body_in += n
        if not self.proxying:
            return  # answered already: the body is read and dropped
        if self.body_in > self.limit:
            self._too_large()
            return
        if self.head.chunked:
            self.up_buf += (b"%x\r\n" % n, data, b"\r\n")
        else:
            self.up_buf.append(data)

    def too_slow(self, now: float, n: int) -> bool:
        """Minimum body rate, checked as body bytes arrive (slow-body defence)."""
        if self._body_t0 == 0.0:
            self._body_t0 = now
            return False
        elapsed = now - self._body_t0
        gen = self.gen
        return elapsed > gen.min_body_grace and (self.body_in + n) < elapsed * gen.min_body_rate

    def on_request_complete(self) -> None:
        if not self.started:
            self._early_done = True
            return
        self.request_done = True
        if self.proxying and not self.response_done:
            if self.head.chunked:
                self.up_buf.append(b"0\r\n\r\n")
            if self._queued_on is None:
                self.conn.wait_upstream(self.gen.response_timeout)
            else:
                self.conn.resume(self.conn.PAUSE_QUEUE)
        self._maybe_finish()

    def flush_upstream(self) -> None:
        up = self.upstream
        if up is not None and self.up_buf:
            transport = up.transport
            if transport is not None:
                write_coalesced(transport, self.up_buf)
            self.up_buf = []

    # ------------------------------------------------------------------
    # Answers the gateway makes itself.

    def refuse(self, kind: Kind, error: str) -> None:
        self.error = error
        self.answer(kind)

    def answer(self, kind: Kind, extra: bytes = b"") -> None:
        head = self.head
        if (
            not self.request_done
            and head.has_body
            and (head.content_length is None or head.content_length > DISCARD_LIMIT)
        ):
            self.close = True  # too much body left to read and drop
        if not head.keep_alive or self.shared.draining:
            self.close = True
        status, data, body_len = self.gen.errors.render(
            kind,
            self.protocol,
            head.json,
            self.shared.date_line,
            self.close,
            extra,
            head.method == b"HEAD",
        )
        self.status = status
        self.bytes_out += body_len
        self.response_started = self.response_done = True
        self.conn.out.append(data)
        if not self.close and not self.request_done and head.has_body:
            self.conn.reading_body(self.gen.body_idle_timeout)
        self._maybe_finish()

    def health(self, principal: Principal) -> None:
        if wants_deep(self.head.query):
            # Reading pauses while the probe runs, so answers stay in order.
            self.conn.pause(self.conn.PAUSE_CONNECT)
            self.conn.no_deadline()
            self._connect_task = self.shared.loop.create_task(self._deep_health(principal))
            return
        self._health_answer(principal, None)

    async def _deep_health(self, principal: Principal) -> None:
        timeout = min(self.gen.connect_timeout, DEEP_TIMEOUT_SECONDS)
        try:
            upstreams = await check_upstreams(self.gen.routes.routes, timeout)
        finally:
            self.conn.resume(self.conn.PAUSE_CONNECT)
        if not self.finished:
            self._health_answer(principal, upstreams)
            self.conn.flush()

    def _health_answer(self, principal: Principal, upstreams: dict[str, bool] | None) -> None:
        status, body = health_response(principal, time.time(), upstreams)
        head = self.head
        self.close = self.close or not head.keep_alive or self.shared.draining
        reason = b"OK" if status == 200 else b"Service Unavailable"
        out = b"".join(
            (
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n" % (status, reason),
                b"Cache-Control: no-store\r\nContent-Length: %d\r\n" % len(body),
                self.shared.date_line,
                b"Connection: close\r\n" if self.close else b"",
                b"\r\n",
                b"" if head.method == b"HEAD" else body,
            )
        )
        self.status = status
        if head.method != b"HEAD":
            self.bytes_out += len(body)
        self.response_started = self.response_done = True
        self.conn.out.append(out)
        self._maybe_finish()

    def _internal(self, exc: BaseException) -> None:
        self.shared.log.error("internal_error", error=type(exc).__name__, exc_info=exc)
        self.error = "internal"
        if not self.response_started:
            self.close = True
            self._drop_upstream()
            self.answer(Kind.INTERNAL)
        else:
            self.conn.close_now()

    # ------------------------------------------------------------------
    # Proxying.

    def admit(self, route: Route) -> None:
        """Take a concurrency slot (credential first, then global) or queue."""
        if not self.proxying:
            self.proxying = True
            self.route = route
            self.limit = route.max_body_bytes
            up = route.upstream
            assert up is not None
            head = self.head
            # Body bytes parsed while queued land after the head, in order.
            conn = self.conn
            self.up_buf.append(
                head.upstream_head(
                    route.target(head.query),
                    up.host_header,
                    conn.peer_bytes,
                    self.gen.clients.proxied and self.gen.clients.trusted(conn.peer),
                    conn.scheme,
                )
            )
        admission = self.shared.admission
        own = admission.credential_slots.get(self.credential)
        for slots in (own, admission.slots):
            if slots is None or not slots.limit or slots in self._held:
                continue
            if not slots.try_acquire():
                self._queue(slots)
                return
            self._held.append(slots)
        if self._queued_on is not None:
            self._queued_on = None
            self.conn.resume(self.conn.PAUSE_QUEUE)
        self._proxy(route)

    def _queue(self, slots: Slots) -> None:
        if self._queued_on is slots or slots.enqueue(self):
            self._queued_on = slots
            if not self.request_done:
                # Bound what is buffered while waiting.  A complete request
                # keeps reading, so a client that leaves is noticed and
                # gives up its place instead of being sent upstream.
                self.conn.pause(self.conn.PAUSE_QUEUE)
            self.conn.queue_deadline(self.shared.admission.queue_timeout)
            return
        self._overloaded("concurrency")

    def admitted(self) -> None:
        """A slot freed up for this queued exchange (called by ``Slots``)."""
        if self.finished or self.route is None:
            return
        self.admit(self.route)
        self.flush_upstream()
        self.conn.flush()

    def queue_timeout(self) -> None:
        self._overloaded("queue_timeout")

    def _overloaded(self, reason: str) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
            self.conn.resume(self.conn.PAUSE_QUEUE)
        self.shared.stats.limit_rejection(reason)
        self.up_buf = []
        self.proxying = False
        self.refuse(Kind.OVERLOADED, reason)

    def _release(self) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
        held, self._held = self._held, []
        for slots in held:
            slots.release()

    def _proxy(self, route: Route) -> None:
        head = self.head
        rstats = self.rstats = self.shared.stats.route(route.name)
        rstats.in_flight += 1
        up = route.upstream
        assert up is not None
        if head.expect_continue and head.has_body and not self.request_done:
            self.conn.out.append(_CONTINUE)
        pool = self.pool = self.shared.pools.get(up)
        conn = pool.acquire()
        if conn is not None:
            self._attach(conn)
            if head.has_body and not self.request_done:
                self.conn.reading_body(self.gen.body_idle_timeout)
        else:
            # Reading waits for the connection (bounded by connect_timeout),
            # so no body-idle deadline may blame the client meanwhile.
            self.conn.pause(self.conn.PAUSE_CONNECT)
            self.conn.no_deadline()
            self._connect_task = self.shared.loop.create_task(self._connect(pool))

    async def _connect(self, pool: Pool) -> None:
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
            if self.finished or self.response_done or self.pool is None:
                pool.release(conn, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                self._attach(conn)
                self.flush_upstream()
                self.conn.resume(self.conn.PAUSE_CONNECT)
                if not self.request_done:
                    self.conn.reading_body(self.gen.body_idle_timeout)
        finally:
            self.conn.flush()

    def _attach(self, conn: UpstreamConnection) -> None:
        conn.attach(self)
        self.upstream = conn
        self.t_sent = _perf()

    def _drop_upstream(self) -> None:
        """Abort the upstream request: it must never see a complete body."""
        self.up_buf = []
        up, self.upstream = self.upstream, None
        self.pool = None
        if up is not None:
            up.abort()
        self.conn.resume(self.conn.PAUSE_CONNECT | self.conn.PAUSE_UPSTREAM)

    def bad_body(self) -> None:
        """The body broke HTTP framing (e.g. an invalid chunk size)."""
        self.error = "bad_body"
        self._drop_upstream()
        self.proxying = False
        if not self.response_started:
            self.close = True
            self.answer(Kind.BAD_REQUEST)
        else:
            self.conn.close_now()

    def _too_large(self) -> None:
        self.error = "body_too_large"
        self._drop_upstream()
        self.proxying = False
        if not self.response_started:
            self.close = True
            self.answer(Kind.TOO_LARGE)
        else:
            self.conn.close_now()

    # ------------------------------------------------------------------
    # Response side: the upstream connection's sink.

    def response_head(
        self,
        status: int,
        reason: bytes,
        headers: bytes,
        keep_alive: bool,
        chunked: bool,
        length: int | None,
    ) -> None:
        """``headers``: the upstream's end-to-end fields, already filtered."""
        self.upstream_seconds = _perf() - self.t_sent
        self.status = status
        self.response_started = True
        head = self.head
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason), headers]
        if not self.request_done or not head.keep_alive or self.shared.draining:
            self.close = True
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif head.http11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked_out = True
        else:
            self.close = True  # HTTP/1.0 client: the body ends at close
        if self.close:
            parts.append(b"Connection: close\r\n")
        elif not head.http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.conn.out.append(b"".join(parts))
        self.conn.wait_upstream(self.gen.response_timeout)

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            self.conn.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.conn.out.append(data)
        self.conn.wait_upstream(self.gen.response_timeout)

    def response_complete(self) -> None:
        if self.chunked_out:
            self.conn.out.append(b"0\r\n\r\n")
        self.response_done = True
        up, self.upstream = self.upstream, None
        pool, self.pool = self.pool, None
        if up is not None and pool is not None:
            if self.request_done:
                pool.release(up, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                up.abort()  # it answered early; the rest of our body is not wanted
        self._maybe_finish()

    def upstream_failed(self, kind: str) -> None:
        if self.finished or self.response_done:
            return
        self.shared.stats.upstream_error(self.route_name, _ERROR_LABEL.get(kind, kind))
        self.error = "upstream_" + kind
        self._drop_upstream()
        self.proxying = False
        if not self.response_started:
            self.answer(_FAILURES[kind])
        else:
            # Status already sent: cut the connection so the client sees a
            # truncated response and retries, rather than a short success.
            self.response_done = True
            self.close = True
            self.conn.close_now()
            self._maybe_finish()

    def upstream_paused(self, paused: bool) -> None:
        conn = self.conn
        if paused:
            conn.pause(conn.PAUSE_UPSTREAM)
            conn.wait_upstream(self.gen.response_timeout)
        else:
            conn.resume(conn.PAUSE_UPSTREAM)
            if not self.request_done:
                conn.reading_body(self.gen.body_idle_timeout)

    def flush_client(self) -> None:
        self.conn.flush()

    # ------------------------------------------------------------------
    # Endings.

    def client_lost(self) -> None:
        """The client connection closed under us."""
        if self.finished:
            return
        if not self.response_done:
            self.status = CLIENT_CLOSED
            self.error = self.error or "client_closed"
        self._drop_upstream()
        self.response_done = self.request_done = True
        self._finish()

    def client_timeout(self) -> None:
        """No body bytes for body_idle_timeout seconds."""
        self.error = "client_timeout"
        self._drop_upstream()
        self.proxying = False
        if not self.response_started:
            self.close = True
            self.answer(Kind.CLIENT_TIMEOUT)
        else:
            self.conn.close_now()

    def upstream_timeout(self) -> None:
        self.upstream_failed("timeout")

    def _maybe_finish(self) -> None:
        if not self.finished and self.response_done and (self.request_done or self.close):
            self._finish()
            self.conn.exchange_finished(self)

    def _finish(self) -> None:
        self.finished = True
        if self.rstats is not None:
            self.rstats.in_flight -= 1
        body_bytes = self.shared.admission.byte_rate.get(self.credential)
        if body_bytes is not None:
            body_bytes.spend(self.body_in)  # paid after the fact; admission waits for repayment
        account(self)
        self._release()
