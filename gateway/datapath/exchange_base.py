"""What every exchange has: its state, the answers the gateway makes itself,
and its endings.  ``exchange.py`` adds deciding and proxying on top.

The response side moves through ``State`` in order; the request side is
one flag, ``request_done``, set when the client's message is complete:

    WAITING → DECIDING ─┬─ (local answer) ─────────────────────────────┐
                        ├─ PROBING (deep /health) ─────────────────────┤
                        └─ QUEUED → CONNECTING → SENT → RESPONDING ────┴→ ANSWERED → FINISHED
                           (a failure or refusal skips ahead)  └→ CLOSING ────────────→ FINISHED

Body bytes go upstream only in QUEUED..RESPONDING.  An exchange finishes
when it is ANSWERED and its request body has been read, or when the
connection is being closed.  Aborts never send a final chunk upstream, so
an upstream never sees a truncated body as complete.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Final

from gateway.datapath.accounting import account
from gateway.datapath.health import (
    DEEP_TIMEOUT_SECONDS,
    health_answer,
    upstreams_of,
    wants_deep,
)
from gateway.datapath.ports import PAUSE_CONNECT, PAUSE_UPSTREAM, ClientPort, Deadline
from gateway.policy.errors import CLIENT_CLOSED, Kind, Protocol

if TYPE_CHECKING:
    from gateway.datapath.ports import UpstreamPool, UpstreamPort
    from gateway.datapath.shared import Shared
    from gateway.policy.auth import Failure, Principal
    from gateway.policy.balance import Balancer, Lane
    from gateway.policy.decide import Refuse
    from gateway.policy.limits import Slots
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Plan, Route, Target
    from gateway.telemetry.counters import RouteStats

__all__ = ["DISCARD_LIMIT", "ExchangeBase", "State"]

# A request answered without proxying still has its body on the wire: up to
# this size it is read and dropped to keep the connection; beyond, the
# connection is closed after the answer.
DISCARD_LIMIT: Final = 256 * 1024


class State(enum.IntEnum):
    WAITING = 0  # parsed behind the exchange in flight (pipelined); body kept
    DECIDING = 1  # being dispatched
    PROBING = 2  # deep /health: the upstream probes run
    QUEUED = 3  # waiting for a concurrency slot
    CONNECTING = 4  # waiting for an upstream connection
    SENT = 5  # the request streams upstream; no response head yet
    RESPONDING = 6  # the response head went to the client; its body streams
    CLOSING = 7  # gave up after the response started: the connection closes
    ANSWERED = 8  # the whole answer went out; a request body may still arrive
    FINISHED = 9  # accounted


# Plain ints: CPython 3.11 specialises comparisons of exact ints only, and
# the state is compared on every callback (``self.state`` holds these).
_WAITING: Final = int(State.WAITING)
_PROBING: Final = int(State.PROBING)
_RESPONDING: Final = int(State.RESPONDING)
_CLOSING: Final = int(State.CLOSING)
_ANSWERED: Final = int(State.ANSWERED)
_FINISHED: Final = int(State.FINISHED)
_BODY: Final = int(Deadline.BODY)


class ExchangeBase:
    """An exchange's state, the answers the gateway makes itself, its endings."""

    __slots__ = (
        "_body_t0",
        "_early",
        "_early_done",
        "_held",
        "_queued_on",
        "_task",
        "balancer",
        "body_in",
        "bytes_out",
        "chunked_out",
        "client",
        "close",
        "conn",
        "credential",
        "error",
        "gen",
        "head",
        "history",
        "label",
        "lane",
        "limit",
        "plan",
        "pool",
        "principal",
        "protocol",
        "replay",
        "replay_held",
        "replay_tail",
        "request_done",
        "retried",
        "route",
        "route_name",
        "rstats",
        "shared",
        "state",
        "status",
        "t_sent",
        "target",
        "token_id",
        "tried",
        "up_buf",
        "upstream",
        "upstream_seconds",
    )

    def __init__(self, conn: ClientPort, shared: Shared, head: RequestHead) -> None:
        self.conn = conn
        self.shared = shared
        self.gen = shared.gen
        self.head = head
        self.state = _WAITING  # a State value
        self.request_done = False
        self.close = False  # the connection ends after this exchange
        self.chunked_out = False
        self.route: Route | None = None
        self.target: Target | None = None  # what is sent upstream, once admitted
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
        self.upstream: UpstreamPort | None = None
        self.pool: UpstreamPool | None = None
        self.rstats: RouteStats | None = None
        self.up_buf: list[bytes] = []
        self.t_sent = 0.0
        self.upstream_seconds = -1.0
        # Backends (failover.py): the set, the lane of the attempt in flight,
        # the label of the last one tried, the lanes tried (a bit each).
        self.plan: Plan | None = None  # the route's or the credential's, once admitted
        self.balancer: Balancer | None = None
        self.lane: Lane | None = None
        self.label = ""
        self.tried = 0
        # The body's copy for a replay, payload only (None: none kept, or no
        # longer copied): pieces of at least _SMALL_PIECE bytes, and small
        # ones gathered in ``replay_tail`` until it makes one; and the bytes
        # reserved for it of the worker's replay memory, held until the
        # answer starts or the exchange ends, even once the copy is no
        # longer added to, since the last attempt's replay may still be in
        # the process.
        self.replay: list[bytes] | None = None
        self.replay_tail: bytearray | None = None
        self.replay_held = 0
        # Only once a request is retried: labels tried, failures retried.
        self.history: list[str] | None = None
        self.retried: list[str] | None = None
        # The event loop keeps only a weak reference to tasks: hold ours so a
        # pending connect or deep probe cannot be collected mid-flight.
        self._task: object = None
        self._early: list[bytes] | None = None  # body parsed while WAITING
        self._early_done = False
        self._held: list[Slots] = []  # concurrency slots to release at the end
        self._queued_on: Slots | None = None
        self._body_t0 = 0.0

    @property
    def finished(self) -> bool:
        return self.state == _FINISHED

    # ------------------------------------------------------------------
    # Answers the gateway makes itself.

    def _refuse(self, d: Refuse, who: Principal | Failure | None) -> None:
        stats = self.shared.stats
        if d.limit:
            stats.limit_rejection(d.limit)
        if d.auth and who is not None:
            stats.auth_failure(d.auth, who.credential, who.token_id)
        self.error = d.error
        if d.close:
            self.close = True
        if d.otlp:
            self.protocol = Protocol.OTLP
        route = self.route
        self.answer(d.kind, route.allow_line if d.allow and route is not None else b"")

    def answer(self, kind: Kind, extra: bytes = b"") -> None:
        head = self.head
        self._close_if_body_left()
        status, data, body_len = self.gen.errors.render(
            kind,
            self.protocol,
            head.json,
            self.shared.date_line,
            self.close,
            extra,
            head.method == b"HEAD",
        )
        self._answered(status, data, body_len)
        self._maybe_finish()

    def _close_if_body_left(self) -> None:
        """Before a local answer: whether the connection can stay open."""
        head = self.head
        if (
            not self.request_done
            and head.has_body
            and (
                head.expect_continue
                or head.content_length is None
                or head.content_length > DISCARD_LIMIT
            )
        ):
            # Too much body left to read and drop; or the client waits
            # for a 100 Continue that will not come and may rightly never
            # send the body (RFC 9110 §10.1.1): its next bytes could be
            # either, so the connection ends after this answer.
            self.close = True
        if not head.keep_alive or self.shared.draining:
            self.close = True

    def _answered(self, status: int, data: bytes, body_len: int) -> None:
        self.status = status
        self.bytes_out += body_len
        self.state = _ANSWERED
        self.conn.out.append(data)
        if not self.close and not self.request_done and self.head.has_body:
            # The rest of the body is read and dropped, as long as it flows.
            self.conn.set_deadline(_BODY, self.gen.body_idle_timeout)

    def health(self, principal: Principal) -> None:
        if wants_deep(self.head.query):
            # Reading pauses while the probe runs, so answers stay in order.
            self.state = _PROBING
            self.conn.pause(PAUSE_CONNECT)
            self.conn.clear_deadline()
            self._task = self.shared.loop.create_task(self._deep_health(principal))
            return
        self._health_answer(principal, None)

    async def _deep_health(self, principal: Principal) -> None:
        timeout = min(self.gen.connect_timeout, DEEP_TIMEOUT_SECONDS)
        try:
            probed = upstreams_of(principal, self.gen.routes.routes)
            upstreams = await self.shared.probe.check(probed, timeout)
        finally:
            self.conn.resume(PAUSE_CONNECT)
        if self.state == _PROBING:
            self._health_answer(principal, upstreams)
            self.conn.flush()

    def _health_answer(self, principal: Principal, upstreams: dict[str, list[bool]] | None) -> None:
        head = self.head
        self._close_if_body_left()
        status, data, body_len = health_answer(
            principal,
            time.time(),
            upstreams,
            self.shared.date_line,
            self.close,
            head.method == b"HEAD",
        )
        self._answered(status, data, body_len)
        self._maybe_finish()

    def fault(self, exc: BaseException) -> None:
        """A bug on our side: 503 if nothing was sent yet, else close."""
        self.shared.log.error("internal_error", error=type(exc).__name__, exc_info=exc)
        self._abort(Kind.INTERNAL, "internal")

    def bad_body(self, kind: Kind = Kind.BAD_REQUEST) -> None:
        """The body broke HTTP framing (e.g. an invalid chunk size), or its
        trailer the head limits (``Kind.HEADERS_TOO_LARGE``)."""
        self._abort(kind, "bad_body" if kind is Kind.BAD_REQUEST else "trailer_too_large")

    def client_timeout(self) -> None:
        """No body bytes for body_idle_timeout seconds, or below the minimum rate."""
        self._abort(Kind.CLIENT_TIMEOUT, "client_timeout")

    def _abort(self, kind: Kind, error: str) -> None:
        """Give up on the request: the upstream never sees it complete; the
        client gets ``kind`` if nothing was sent yet, else the connection
        closes under the response."""
        self.error = error
        self._drop_upstream()
        if self.state < _RESPONDING:
            self.close = True
            self.answer(kind)
            return
        if self.state == _RESPONDING:
            self.state = _CLOSING
        self.conn.close_now()

    def _drop_upstream(self) -> None:
        """Abort the upstream request: it must never see a complete body."""
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.state.outstanding -= 1
        if self.replay_held or self.replay is not None:
            self.drop_copy()
        self.up_buf = []
        up, self.upstream = self.upstream, None
        self.pool = None
        if up is not None:
            up.abort()
        self.conn.resume(PAUSE_CONNECT | PAUSE_UPSTREAM)

    # ------------------------------------------------------------------
    # Endings.

    def client_lost(self) -> None:
        """The client connection closed under us."""
        if self.state == _FINISHED:
            return
        if self.state < _ANSWERED:
            self.status = CLIENT_CLOSED
            self.error = self.error or "client_closed"
        self._drop_upstream()
        self.request_done = True
        self._finish()

    def _maybe_finish(self) -> None:
        if self.state == _ANSWERED and (self.request_done or self.close):
            self._finish()
            self.conn.exchange_finished(self)

    def _finish(self) -> None:
        self.state = _FINISHED
        if self.replay_held or self.replay is not None:
            self.drop_copy()
        if self.rstats is not None:
            self.rstats.in_flight -= 1
        body_bytes = (
            self.shared.admission.byte_rate.get(self.credential) if self.principal else None
        )
        if body_bytes is not None:
            body_bytes.spend(self.body_in)  # paid after the fact; admission waits for repayment
        account(self.shared, self)
        self._release()

    def _release(self) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
        held, self._held = self._held, []
        for slots in held:
            slots.release()

    def drop_copy(self) -> None:
        """Let go of the body's replay copy and the memory it held."""
        self.replay = self.replay_tail = None
        self.shared.stats.replay_bytes -= self.replay_held
        self.replay_held = 0

    def admitted(self) -> None:
        """A slot freed up for this queued exchange (called by ``Slots``)."""
