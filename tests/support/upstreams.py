"""The raw upstream: a loopback TCP server that records every byte and every
request the gateway sends it, parsed with the strict parser of ``wire``
(a framing error is recorded, and every test that cares asserts there is
none), and answers in whatever way a test needs, down to the TCP level.

Two ways to answer:
  * per request (the default): each connection is read to its end and
    every complete request goes to ``responder`` (204 unless changed) in a
    task of its own, so a hanging responder does not stop us from seeing
    the gateway abort the connection;
  * per connection: a ``behaviour`` drives the connection itself with
    UpConn's reading methods (read only the head, stop reading, reset,
    answer and close), which record all the same.  A behaviour that
    returns leaves the connection as it was, open or not.

Knows nothing of the gateway or its config.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.support.sockets import reset
from tests.support.wire import Incomplete, ParsedRequest, parse_request

__all__ = [
    "Behaviour",
    "RawUpstream",
    "Responder",
    "UpConn",
    "answer_with",
    "close_after_head",
    "hang",
    "reset_after_bytes",
    "reset_after_head",
    "reset_after_request",
    "respond_204",
]

_READ_SIZE = 65536

Responder = Callable[["UpConn", ParsedRequest], Awaitable[None]]
Behaviour = Callable[["UpConn"], Awaitable[None]]


@dataclass
class UpConn:
    """One connection the gateway opened to the upstream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # False (the soak): keep neither the bytes once parsed nor the requests.
    keep: bool = True
    data: bytearray = field(default_factory=bytearray)
    requests: list[ParsedRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Set once the gateway has closed the connection, or it was dropped.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once a request head has arrived (the body may still be coming).
    head_seen: asyncio.Event = field(default_factory=asyncio.Event)
    consumed: int = 0
    _unanswered: list[ParsedRequest] = field(default_factory=list)

    async def receive(self) -> list[ParsedRequest] | None:
        """Read once: the requests this read completed, or None once the
        gateway has closed (or reset) the connection.  After a framing
        error bytes are still recorded but no longer parsed."""
        try:
            chunk = await self.reader.read(_READ_SIZE)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed.set()
            return None
        self.data += chunk
        if b"\r\n\r\n" in self.data[self.consumed :]:
            self.head_seen.set()
        new: list[ParsedRequest] = []
        while not self.errors:
            try:
                req, used = parse_request(bytes(self.data[self.consumed :]))
            except Incomplete:
                break
            except ValueError as exc:
                self.errors.append(str(exc))
                break
            self.consumed += used
            new.append(req)
        if self.keep:
            self.requests += new
        else:
            del self.data[: self.consumed]
            self.consumed = 0
        return new

    async def next_request(self) -> ParsedRequest | None:
        """The next complete request, reading as needed; None once the
        gateway closes the connection or sends something unparsable."""
        while not self._unanswered:
            if self.errors:
                return None
            new = await self.receive()
            if new is None:
                return None
            self._unanswered += new
        return self._unanswered.pop(0)

    async def read_head(self) -> bool:
        """Read until a request head has arrived; False if the gateway closed first."""
        while not self.head_seen.is_set():
            if await self.receive() is None:
                return False
        return True

    async def read_to_eof(self) -> None:
        while await self.receive() is not None:
            pass

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a RST."""
        reset(self.writer)

    def close(self) -> None:
        """Close with a FIN."""
        self.writer.close()

    @property
    def leftover(self) -> bytes:
        """Bytes received that do not (yet) form a complete request."""
        return bytes(self.data[self.consumed :])


async def respond_204(conn: UpConn, req: ParsedRequest) -> None:
    await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")


class RawUpstream:
    """A TCP server that records every byte and every request reaching it.

    ``responder`` answers each complete request (default: 204) unless a
    ``behaviour`` drives each connection instead; ``on_connect`` runs first
    on every connection.  ``keep=False`` keeps counts and framing errors
    but no bytes or requests (a long soak would hold gigabytes).
    """

    def __init__(self, behaviour: Behaviour | None = None, *, keep: bool = True) -> None:
        self.behaviour = behaviour
        self.keep = keep
        self.conns: list[UpConn] = []
        self.responder: Responder = respond_204
        self.on_connect: Callable[[UpConn], Awaitable[None]] | None = None
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """How many connections the gateway has opened to us."""
        return len(self.conns)

    @property
    def requests(self) -> list[ParsedRequest]:
        return [r for c in self.conns for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [e for c in self.conns for e in c.errors]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.conns)

    async def start(self) -> None:
        """Listen on ``port`` (0: the OS picks one); after ``stop``, the same port again."""
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (an upstream crash or restart)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for c in self.conns:
            c.writer.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = UpConn(reader, writer, keep=self.keep)
        self.conns.append(conn)
        try:
            if self.on_connect is not None:
                await self.on_connect(conn)
            if self.behaviour is not None:
                await self.behaviour(conn)
            else:
                await self._serve(conn)
        except asyncio.CancelledError:
            pass  # stopped by the test: end quietly (no "exception never retrieved")
        finally:
            self._tasks.discard(task)

    async def _serve(self, conn: UpConn) -> None:
        answering: set[asyncio.Task[None]] = set()
        try:
            while (new := await conn.receive()) is not None:
                for req in new:
                    answer = asyncio.create_task(self._answer(conn, req))
                    answering.add(answer)
                    answer.add_done_callback(answering.discard)
        finally:
            conn.closed.set()
            for answer in list(answering):
                answer.cancel()
            conn.writer.transport.abort()

    async def _answer(self, conn: UpConn, req: ParsedRequest) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.responder(conn, req)


# -- behaviours ------------------------------------------------------------------------


def answer_with(response: bytes) -> Behaviour:
    """Read each request, answer with exactly these bytes (keep-alive)."""

    async def behave(conn: UpConn) -> None:
        while await conn.next_request() is not None:
            await conn.write(response)

    return behave


async def hang(conn: UpConn) -> None:
    """Read everything, never answer."""
    await conn.read_to_eof()


async def reset_after_head(conn: UpConn) -> None:
    """Read the request head, then reset the connection before any answer."""
    await conn.read_head()
    conn.reset()


async def close_after_head(conn: UpConn) -> None:
    """Read the request head, then close cleanly (FIN) without answering."""
    await conn.read_head()
    conn.close()


async def reset_after_request(conn: UpConn) -> None:
    """Read one whole request (head and body), then reset without answering:
    a backend that died with the request in its hands."""
    await conn.next_request()
    conn.reset()


def reset_after_bytes(n: int) -> Behaviour:
    """Read at least ``n`` bytes of the request, then reset without answering."""

    async def behave(conn: UpConn) -> None:
        while len(conn.data) < n:
            if await conn.receive() is None:
                return
        conn.reset()

    return behave
