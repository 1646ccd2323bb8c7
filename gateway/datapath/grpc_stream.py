"""What a gRPC stream adds to every HTTP/2 stream (``h2stream.py``): the
answers the gateway makes itself (trailers-only, from ``policy/errors.py``'s
table), and its upstream stream on an ``H2Upstream``.
``grpc_exchange.py`` adds deciding and the relay on top, as
``exchange.py`` does over ``exchange_base.py`` for HTTP/1.1.

Must not know: the connection classes, h2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.datapath.exchange_base import State
from gateway.datapath.h2stream import D_NONE, H2Stream, Headers, StreamPort
from gateway.policy.errors import Kind, grpc_trailers_only, status_of
from gateway.policy.errors import Protocol as Wire

if TYPE_CHECKING:
    from gateway.datapath.h2upstream import H2Upstream
    from gateway.datapath.shared import Shared
    from gateway.policy.request import RequestHead

__all__ = ["GrpcStream"]

_QUEUED, _ANSWERED = int(State.QUEUED), int(State.ANSWERED)
_NO_ERROR = 0


class GrpcStream(H2Stream):
    """One HTTP/2 stream carrying a gRPC call: its answers and its upstream stream."""

    __slots__ = ("_req", "_resp", "_trailers", "end_sent", "up", "up_sid")

    def __init__(self, conn: StreamPort, shared: Shared, sid: int, head: RequestHead) -> None:
        super().__init__(conn, shared, sid, head)
        self.grpc_status = ""
        self.end_sent = False
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self._req: list[tuple[bytes, int]] = []  # (data, flow-controlled length) to forward
        self._resp: list[tuple[bytes, int]] = []
        self._trailers: Headers | None = None

    def answer(self, kind: Kind) -> None:
        """A trailers-only gRPC answer made here (HTTP 200, grpc-status)."""
        fields = grpc_trailers_only(kind)
        self.status = status_of(kind, Wire.GRPC)
        self.grpc_status = str(fields[2][1], "ascii")
        self.conn.send_headers(self.sid, fields, True)
        self._answered()

    def _answered(self) -> None:
        self.state = _ANSWERED
        self.dkind = D_NONE
        up, self.up = self.up, None
        if up is not None and self.end_sent:
            up.release(self.up_sid)
        elif up is not None:
            # The upstream answered before our request ended: ending our
            # side frees the stream (a half-open one holds a slot for good).
            up.cancel(self.up_sid)
            self.conn.touched(up)
        if not self.request_done:
            # RFC 9113 §8.1: answered before the request ended, the stream
            # is reset with NO_ERROR so the client stops sending.
            self.conn.reset(self.sid, _NO_ERROR)
            for _, flow in self._req:
                self.conn.ack(self.sid, flow)
            self._req = []
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
