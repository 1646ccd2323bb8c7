"""One exchange: a request's way from the client to its answer.

``policy.decide`` says whether the gateway answers itself or proxies; the
exchange carries that out: local answers (``exchange_base.py``, with the
states), admission into the concurrency limits (with a short queue), then
streaming both ways with flow control, the body cap enforced while
streaming, upstream failures mapped to the status table, and one
``account`` call at the end.  It drives its client connection through
``ClientPort`` and its upstream through ``UpstreamPort`` (``ports.py``)
and knows neither class.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from gateway.datapath.exchange_base import DISCARD_LIMIT, State
from gateway.datapath.failover import SEALED_PIECE, SMALL_PIECE, Failover
from gateway.datapath.ports import PAUSE_QUEUE, PAUSE_UPSTREAM, Deadline
from gateway.policy.auth import Principal
from gateway.policy.decide import (
    HEALTH_CHECK,
    MALFORMED,
    PROXY,
    Refuse,
    attribution,
    decide,
    identify,
)
from gateway.policy.errors import Kind

if TYPE_CHECKING:
    from gateway.policy.limits import Slots
    from gateway.policy.routing import Route

__all__ = ["DISCARD_LIMIT", "Exchange", "State"]

# Plain ints (see State): compared and stored on every request.
_WAITING: Final = int(State.WAITING)
_DECIDING: Final = int(State.DECIDING)
_QUEUED: Final = int(State.QUEUED)
_CONNECTING: Final = int(State.CONNECTING)
_SENT: Final = int(State.SENT)
_RESPONDING: Final = int(State.RESPONDING)
_ANSWERED: Final = int(State.ANSWERED)
_BODY: Final = int(Deadline.BODY)
_UPSTREAM: Final = int(Deadline.UPSTREAM)
_QUEUE: Final = int(Deadline.QUEUE)
_perf: Final = time.perf_counter
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange(Failover):
    """An exchange that decides, and proxies what it does not answer itself."""

    __slots__ = ()

    # ------------------------------------------------------------------
    # Request side, driven by the client connection's parser callbacks.

    def start(self) -> None:
        """Decide and act on it; replays the body parsed while WAITING."""
        self.state = _DECIDING
        self.gen = self.shared.gen
        try:
            self._dispatch()
        except Exception as exc:  # noqa: BLE001  (a bug must cost a 503, not the connection)
            self.fault(exc)
        early, self._early = self._early, None
        if early:
            for chunk in early:
                self.on_body(chunk)
        if self._early_done:
            self.on_request_complete()

    def _dispatch(self) -> None:
        head, gen, shared = self.head, self.gen, self.shared
        if head.malformed:  # not attributable to a route or a credential
            self._refuse(MALFORMED, None)
            return
        route = gen.routes.get(head.path)
        if route is not None:
            self.route = route
            self.route_name = route.name
            self.protocol = route.protocol
        policy = gen.clients
        if policy.proxied:
            self.client = policy.resolve(self.conn.peer, head.client_ip)
        who = identify(head, self.client, gen, shared.admission, shared.loop.time())
        d = decide(
            head,
            route,
            self.client,
            who,
            self.conn.cert_subject,
            gen,
            shared.admission,
            shared.loop.time(),
            shared.draining,
        )
        if not d.anonymous:
            self.principal, self.credential, self.token_id = attribution(who)
        if d is PROXY:
            assert route is not None
            self.admit(route)
        elif d is HEALTH_CHECK:
            assert isinstance(who, Principal)
            self.health(who)
        else:
            assert isinstance(d, Refuse)
            self._refuse(d, who)

    def on_body(self, data: bytes) -> None:
        state = self.state
        if state == _WAITING:
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        n = len(data)
        self.body_in += n
        if not _QUEUED <= state <= _RESPONDING:
            return  # answered already: the body is read and dropped
        if self.body_in > self.limit and self._over_limit():
            return
        if self.head.chunked:
            self.up_buf += (b"%x\r\n" % n, data, b"\r\n")
        else:
            self.up_buf.append(data)
        replay = self.replay  # the copy for a replay on another backend, if kept
        if replay is not None:
            if n >= SMALL_PIECE:
                replay.append(data)  # the same object: no copy, ~1 % overhead at most
            else:
                # Tiny pieces would cost more in object headers than in
                # bytes: gathered, and kept as one piece once big enough.
                tail = self.replay_tail
                assert tail is not None
                tail += data
                if len(tail) >= SEALED_PIECE:
                    replay.append(bytes(tail))
                    tail.clear()

    def too_slow(self, now: float, n: int) -> bool:
        """Minimum body rate, checked as body bytes arrive (slow-body defence)."""
        if self._body_t0 == 0.0:
            self._body_t0 = now
            return False
        elapsed = now - self._body_t0
        gen = self.gen
        return elapsed > gen.min_body_grace and (self.body_in + n) < elapsed * gen.min_body_rate

    def on_request_complete(self) -> None:
        if self.state == _WAITING:
            self._early_done = True
            return
        self.request_done = True
        state = self.state
        if _QUEUED <= state <= _RESPONDING:
            if self.head.chunked:
                self.up_buf.append(b"0\r\n\r\n")
            if state >= _SENT:
                self.conn.set_deadline(_UPSTREAM, self.gen.response_timeout)
            elif self._queued_on is not None:
                self.conn.resume(PAUSE_QUEUE)
            # CONNECTING: connect_timeout bounds the connect; the response
            # deadline starts when the request can be sent (_attach).
        self._maybe_finish()

    # ------------------------------------------------------------------
    # Admission.

    def admit(self, route: Route) -> None:
        """Take a concurrency slot (credential first, then global) or queue."""
        if self.state < _QUEUED:
            self.state = _QUEUED
            self.route = route
            self.limit = route.max_body_bytes
            principal = self.principal
            assert principal is not None
            assert route.plan is not None
            # The credential's own plan for this route (tenancy: its pinned
            # labels and headers, maybe its own backends), else the route's.
            targets = principal.targets
            self.plan = route.plan if targets is None else targets.get(route.name, route.plan)
            # The request head for the backend chosen once admitted
            # (failover.py's _send_to); body bytes parsed while queued
            # land after it, in order.
            self.up_buf.append(b"")
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
            self.conn.resume(PAUSE_QUEUE)
        self._proxy(route)

    def _queue(self, slots: Slots) -> None:
        if self._queued_on is slots or slots.enqueue(self):
            self._queued_on = slots
            if not self.request_done:
                # Bound what is buffered while waiting.  A complete request
                # keeps reading, so a client that leaves is noticed and
                # gives up its place instead of being sent upstream.
                self.conn.pause(PAUSE_QUEUE)
            self.conn.set_deadline(_QUEUE, self.shared.admission.queue_timeout)
            return
        self._overloaded("concurrency")

    def admitted(self) -> None:
        """A slot freed up for this queued exchange (called by ``Slots``)."""
        if self.state != _QUEUED or self.route is None:
            return
        self.admit(self.route)
        self.flush_upstream()
        self.conn.flush()

    def queue_timeout(self) -> None:
        if self.state == _QUEUED:  # a stale deadline must not refuse a request sent upstream
            self._overloaded("queue_timeout")

    def _overloaded(self, reason: str) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
            self.conn.resume(PAUSE_QUEUE)
        self.shared.stats.limit_rejection(reason)
        self.up_buf = []
        self.error = reason
        self.answer(Kind.OVERLOADED)

    # ------------------------------------------------------------------
    # Proxying.

    def _proxy(self, route: Route) -> None:
        head = self.head
        plan = self.plan
        assert plan is not None
        bal = self.balancer = plan.balancer
        rstats = self.rstats = bal.rstats
        rstats.in_flight += 1
        if head.expect_continue and head.has_body and not self.request_done:
            self.conn.out.append(_CONTINUE)
        if bal.single:
            self._send_to(bal.first)
            return
        lane = bal.pick(self.shared.loop.time(), 0)
        assert lane is not None  # nothing tried yet: some backend is left
        self._keep_copy(bal)
        self._send_to(lane)

    def client_write_paused(self, paused: bool) -> None:
        """The client stopped (or resumed) reading: so does the upstream."""
        up = self.upstream
        if up is None:
            return
        if paused:
            up.pause_reading()
        else:
            up.resume_reading()
            self.conn.set_deadline(_UPSTREAM, self.gen.response_timeout)

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
        """``headers``: the upstream's end-to-end fields, already filtered."""
        if status >= 400:
            if self._answer_failed(status):
                return  # retried on another backend: none of this answer goes out
        else:
            lane = self.lane
            if lane is not None and (lane.state.fails or lane.state.ejections):
                self._recovered(lane)
        if self.replay_held or self.replay is not None:
            self.drop_copy()  # an answer has started: never replayed from here
        self.upstream_seconds = _perf() - self.t_sent
        self.status = status
        self.state = _RESPONDING
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
        self.conn.set_deadline(_UPSTREAM, self.gen.response_timeout)

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            self.conn.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.conn.out.append(data)
        self.conn.set_deadline(_UPSTREAM, self.gen.response_timeout)

    def response_complete(self) -> None:
        if self.chunked_out:
            self.conn.out.append(b"0\r\n\r\n")
        self.state = _ANSWERED
        lane = self.lane
        if lane is not None:
            self.lane = None
            lane.state.outstanding -= 1
        up, self.upstream = self.upstream, None
        pool, self.pool = self.pool, None
        if up is not None and pool is not None:
            if self.request_done:
                pool.release(up, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                up.abort()  # it answered early; the rest of our body is not wanted
        self._maybe_finish()

    def upstream_paused(self, paused: bool) -> None:
        conn = self.conn
        if paused:
            conn.pause(PAUSE_UPSTREAM)
            conn.set_deadline(_UPSTREAM, self.gen.response_timeout)
        else:
            conn.resume(PAUSE_UPSTREAM)
            if not self.request_done:
                conn.set_deadline(_BODY, self.gen.body_idle_timeout)

    def flush_client(self) -> None:
        self.conn.flush()
