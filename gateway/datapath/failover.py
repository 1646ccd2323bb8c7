"""Attempts: a proxied request on one backend after another.

An exchange's request goes to the backend its balancer picks (a route's
own; issue 13 lets a credential bring another).  Each attempt builds the
head for that backend, takes a pooled connection or connects, and counts
against the backend's state (requests outstanding, failures, passive
ejection).  When the attempt fails before the backend answered (refused,
reset or closed before a status line, timed out, an invalid answer, or a
status of the route's ``retry_statuses``), the request is tried on
another backend while ``attempts`` and the body allow: with nothing of
the body sent yet (a failed connect) it goes as it is; otherwise only
with the whole body, from the replay copy kept while it streamed.

The copy is the body's payload (no chunk framing; a chunked body is
replayed as one chunk): pieces of SMALL_PIECE bytes or more are the same
objects that went upstream, smaller ones are gathered into SEALED_PIECE
pieces, so its real memory is what it reserves (within ~1 %) however small
the pieces the body arrived in.  It reserves from the worker's ``[upstream]
replay_memory_bytes``: the whole length up front for a known length,
doubling steps for a chunked body, up to the route's
``replay_buffer_bytes``.  A body that does not fit streams
without a copy (``gateway_replay_skipped_total``).  Copying stops on the
last attempt, but the reservation is held until an answer starts (never
replayed after that) or the exchange ends: the replayed bytes may still
wait in this process for a slow backend.  The client sees the protocol's
failure answer only when every attempt failed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from gateway.datapath.exchange_base import ExchangeBase, State
from gateway.datapath.passive import BACKEND_KINDS, backend_failed, backend_recovered
from gateway.datapath.ports import PAUSE_CONNECT, PAUSE_UPSTREAM, Deadline
from gateway.policy.errors import Kind

if TYPE_CHECKING:
    from gateway.datapath.ports import UpstreamPool, UpstreamPort
    from gateway.policy.balance import Balancer, Lane
    from gateway.policy.routing import Target

__all__ = ["SEALED_PIECE", "SMALL_PIECE", "Failover"]

_FAILURES: Final = {
    "connect": Kind.UPSTREAM_CONNECT,
    "connect_timeout": Kind.UPSTREAM_CONNECT,  # unreachable: nothing was sent
    "timeout": Kind.UPSTREAM_TIMEOUT,
    "reset": Kind.UPSTREAM_RESET,
    "protocol": Kind.UPSTREAM_PROTOCOL,
    "internal": Kind.INTERNAL,
}
# upstream_errors_total{kind} values: connect, timeout, reset, protocol.
_ERROR_LABEL: Final = {"connect_timeout": "connect", "internal": "internal"}

_CONNECTING: Final = int(State.CONNECTING)
_SENT: Final = int(State.SENT)
_RESPONDING: Final = int(State.RESPONDING)
_ANSWERED: Final = int(State.ANSWERED)
_BODY: Final = int(Deadline.BODY)
_UPSTREAM: Final = int(Deadline.UPSTREAM)
_perf: Final = time.perf_counter
# A chunked body's copy reserves replay memory in steps from this size.
_FIRST_STEP: Final = 64 * 1024
# Body pieces at least this long are kept in the copy as they are (the
# object's ~41 bytes of header and list slot are at most 1 %); shorter ones
# are copied into one buffer, kept as one piece of SEALED_PIECE bytes.
SMALL_PIECE: Final = 4096
SEALED_PIECE: Final = 64 * 1024


class Failover(ExchangeBase):
    """Attempts on backends, failover, and the body's replay copy."""

    __slots__ = ()

    # ------------------------------------------------------------------
    # One attempt.

    def _send_to(self, lane: Lane) -> None:
        """Start an attempt on ``lane``'s backend: its request head replaces
        ``up_buf[0]``, the body so far follows."""
        self.lane = lane
        self.label = lane.backend.label
        self.tried |= lane.bit
        lane.state.outstanding += 1
        lane.stats.requests += 1
        if self.replay is not None and self.tried.bit_count() >= self.balancer.attempts:  # type: ignore[union-attr]
            # The last attempt: nothing will be sent again, so copying
            # stops; the reservation stays (replay_held) while what was
            # replayed may still sit in this process.
            self.replay = self.replay_tail = None
        head, conn, gen, client = self.head, self.conn, self.gen, self.client
        plan = self.plan
        assert plan is not None
        target = self.target = plan.targets[lane.backend.index]
        first = self.tried == lane.bit  # what the client may not send is counted once
        query = head.query
        # A filtered query costs a parse only when the client sent one.
        if query and target.query is not None:
            request_target = self._filter_query(target, query, first)
        else:
            request_target = target.render(query)
        pinned = target.headers
        self.up_buf[0] = head.upstream_head(
            request_target,
            target.upstream.host_header,
            conn.peer_bytes,
            gen.clients.proxied and gen.clients.trusted(conn.peer),
            conn.scheme,
            conn.peer_bytes if client is conn.peer else client.encode(),
            gen.underscores_in_headers,
            pinned,
        )
        if first:
            stats = self.shared.stats
            if head.underscored:
                # upstream_head has folded what config keeps, left what it dropped.
                stats.header_dropped("underscore", len(head.underscored) // 2)
            if pinned is not None and head.pinned_dropped:
                stats.overrides_dropped(self.credential, "header", head.pinned_dropped)
        pool = self.pool = lane.pool
        upstream = pool.acquire()
        if upstream is not None:
            self._attach(upstream)
        else:
            # Reading waits for the connection (bounded by connect_timeout),
            # so no body-idle deadline may blame the client meanwhile.
            self.state = _CONNECTING
            conn.pause(PAUSE_CONNECT)
            conn.clear_deadline()
            self._task = self.shared.loop.create_task(self._connect(pool, self.tried))

    def _filter_query(self, target: Target, query: bytes, count: bool) -> bytes:
        """The request-target with what the client may not set removed
        (counted on the first attempt)."""
        request_target, labels, others = target.filtered(query)
        if count:
            stats = self.shared.stats
            if labels:
                stats.overrides_dropped(self.credential, "extra_label", labels)
            if others:
                stats.overrides_dropped(self.credential, "query_arg", others)
        return request_target

    async def _connect(self, pool: UpstreamPool, tried: int) -> None:
        try:
            conn = await pool.connect(self.gen.connect_timeout)
        except TimeoutError:
            self._connect_failed(tried, "connect_timeout")
        except OSError:
            self._connect_failed(tried, "connect")
        except Exception as exc:  # noqa: BLE001  (resolver and ssl errors are not OSErrors)
            self.shared.log.warning(
                "upstream_connect_error", route=self.route_name, error=type(exc).__name__
            )
            self._connect_failed(tried, "connect")
        else:
            if self.state != _CONNECTING or self.tried != tried:
                pool.release(conn, self.shared.loop.time() + self.gen.pool_idle_timeout)
            else:
                self._attach(conn)
                self.flush_upstream()
                self.conn.resume(PAUSE_CONNECT)
        finally:
            self.conn.flush()

    def _connect_failed(self, tried: int, kind: str) -> None:
        if self.state == _CONNECTING and self.tried == tried:
            self.upstream_failed(kind)

    def _attach(self, conn: UpstreamPort) -> None:
        conn.attach(self)  # type: ignore[arg-type]  # Exchange, the subclass, is the ResponseSink
        self.upstream = conn
        self.state = _SENT
        self.t_sent = _perf()
        # Whatever deadline waited before (the queue's, none while
        # connecting) ends here: now the body must flow, or the upstream answer.
        if not self.request_done:
            if self.head.has_body:
                self.conn.set_deadline(_BODY, self.gen.body_idle_timeout)
        else:
            self.conn.set_deadline(_UPSTREAM, self.gen.response_timeout)

    # ------------------------------------------------------------------
    # Failures and failover.

    def upstream_failed(self, kind: str) -> None:
        """The attempt failed (``kind``: connect, connect_timeout, timeout,
        reset, protocol): another backend, or the protocol's answer."""
        state = self.state
        if state > _RESPONDING:
            return
        self.shared.stats.upstream_error(self.route_name, _ERROR_LABEL.get(kind, kind))
        self._attempt_failed(kind)
        if state < _RESPONDING and self._retry(kind):
            return
        self.error = "upstream_" + kind
        self._drop_upstream()
        if state < _RESPONDING:
            self.answer(_FAILURES[kind])
        else:
            # Status already sent: cut the connection so the client sees a
            # truncated response and retries, rather than a short success.
            self.state = _ANSWERED
            self.close = True
            self.conn.close_now()
            self._maybe_finish()

    def upstream_timeout(self) -> None:
        self.upstream_failed("timeout")

    def _failure(self, lane: Lane, kind: str) -> None:
        """Count a failure against ``lane``'s backend; eject it if it is one too many."""
        bal = self.balancer
        assert bal is not None
        backend_failed(self.shared, bal, lane, kind)

    def _attempt_failed(self, kind: str) -> None:
        """The attempt in flight failed: it ends, and counts against its backend."""
        lane, self.lane = self.lane, None
        if lane is None:
            return
        lane.state.outstanding -= 1
        self._failure(lane, BACKEND_KINDS.get(kind, kind))

    def _recovered(self, lane: Lane) -> None:
        """An answer from a backend that had failed: healthy again."""
        backend_recovered(self.shared, self.route_name, lane)

    def _answer_failed(self, status: int) -> bool:
        """An answer of 4xx/5xx: whether it counts against the backend, and
        whether the request goes to another backend instead (True: nothing
        of this answer may reach the client)."""
        bal, lane = self.balancer, self.lane
        if bal is None or lane is None:
            return False
        retryable = status in bal.set.retry_statuses
        if not retryable:
            if status >= 500:
                self._failure(lane, "status")
            elif lane.state.fails or lane.state.ejections:
                self._recovered(lane)
            return False
        self._attempt_failed("status")
        return self._retry("status")

    def _retry(self, kind: str) -> bool:
        """Send the request to another backend, if one is left to try,
        attempts allow and the body can go again whole; True if it went."""
        bal = self.balancer
        if bal is None or bal.single or self.tried.bit_count() >= bal.attempts:
            return False
        sent = self.state == _SENT  # failed with bytes on the wire
        if sent and self.replay is None:
            return False
        lane = bal.pick(self.shared.loop.time(), self.tried)
        if lane is None:
            return False
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()  # whatever it was doing, it gets nothing more
        rstats = self.rstats
        assert rstats is not None
        rstats.retries[kind] = rstats.retries.get(kind, 0) + 1
        if self.history is None or self.retried is None:
            self.history, self.retried = [self.label], []
        self.retried.append(kind)
        if sent:
            self._replay_body()
        self.conn.resume(PAUSE_UPSTREAM)  # the next connection starts unpaused
        self._send_to(lane)
        self.history.append(self.label)
        if self.state == _SENT:  # a pooled connection: send at once
            self.conn.resume(PAUSE_CONNECT)
            self.flush_upstream()
        return True

    def _replay_body(self) -> None:
        """``up_buf`` after the head: the body so far, from the copy,
        framed as one chunk if chunked."""
        replay, tail, body = self.replay, self.replay_tail, self.body_in
        assert replay is not None
        if tail:
            replay.append(bytes(tail))  # the copy stays whole for another attempt
            tail.clear()
        rstats = self.rstats
        assert rstats is not None
        rstats.replayed_bytes += body
        if not self.head.chunked:
            self.up_buf = [b"", *replay]
            return
        self.up_buf = [b"", b"%x\r\n" % body, *replay, b"\r\n"] if body else [b""]
        if self.request_done:
            self.up_buf.append(b"0\r\n\r\n")

    def flush_upstream(self) -> None:
        up = self.upstream
        if up is not None and self.up_buf:
            up.send(self.up_buf)
            self.up_buf = []

    # ------------------------------------------------------------------
    # The body's replay copy.

    def _keep_copy(self, bal: Balancer) -> None:
        """Before the first attempt of a route with several backends: copy
        the body as it streams, if it fits the route's and the worker's bounds."""
        head = self.head
        if not head.has_body:
            self.replay = []
            return
        limit = bal.set.replay_bytes
        if not limit:
            return
        length = head.content_length if not head.chunked else None
        body = self.body_in  # parsed while queued, in up_buf after the head
        if (length if length is not None else body) > limit:
            self._no_copy("too_large")
            return
        # A chunked body reserves a first step, or what was read while queued.
        want = length if length is not None else min(limit, max(_FIRST_STEP, body))
        stats = self.shared.stats
        if stats.replay_bytes + want > self.gen.replay_memory_bytes:
            self._no_copy("memory")
            return
        stats.replay_bytes += want
        self.replay_held = want
        self.replay_tail = bytearray()
        # Chunked, up_buf holds (size line, data, CRLF) per chunk: joined,
        # the pieces read while queued cost their bytes, not their number.
        pieces = self.up_buf[2::3] if head.chunked else self.up_buf[1:]
        self.replay = [b"".join(pieces)] if body else []
        if length is None:
            self.limit = min(self.limit, want)  # grow the reservation there

    def _no_copy(self, reason: str) -> None:
        rstats = self.rstats
        assert rstats is not None
        rstats.replay_skipped[reason] = rstats.replay_skipped.get(reason, 0) + 1

    def _over_limit(self) -> bool:
        """``body_in`` passed ``limit``: the route's body cap (413, True), or
        the reservation of a chunked body's copy, which grows or is dropped."""
        route = self.route
        assert route is not None
        cap = route.max_body_bytes
        if self.body_in > cap:
            self._abort(Kind.TOO_LARGE, "body_too_large")
            return True
        bal = self.balancer
        if self.replay is not None and bal is not None:
            limit = bal.set.replay_bytes
            want = min(limit, max(2 * self.replay_held, self.body_in))
            stats = self.shared.stats
            if self.body_in > limit:
                self.drop_copy()
                self._no_copy("too_large")
            elif stats.replay_bytes - self.replay_held + want > self.gen.replay_memory_bytes:
                self.drop_copy()
                self._no_copy("memory")
            else:
                stats.replay_bytes += want - self.replay_held
                self.replay_held = want
        self.limit = cap if self.replay is None else min(cap, self.replay_held)
        return False
