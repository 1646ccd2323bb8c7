"""The client connection's state and flow: what it reads and when, the
order of its exchanges, and its one deadline.

``ClientState`` is the ``ClientPort`` its exchanges drive (write, pause and
resume reading, set the deadline) and the ``Tracked`` connection the
process sweeps.  It pauses reading for each reason in ``ports.PAUSE_*``
and reads again when none is left; it starts pipelined exchanges in order,
never while the client is not reading its answers; it keeps the write
deadline in force while the client does not read.  ``connection.py``
adds the transport callbacks, parsing and the head limits on top.

Must not know: HTTP parsing, routes, credentials, upstreams.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final

from gateway.datapath.ports import (
    PAUSE_CONNECT,
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM,
    PAUSE_WRITE,
    Deadline,
)
from gateway.datapath.unsent import unsent
from gateway.datapath.writes import write_coalesced

if TYPE_CHECKING:
    from gateway.datapath.exchange import Exchange
    from gateway.datapath.shared import Shared

__all__ = ["LINGER_SECONDS", "ClientState"]

# The deadline kinds as plain ints: CPython 3.11 specialises comparisons of
# exact ints only, and these are compared on every read.
_NONE: Final = int(Deadline.NONE)
_IDLE: Final = int(Deadline.IDLE)
_HEAD: Final = int(Deadline.HEAD)
_BODY: Final = int(Deadline.BODY)
_UPSTREAM: Final = int(Deadline.UPSTREAM)
_WRITE: Final = int(Deadline.WRITE)
_LINGER: Final = int(Deadline.LINGER)
_QUEUE: Final = int(Deadline.QUEUE)
# After answering with "Connection: close" while the client may still be
# sending, keep reading (and dropping) for this long so the client reads our
# answer instead of a reset.
LINGER_SECONDS: Final = 2.0


# No asyncio.Protocol base: uvloop only calls the methods, and a class with
# a Python base cannot be a mypyc native class (attributes in a dict, not
# slots; methods called through the generic path).
class ClientState:
    """One client connection's flow control, exchange order and deadline
    (with ``ClientConnection``, an ``asyncio.Protocol`` by shape)."""

    __slots__ = (
        "_advancing",
        "_head_by",
        "_held_deadline",
        "_held_kind",
        "_lingering",
        "_paused",
        "_pending",
        "_write_left",
        "_write_paused",
        "active",
        "cert_subject",
        "deadline",
        "deadline_kind",
        "out",
        "peer",
        "peer_bytes",
        "scheme",
        "shared",
        "transport",
    )

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_bytes = b""
        self.cert_subject = ""
        self.scheme = b"https" if shared.tls else b"http"
        self.out: list[bytes] = []
        self.active: Exchange | None = None
        self._pending: deque[Exchange] = deque()
        self._paused = 0
        self._write_paused = False
        self._lingering = False
        self._advancing = False
        # The loop time by which the head in progress must be complete (0: none).
        self._head_by = 0.0
        self.deadline = 0.0
        self.deadline_kind = _NONE  # a Deadline value
        # While the client is not reading, the write deadline is in force and
        # the one an exchange asks for waits here until it reads again.
        self._held_kind = _NONE
        self._held_deadline = 0.0
        # What the client had left to read when we last looked (write paused).
        self._write_left = 0

    def pause_writing(self) -> None:
        # The client is not reading what we send: read nothing more from it
        # (its next request would only add an answer to the buffer), start
        # no pending exchange, and give it body_idle_timeout to read
        # something (on_deadline looks whether it did).
        self._write_paused = True
        self.pause(PAUSE_WRITE)
        if self.active is not None:
            self.active.client_write_paused(True)
        self._held_kind = self.deadline_kind
        self._held_deadline = self.deadline
        self.deadline_kind = _WRITE
        self.deadline = self.shared.loop.time() + self.shared.gen.body_idle_timeout
        self._write_left = unsent(self.transport) if self.transport is not None else 0

    def resume_writing(self) -> None:
        self._write_paused = False
        kind = self._held_kind
        if kind == _IDLE and self._head_by:
            kind, self.deadline = _HEAD, self._head_by
        else:
            self.deadline = self._held_deadline
        self.deadline_kind = kind
        if self.active is not None:
            self.active.client_write_paused(False)
        elif self._pending:  # parsed before it stopped reading: answer them now
            self._advance()
        self.resume(PAUSE_WRITE)
        self.flush()

    # -- ClientPort: used by exchanges -------------------------------------------------
    def flush(self) -> None:
        out = self.out
        if out:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                write_coalesced(transport, out)
            self.out = []

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reasons: int) -> None:
        if self._paused and not (self._paused & ~reasons):
            self._paused = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        else:
            self._paused &= ~reasons

    def set_deadline(self, kind: int, timeout: float) -> None:
        if self._write_paused:
            # The client is not reading: the write deadline stays in force;
            # this one applies once it reads again.
            self._held_kind = kind
            self._held_deadline = self.shared.loop.time() + timeout
            return
        self.deadline_kind = kind
        self.deadline = self.shared.loop.time() + timeout

    def clear_deadline(self) -> None:
        if self._write_paused:
            self._held_kind = _NONE
        else:
            self.deadline_kind = _NONE

    def close_now(self) -> None:
        """Flush what is queued and close (no more requests on this connection)."""
        self._lingering = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def exchange_finished(self, ex: object) -> None:
        active = self.active
        if active is None or ex is not active:
            return
        self.active = None
        if active.close:
            self._close_after(active)
            return
        if self._advancing:
            return  # the loop below, further up the stack, starts the next one
        if self._pending or self._head_by or self._write_paused or self._paused:
            self._advance()
        elif not self._lingering:
            # Nothing pipelined, nothing paused (one request at a time, as
            # every sender we serve does): wait idle for the next request.
            self.deadline_kind = _IDLE
            self.deadline = self.shared.loop.time() + self.shared.gen.keepalive_timeout

    def _advance(self) -> None:
        """Start the pending exchanges in order, then wait for the next request."""
        # Pipelined requests answered synchronously finish inside start():
        # iterate instead of recursing, however many were queued.  A client
        # that stopped reading gets no new answer until it reads again.
        self._advancing = True
        try:
            while self.active is None and self._pending and not self._write_paused:
                nxt = self._pending.popleft()
                self.active = nxt
                self.deadline_kind = _NONE
                nxt.start()
                # Started outside the client's data_received (often from the
                # upstream's, as the previous answer ended): send its head now.
                nxt.flush_upstream()
        finally:
            self._advancing = False
        if self._lingering:
            return
        if not self._pending and self._paused & PAUSE_PIPELINE:
            # Nothing waits any more; the exchange now active reads its body.
            self.resume(PAUSE_PIPELINE)
        if self.active is None:
            if self._head_by:  # a head began while the last one was in flight
                if self._write_paused:
                    self._held_kind, self._held_deadline = _HEAD, self._head_by
                else:
                    self.deadline_kind, self.deadline = _HEAD, self._head_by
            else:
                self.set_deadline(_IDLE, self.shared.gen.keepalive_timeout)

    # -- Tracked: used by the process (sweeper, drain) ---------------------------------
    def busy(self) -> bool:
        return self.active is not None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------
    def _close_after(self, ex: Exchange) -> None:
        self._pending.clear()
        self._lingering = True
        self.flush()
        transport = self.transport
        if transport is None:
            return
        if ex.request_done:
            transport.close()
            return
        # The client may still be sending: signal the end, keep reading and
        # dropping for a while, then close, so it sees our answer, not a reset.
        self.resume(PAUSE_PIPELINE | PAUSE_CONNECT | PAUSE_UPSTREAM)
        if transport.can_write_eof():
            transport.write_eof()
        self.set_deadline(_LINGER, LINGER_SECONDS)

    def _after_current_close(self) -> None:
        """Stop parsing; close once the exchanges parsed so far have answered."""
        last = self._pending[-1] if self._pending else self.active
        if last is None:
            self.close_now()
            return
        last.close = True
        self._lingering = True

    def _read_since(self, now: float) -> bool:
        """The client took enough of our output since we last looked: it is
        slow, not gone, so it gets another body_idle_timeout.  Enough is the
        request bodies' minimum rate over the window (min_body_rate; any
        progress when that is off), so a byte now and then holds nothing."""
        transport = self.transport
        if transport is None:
            return False
        left = unsent(transport)
        gen = self.shared.gen
        if self._write_left - left < max(1.0, gen.min_body_rate * gen.body_idle_timeout):
            return False
        self._write_left = left
        self.deadline_kind = _WRITE
        self.deadline = now + gen.body_idle_timeout
        return True

    def on_deadline(self, now: float) -> None:
        """Called by the sweeper when ``now >= self.deadline``."""
        kind = self.deadline_kind
        self.deadline_kind = _NONE
        active = self.active
        if kind == _WRITE and self._read_since(now):
            return
        if kind in (_IDLE, _LINGER, _WRITE) or (kind == _HEAD and active is None):
            if kind == _WRITE and active is not None:
                active.error = "client_write_timeout"
                active.client_lost()
            if self.transport is not None:
                self.transport.abort() if kind == _WRITE else self.transport.close()
            return
        if active is None:
            return
        if kind == _BODY:
            active.client_timeout()
        elif kind == _QUEUE:
            active.queue_timeout()
        elif kind == _UPSTREAM:
            active.upstream_timeout()
        self.flush()
