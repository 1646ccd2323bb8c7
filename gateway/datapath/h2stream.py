"""What every HTTP/2 stream of the public listener has, whatever it carries:
its state, the one policy decision, admission, its endings and deadlines.

Two kinds of stream build on it: a gRPC call relayed to an HTTP/2 upstream
(``grpc_stream.py``, ``grpc_exchange.py``) and a request for an HTTP/1.1
route relayed to that route's HTTP/1.1 upstream (``h2relay.py``).  Both use
the HTTP/1.1 exchange's ``State`` values: DECIDING → [PROBING | QUEUED →
CONNECTING → SENT → RESPONDING] → ANSWERED → FINISHED.  A stream finishes
when it is answered and the request side is over (ended, or reset by us
with NO_ERROR after an early answer, RFC 9113 §8.1).

A subclass supplies ``answer`` (a refusal in its protocol), ``_proxy``,
``_drop_upstream`` and the event handlers the connection calls
(``on_data``, ``on_end``, ``client_window``, ``on_deadline``).

Must not know: the connection classes, h2, either upstream class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from gateway.datapath.accounting import account
from gateway.datapath.exchange_base import State
from gateway.policy.decide import Decision, Refuse, attribution, decide, identify
from gateway.policy.errors import CLIENT_CLOSED, Kind

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared
    from gateway.policy.auth import Principal
    from gateway.policy.limits import Slots
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route, Target
    from gateway.telemetry.counters import RouteStats

__all__ = [
    "D_BODY",
    "D_NONE",
    "D_QUEUE",
    "D_UPSTREAM",
    "D_WRITE",
    "Flushable",
    "H2Stream",
    "Headers",
    "StreamPort",
]

Headers = list[tuple[bytes, bytes]]

_QUEUED, _SENT = int(State.QUEUED), int(State.SENT)
_ANSWERED, _FINISHED = int(State.ANSWERED), int(State.FINISHED)
# Which of the stream's timeouts is running (checked by the connection's sweep).
D_NONE, D_BODY, D_UPSTREAM, D_QUEUE, D_WRITE = range(5)
_CANCEL = 8  # RST_STREAM CANCEL: the response cannot be completed


class Flushable(Protocol):
    """An upstream side a stream fed during an event: written once, at its end."""

    def flush(self) -> None: ...


class StreamPort(Protocol):
    """What a stream may do to its client connection."""

    peer: str
    peer_bytes: bytes
    scheme: bytes
    cert_subject: str

    def send_headers(self, sid: int, headers: Headers, end: bool) -> None: ...
    def send_data(self, sid: int, data: bytes, end: bool) -> None: ...
    def window(self, sid: int) -> int: ...
    def ack(self, sid: int, n: int) -> None: ...
    def reset(self, sid: int, code: int) -> None: ...
    def touched(self, up: Flushable) -> None: ...
    def flush(self) -> None: ...
    def stream_finished(self, sid: int) -> None: ...


class H2Stream:
    """One HTTP/2 stream of the public listener: state, decision, endings."""

    __slots__ = (
        "_body_t0",
        "_held",
        "_queued_on",
        "_task",
        "body_in",
        "bytes_out",
        "client",
        "conn",
        "credential",
        "deadline",
        "dkind",
        "error",
        "gen",
        "grpc_status",
        "head",
        "label",
        "limit",
        "principal",
        "request_done",
        "responded",
        "route",
        "route_name",
        "rstats",
        "shared",
        "sid",
        "state",
        "status",
        "t_sent",
        "target",
        "token_id",
        "upstream_seconds",
    )

    # Finished's failover fields: over HTTP/2 a request has one attempt.
    @property
    def history(self) -> list[str] | None:
        return None

    @property
    def retried(self) -> list[str] | None:
        return None

    def __init__(self, conn: StreamPort, shared: Shared, sid: int, head: RequestHead) -> None:
        self.conn = conn
        self.shared = shared
        self.gen = shared.gen
        self.sid = sid
        self.head = head
        self.state = int(State.DECIDING)
        self.request_done = not head.has_body
        self.responded = False  # response headers went to the client
        self.route: Route | None = None
        self.target: Target | None = None  # what is sent upstream, once admitted
        self.label = ""  # the backend the request went to (its label), once admitted
        self.route_name = "unmatched"
        self.principal: Principal | None = None
        self.credential = "none"
        self.token_id = ""
        self.client = conn.peer
        self.status = 0
        self.grpc_status: str | None = None  # a gRPC call's outcome, for the access line
        self.error = ""
        self.body_in = 0
        self.bytes_out = 0
        self.limit = 0
        self.rstats: RouteStats | None = None
        self.t_sent = 0.0
        self.upstream_seconds = -1.0
        self.deadline = 0.0
        self.dkind = D_NONE
        self._held: list[Slots] = []
        self._queued_on: Slots | None = None
        self._body_t0 = 0.0
        # The loop holds tasks weakly: ours (a connect, a deep probe) is kept here.
        self._task: object = None

    # ------------------------------------------------------------------
    # What a subclass supplies.

    def start(self) -> None:
        raise NotImplementedError

    def answer(self, kind: Kind) -> None:
        """Answer ``kind`` from the status table, in the stream's protocol."""
        raise NotImplementedError

    def _proxy(self, route: Route) -> None:
        raise NotImplementedError

    def _drop_upstream(self) -> None:
        """Give up the upstream side: it must never take the request as complete."""
        raise NotImplementedError

    def on_data(self, data: bytes, flow: int) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        raise NotImplementedError

    def client_window(self) -> None:
        raise NotImplementedError

    def on_deadline(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------
    # Deciding: the one policy every protocol shares.

    def decide(self, route: Route | None) -> Decision:
        """Resolve the client, authenticate and ``policy.decide``; a refusal
        is counted here (limit, auth failure) and its ``error`` taken."""
        head, gen, shared = self.head, self.gen, self.shared
        if route is not None:
            self.route = route
            self.route_name = route.name
        if gen.clients.proxied:
            self.client = gen.clients.resolve(self.conn.peer, head.client_ip)
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
        if not d.anonymous:  # as on HTTP/1.1 (policy.decide.attribution)
            self.principal, self.credential, self.token_id = attribution(who)
        if isinstance(d, Refuse):
            stats = shared.stats
            if d.limit:
                stats.limit_rejection(d.limit)
            if d.auth:
                stats.auth_failure(d.auth, who.credential, who.token_id)
            self.error = d.error
        return d

    # ------------------------------------------------------------------
    # Admission: the HTTP/1.1 exchange's slots and queue.

    def admit(self, route: Route) -> None:
        self.state = _QUEUED
        admission = self.shared.admission
        own = admission.credential_slots.get(self.credential)
        for slots in (own, admission.slots):
            if slots is None or not slots.limit or slots in self._held:
                continue
            if not slots.try_acquire():
                if self._queued_on is slots or slots.enqueue(self):
                    self._queued_on = slots
                    self._set_deadline(D_QUEUE, admission.queue_timeout)
                    return
                self._overloaded("concurrency")
                return
            self._held.append(slots)
        self._queued_on = None
        self._proxy(route)

    def admitted(self) -> None:
        """A slot freed up for this queued stream (called by ``Slots``),
        maybe while another connection handles its event: flush our own."""
        if self.state == _QUEUED and self.route is not None:
            self.admit(self.route)
            self.conn.flush()

    def _overloaded(self, reason: str) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
        self.shared.stats.limit_rejection(reason)
        self.error = reason
        self.answer(Kind.OVERLOADED)

    # ------------------------------------------------------------------
    # Endings.

    def _abort(self, kind: Kind, error: str) -> None:
        """Give up: the upstream never sees the request complete; the client
        gets ``kind`` if no response started, else a reset stream."""
        self.error = error
        self._drop_upstream()
        if not self.responded:
            self.answer(kind)
        else:
            self.conn.reset(self.sid, _CANCEL)
            self.state = _ANSWERED
            self.request_done = True
            self._maybe_finish()

    def client_reset(self) -> None:
        """The client cancelled the stream (RST_STREAM) or the connection went."""
        if self.state == _FINISHED:
            return
        if self.state < _ANSWERED:
            self.status = CLIENT_CLOSED
            self.error = self.error or "client_closed"
        self._drop_upstream()
        self._finish()

    def _maybe_finish(self) -> None:
        if self.state == _ANSWERED and self.request_done:
            self._finish()

    def _finish(self) -> None:
        self.state = _FINISHED
        self.dkind = D_NONE
        if self.rstats is not None:
            self.rstats.in_flight -= 1
        body_bytes = (
            self.shared.admission.byte_rate.get(self.credential) if self.principal else None
        )
        if body_bytes is not None:
            body_bytes.spend(self.body_in)
        account(self.shared, self, self.grpc_status)
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
        held, self._held = self._held, []
        for slots in held:
            slots.release()
        self.conn.stream_finished(self.sid)

    # ------------------------------------------------------------------
    # Deadlines, checked by the connection's sweep.

    def _set_deadline(self, kind: int, timeout: float) -> None:
        self.dkind = kind
        self.deadline = self.shared.loop.time() + timeout

    def _arm(self) -> None:
        if self.state >= _ANSWERED:
            return
        if not self.request_done:
            self._set_deadline(D_BODY, self.gen.body_idle_timeout)
        elif self.state >= _SENT:
            self._set_deadline(D_UPSTREAM, self.gen.response_timeout)

    def too_slow(self, now: float) -> bool:
        """The HTTP/1.1 minimum body rate, for a stream that trickles its body."""
        gen = self.gen
        if not gen.min_body_rate:
            return False
        if self._body_t0 == 0.0:
            self._body_t0 = now
            return False
        elapsed = now - self._body_t0
        return elapsed > gen.min_body_grace and self.body_in < elapsed * gen.min_body_rate
