"""TLS handshakes of client connections that were accepted as plain TCP.

The public listener has no ``ssl=``: a connection is counted against
``max_connections`` from accept (``ClientConnection.connection_made``) like
any other, and its handshake runs here with ``loop.start_tls`` and the
server context in force *at accept*, so each new SSL object takes every
setting of the newest config (certificate, client CA, verify mode).  The
connection's deadline (header_timeout from accept) and start_tls's own
handshake timeout bound it in time; the count bounds how many there are.

uvloop starts reading an accepted transport right after ``connection_made``
returns (``pause_reading`` there is a no-op), and start_tls can only run on
a later turn of the loop, by when the client's first flight has usually
been read.  So until start_tls takes over, an ``_Early`` protocol keeps
those bytes (reading paused), and they are handed to the TLS layer before
its handshake starts, in order.

Owns nothing but the handshake; must not know HTTP.  A handshake that fails
or is cut off closes the TCP connection and uncounts it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    import ssl

__all__ = ["Handshaking", "start_tls"]


class Handshaking(Protocol):
    """What a handshake needs of its client connection."""

    def tls_established(self, transport: asyncio.Transport) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


# The loop keeps only weak references to tasks: these are the strong ones.
_running: set[asyncio.Task[None]] = set()


class _Early(asyncio.Protocol):
    """The raw transport's protocol from accept until start_tls replaces it."""

    __slots__ = ("conn", "data", "raw")

    def __init__(self, conn: Handshaking, raw: asyncio.Transport) -> None:
        self.conn = conn
        self.raw = raw
        self.data: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(data)
        self.raw.pause_reading()  # one read at most: the TLS layer reads the rest

    def eof_received(self) -> bool:
        return False  # closes: the handshake then fails and uncounts

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)


def start_tls(
    conn: Handshaking,
    raw: asyncio.Transport,
    ctx: ssl.SSLContext,
    timeout: float,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Run the server side of a handshake on ``raw``; ``conn`` hears of the
    TLS transport through ``tls_established``, or loses the connection."""
    early = _Early(conn, raw)
    raw.set_protocol(early)
    task = loop.create_task(_handshake(conn, early, ctx, timeout, loop))
    _running.add(task)
    task.add_done_callback(_running.discard)


async def _handshake(
    conn: Handshaking,
    early: _Early,
    ctx: ssl.SSLContext,
    timeout: float,
    loop: asyncio.AbstractEventLoop,
) -> None:
    raw = early.raw
    if raw.is_closing():  # gone before its turn came: no TLS layer for it
        _lost(conn, raw)
        return
    try:
        # start_tls installs the TLS layer as raw's protocol synchronously,
        # then schedules its handshake: the replay is scheduled first, so
        # the early bytes reach it before the handshake reads them.
        loop.call_soon(_replay, raw, early.data)
        # conn is an asyncio.Protocol (the one that reads the TLS transport).
        protocol = cast("asyncio.BaseProtocol", conn)
        tls = await loop.start_tls(
            raw, protocol, ctx, server_side=True, ssl_handshake_timeout=timeout
        )
    except asyncio.CancelledError:  # the loop is going away
        _lost(conn, raw)
        raise
    except Exception:  # noqa: BLE001  (refused, reset, timed out, closed by its deadline or a drain)
        _lost(conn, raw)
        return
    if tls is None:  # typeshed allows it; uvloop and asyncio never return None here
        _lost(conn, raw)
        return
    conn.tls_established(tls)


def _replay(raw: asyncio.Transport, data: list[bytes]) -> None:
    """Hand the bytes read before start_tls to the TLS layer, as a transport would."""
    if not data or raw.is_closing():
        return
    layer: asyncio.BaseProtocol | None = raw.get_protocol()
    if isinstance(layer, _Early) or layer is None:
        return  # start_tls failed before installing it
    for chunk in data:
        if hasattr(layer, "get_buffer"):  # a buffered protocol (uvloop's and asyncio's)
            buffered = cast("asyncio.BufferedProtocol", layer)
            view = memoryview(chunk)
            while view:
                buf = memoryview(buffered.get_buffer(len(view))).cast("B")
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                buffered.buffer_updated(n)
                view = view[n:]
        else:
            cast("asyncio.Protocol", layer).data_received(chunk)
    data.clear()


def _lost(conn: Handshaking, raw: asyncio.Transport) -> None:
    # The TLS layer may have told conn already: connection_lost is idempotent.
    raw.abort()
    conn.connection_lost(None)
