"""What every gRPC stream has: its state, the answers the gateway makes
itself (trailers-only, from ``policy/errors.py``'s table), its endings and
its deadlines.  ``grpc_exchange.py`` adds deciding and the relay on top,
as ``exchange.py`` does over ``exchange_base.py`` for HTTP/1.1.

A stream uses the HTTP/1.1 exchange's ``State`` values: DECIDING → [QUEUED
→ CONNECTING → SENT → RESPONDING] → ANSWERED → FINISHED.  It finishes when
it is answered and the request side is over (ended, or reset by us with
NO_ERROR after an early answer, RFC 9113 §8.1).

Must not know: the connection classes, h2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from gateway.datapath.accounting import account
from gateway.datapath.exchange_base import State
from gateway.policy.errors import CLIENT_CLOSED, Kind, grpc_trailers_only, status_of
from gateway.policy.errors import Protocol as Wire

if TYPE_CHECKING:
    from gateway.datapath.h2upstream import H2Upstream
    from gateway.datapath.shared import Shared
    from gateway.policy.auth import Principal
    from gateway.policy.limits import Slots
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route, Target
    from gateway.telemetry.counters import RouteStats

__all__ = ["D_BODY", "D_NONE", "D_QUEUE", "D_UPSTREAM", "D_WRITE", "GrpcStream", "StreamPort"]

Headers = list[tuple[bytes, bytes]]

_DECIDING, _QUEUED, _CONNECTING = int(State.DECIDING), int(State.QUEUED), int(State.CONNECTING)
_SENT, _RESPONDING = int(State.SENT), int(State.RESPONDING)
_ANSWERED, _FINISHED = int(State.ANSWERED), int(State.FINISHED)
# Which of the stream's timeouts is running (checked by the connection's sweep).
D_NONE, D_BODY, D_UPSTREAM, D_QUEUE, D_WRITE = range(5)

_FAILURES = {
    "connect": Kind.UPSTREAM_CONNECT,
    "reset": Kind.UPSTREAM_RESET,
    "protocol": Kind.UPSTREAM_PROTOCOL,
    "timeout": Kind.UPSTREAM_TIMEOUT,
}
# The trailers of a response cut short after its headers went out: the
# client must see a retryable status, not a short success.
_CUT = [(b"grpc-status", b"14"), (b"grpc-message", b"upstream connection failed")]
_NO_ERROR = 0


class StreamPort(Protocol):
    """What a gRPC exchange may do to its client connection."""

    peer: str
    peer_bytes: bytes
    scheme: bytes
    cert_subject: str

    def send_headers(self, sid: int, headers: Headers, end: bool) -> None: ...
    def send_data(self, sid: int, data: bytes, end: bool) -> None: ...
    def window(self, sid: int) -> int: ...
    def ack(self, sid: int, n: int) -> None: ...
    def reset(self, sid: int, code: int) -> None: ...
    def touched(self, up: H2Upstream) -> None: ...
    def flush(self) -> None: ...
    def stream_finished(self, sid: int) -> None: ...


class GrpcStream:
    """One HTTP/2 stream carrying a gRPC call: state, answers, endings."""

    __slots__ = (
        "_body_t0",
        "_held",
        "_queued_on",
        "_req",
        "_resp",
        "_task",
        "_trailers",
        "body_in",
        "bytes_out",
        "client",
        "conn",
        "credential",
        "deadline",
        "dkind",
        "end_sent",
        "error",
        "gen",
        "grpc_status",
        "head",
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
        "up",
        "up_sid",
        "upstream_seconds",
    )

    def __init__(self, conn: StreamPort, shared: Shared, sid: int, head: RequestHead) -> None:
        self.conn = conn
        self.shared = shared
        self.gen = shared.gen
        self.sid = sid
        self.head = head
        self.state = _DECIDING
        self.request_done = not head.has_body
        self.end_sent = False
        self.responded = False  # response headers went to the client
        self.route: Route | None = None
        self.target: Target | None = None  # what is sent upstream, once admitted
        self.route_name = "unmatched"
        self.principal: Principal | None = None
        self.credential = "none"
        self.token_id = ""
        self.client = conn.peer
        self.status = 0
        self.grpc_status = ""
        self.error = ""
        self.body_in = 0
        self.bytes_out = 0
        self.limit = 0
        self.rstats: RouteStats | None = None
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self.t_sent = 0.0
        self.upstream_seconds = -1.0
        self.deadline = 0.0
        self.dkind = D_NONE
        self._req: list[tuple[bytes, int]] = []  # (data, flow-controlled length) to forward
        self._resp: list[tuple[bytes, int]] = []
        self._trailers: Headers | None = None
        self._held: list[Slots] = []
        self._queued_on: Slots | None = None
        self._body_t0 = 0.0
        self._task: object = None

    # ------------------------------------------------------------------
    # Answers and endings.

    def answer(self, kind: Kind) -> None:
        """A trailers-only gRPC answer made here (HTTP 200, grpc-status)."""
        self.status = status_of(kind, Wire.GRPC)
        self.grpc_status = str(grpc_trailers_only(kind)[2][1], "ascii")
        self.conn.send_headers(self.sid, grpc_trailers_only(kind), True)
        self._answered()

    def _answered(self) -> None:
        self.state = _ANSWERED
        self.dkind = D_NONE
        if self.up is not None:
            self.up.release(self.up_sid)
            self.up = None
        if not self.request_done:
            # RFC 9113 §8.1: answered before the request ended, the stream
            # is reset with NO_ERROR so the client stops sending.
            self.conn.reset(self.sid, _NO_ERROR)
            for _, flow in self._req:
                self.conn.ack(self.sid, flow)
            self._req = []
            self.request_done = True
        self._maybe_finish()

    def _abort(self, kind: Kind, error: str) -> None:
        self.error = error
        self._drop_upstream()
        if not self.responded:
            self.answer(kind)
        else:
            self.conn.reset(self.sid, 8)  # CANCEL: the response cannot be completed
            self.state = _ANSWERED
            self.request_done = True
            self._maybe_finish()

    def _drop_upstream(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.cancel(self.up_sid)
            self.conn.touched(up)
        if self.state == _QUEUED and self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None

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
        body_bytes = self.shared.admission.byte_rate.get(self.credential)
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

    def _overloaded(self, reason: str) -> None:
        if self._queued_on is not None:
            self._queued_on.forget(self)
            self._queued_on = None
        self.shared.stats.limit_rejection(reason)
        self.error = reason
        self.answer(Kind.OVERLOADED)

    def admitted(self) -> None:
        """A slot freed up for this queued stream (called by ``Slots``)."""

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
