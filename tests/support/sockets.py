"""Loopback sockets that misbehave on purpose: a close that resets, a port
that refuses, and one whose connects hang.  Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = ["refused_port", "reset", "unreachable_port"]


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, as a crashed peer would.  (A plain close, or
    transport.abort() alone, sends FIN when no unread data is queued.)"""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused (RST)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextmanager
def unreachable_port() -> Iterator[int]:
    """A listener whose accept queue is full: further SYNs are dropped, so a
    connect hangs like one to a blackholed host."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()
