"""The narrow interfaces between the parts of the data path.

An exchange drives its client connection only through ``ClientPort``, its
upstream connection only through ``UpstreamPort`` (taken from and given back
to an ``UpstreamPool`` of the process's ``UpstreamPools``); the upstream
connection reports to the exchange through ``ResponseSink``; accounting
reads a finished exchange through ``Finished``.  Each side can be replaced
by a fake in memory (``tests/unit/test_exchange.py``), and no module of the
data path imports the one on the other side of a port.  (Compiled with
mypyc, a concrete class in an annotation is also checked at run time: the
ports are what lets a fake stand in for a compiled class.)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from gateway.policy.auth import Principal
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route, Target, Upstream
    from gateway.telemetry.counters import RouteStats

__all__ = [
    "PAUSE_CONNECT",
    "PAUSE_PIPELINE",
    "PAUSE_QUEUE",
    "PAUSE_UPSTREAM",
    "PAUSE_WRITE",
    "ClientPort",
    "Deadline",
    "Finished",
    "ResponseSink",
    "Tracked",
    "UpstreamPool",
    "UpstreamPools",
    "UpstreamPort",
]

# Why the client connection is not being read; reading resumes when no
# reason is left.  Plain ints: they are or-ed on the hot path.
PAUSE_PIPELINE: Final = 1  # a pipelined request waits for the one in flight
PAUSE_CONNECT: Final = 2  # waiting for an upstream connection (or a deep health probe)
PAUSE_UPSTREAM: Final = 4  # the upstream stopped reading the body
PAUSE_QUEUE: Final = 8  # waiting for a concurrency slot
PAUSE_WRITE: Final = 16  # the client is not reading what we send


class Deadline(enum.IntEnum):
    """The one deadline a client connection has at a time, by what it bounds.

    The data path stores the plain ints (``int(Deadline.BODY)``): CPython
    3.11 specialises comparisons of exact ints, not of IntEnum members.
    """

    NONE = 0
    IDLE = 1  # keep-alive: waiting for the next request
    HEAD = 2  # a request head has started and must complete
    BODY = 3  # the request body must keep arriving
    UPSTREAM = 4  # the upstream must answer (or keep answering)
    WRITE = 5  # the client must read what we sent
    LINGER = 6  # after an early answer, before closing
    QUEUE = 7  # waiting for a concurrency slot


class ClientPort(Protocol):
    """What an exchange may do to its client connection."""

    peer: str  # the socket peer's address, as text and as bytes
    peer_bytes: bytes
    scheme: bytes
    cert_subject: str
    # Bytes for the client, written with one syscall per event by flush().
    out: list[bytes]

    def flush(self) -> None: ...
    def pause(self, reason: int) -> None: ...
    def resume(self, reasons: int) -> None: ...
    def set_deadline(self, kind: int, timeout: float) -> None: ...  # a Deadline
    def clear_deadline(self) -> None: ...
    def close_now(self) -> None: ...
    def exchange_finished(self, ex: object) -> None: ...


class Tracked(Protocol):
    """An open client connection as the process sees it: the sweeper that
    enforces deadlines, and the drain on shutdown."""

    deadline: float  # loop time; meaningful when deadline_kind is not NONE
    deadline_kind: int  # a Deadline

    def on_deadline(self, now: float) -> None: ...
    def busy(self) -> bool: ...
    def close_now(self) -> None: ...
    def abort(self) -> None: ...


class UpstreamPort(Protocol):
    """What an exchange may do to the upstream connection it holds."""

    send: Callable[[list[bytes]], None]  # write these pieces, coalesced

    def attach(self, sink: ResponseSink) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...


class UpstreamPool(Protocol):
    """Where an exchange takes an upstream connection from and gives it back."""

    def acquire(self) -> UpstreamPort | None: ...  # an idle connection, if any
    async def connect(self, timeout: float) -> UpstreamPort: ...
    # Back after a complete response (kept if reusable) or abandoned.
    def release(self, conn: UpstreamPort, idle_until: float) -> None: ...


class UpstreamPools(Protocol):
    """The pools of a process, one per upstream address; outlive reloads."""

    def get(self, upstream: Upstream) -> UpstreamPool: ...
    def expire(self, now: float) -> None: ...  # close connections idle too long
    def close(self) -> None: ...


class ResponseSink(Protocol):
    """What an exchange offers the upstream connection it holds."""

    def response_head(
        self,
        status: int,
        reason: bytes,
        headers: bytes,
        keep_alive: bool,
        chunked: bool,
        length: int | None,
    ) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def upstream_failed(self, kind: str) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...
    def flush_client(self) -> None: ...


class Finished(Protocol):
    """A finished exchange as accounting reads it."""

    @property
    def head(self) -> RequestHead: ...
    @property
    def route(self) -> Route | None: ...
    @property
    def route_name(self) -> str: ...
    @property
    def target(self) -> Target | None: ...
    @property
    def rstats(self) -> RouteStats | None: ...
    @property
    def principal(self) -> Principal | None: ...
    @property
    def credential(self) -> str: ...
    @property
    def token_id(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def error(self) -> str: ...
    @property
    def body_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def upstream_seconds(self) -> float: ...
    @property
    def label(self) -> str: ...  # the backend tried last ("" if none)
    @property
    def history(self) -> list[str] | None: ...  # every backend tried, once retried
    @property
    def retried(self) -> list[str] | None: ...  # the failures that caused the retries
