"""What a stream for an HTTP/1.1 route has over HTTP/2, whatever it is
answered by: the answers the gateway makes itself (``policy/errors.py``'s
table through ``render_h2``, ``/health`` and ``?deep=1`` from
``health.py``), the response sent as the client's window allows, and the
window the client's request body is owed.  ``h2relay.py`` adds deciding and
proxying on top, as ``exchange.py`` does over ``exchange_base.py``.

Must not know: the connection classes, h2, the upstream connection.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.datapath.exchange_base import DISCARD_LIMIT, State
from gateway.datapath.h2stream import D_BODY, D_NONE, D_WRITE, H2Stream
from gateway.datapath.health import (
    DEEP_TIMEOUT_SECONDS,
    health_response,
    upstreams_of,
    wants_deep,
)
from gateway.policy.errors import Kind
from gateway.policy.errors import Protocol as Wire

if TYPE_CHECKING:
    from gateway.datapath.h2stream import Headers, StreamPort
    from gateway.datapath.shared import Shared
    from gateway.policy.request import RequestHead

__all__ = ["H2RelayBase"]

_PROBING, _RESPONDING = int(State.PROBING), int(State.RESPONDING)
_ANSWERED = int(State.ANSWERED)
_NO_ERROR = 0


class H2RelayBase(H2Stream):
    """An HTTP/2 stream with HTTP/1.1 semantics: its answers and response pump."""

    __slots__ = ("_backlog", "_ended", "_resp", "_resp_end", "_resp_len", "protocol")

    def __init__(self, conn: StreamPort, shared: Shared, sid: int, head: RequestHead) -> None:
        super().__init__(conn, shared, sid, head)
        self.protocol = Wire.PLAIN
        self._backlog = 0  # flow-controlled bytes not yet returned to the client
        self._resp: list[bytes] = []  # response body waiting for the client's window
        self._resp_len = 0
        self._resp_end = False  # the whole response is in _resp
        self._ended = False  # END_STREAM went out

    # ------------------------------------------------------------------
    # Answers made here.

    def answer(self, kind: Kind) -> None:
        self._local(kind, b"")

    def _local(self, kind: Kind, allow: bytes) -> None:
        status, fields, body = self.gen.errors.render_h2(
            kind, self.protocol, self.head.json, self.shared.date_line[6:-2]
        )
        if allow:
            fields.append((b"allow", allow))
        self._respond(status, fields, body)

    def _health(self) -> None:
        if wants_deep(self.head.query):
            self.state = _PROBING
            self._task = self.shared.loop.create_task(self._deep_health())
            return
        self._health_answer(None)

    async def _deep_health(self) -> None:
        timeout = min(self.gen.connect_timeout, DEEP_TIMEOUT_SECONDS)
        assert self.principal is not None
        probed = upstreams_of(self.principal, self.gen.routes.routes)
        upstreams = await self.shared.probe.check(probed, timeout)
        if self.state == _PROBING:
            self._health_answer(upstreams)
            self.conn.flush()

    def _health_answer(self, upstreams: dict[str, list[bool]] | None) -> None:
        assert self.principal is not None
        status, body = health_response(self.principal, time.time(), upstreams)
        fields = [
            (b":status", b"%d" % status),
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"content-length", b"%d" % len(body)),
            (b"date", self.shared.date_line[6:-2]),
        ]
        self._respond(status, fields, body)

    def _respond(self, status: int, fields: Headers, body: bytes) -> None:
        self.status = status
        self.responded = True
        self.state = _RESPONDING
        if self.head.method == b"HEAD":
            body = b""
        self.bytes_out += len(body)
        self._ended = not body
        self.conn.send_headers(self.sid, fields, self._ended)
        if body:
            self._resp.append(body)
            self._resp_len += len(body)
        self._resp_end = True
        self._pump()

    def _answered(self) -> None:
        self.state = _ANSWERED
        self.dkind = D_NONE
        if not self.request_done:
            left = self.head.content_length
            if left is not None and left - self.body_in <= DISCARD_LIMIT:
                # As on HTTP/1.1, a short rest of the body is read and
                # dropped (within one body-idle timeout): some clients (curl
                # 7.88) take a reset after the answer for a failed request.
                self._set_deadline(D_BODY, self.gen.body_idle_timeout)
                return
            self._stop_request()
        self._maybe_finish()

    def _stop_request(self) -> None:
        """RFC 9113 §8.1: answered before the request ended, the client is
        asked to stop sending, without an error."""
        self.conn.reset(self.sid, _NO_ERROR)
        self._return_window()
        self.request_done = True

    def _return_window(self) -> None:
        if self._backlog:
            self.conn.ack(self.sid, self._backlog)
            self._backlog = 0

    def client_window(self) -> None:
        if self.state == _RESPONDING:
            self._pump()

    def _pump(self) -> None:
        """Send what the client's window allows; END_STREAM once all is out."""
        resp, sid, conn = self._resp, self.sid, self.conn
        while resp:
            room = conn.window(sid)
            if room <= 0:
                self._set_deadline(D_WRITE, self.gen.body_idle_timeout)
                return
            data = resp[0]
            if len(data) <= room:
                resp.pop(0)
                self._resp_len -= len(data)
                self._ended = not resp and self._resp_end
                conn.send_data(sid, data, self._ended)
            else:
                conn.send_data(sid, data[:room], False)
                resp[0] = data[room:]
                self._resp_len -= room
        if self._resp_end:
            if not self._ended:
                self._ended = True
                conn.send_data(sid, b"", True)
            self._answered()
        else:
            self._arm()  # the upstream keeps answering: its deadline starts again
