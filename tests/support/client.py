"""The raw client: one TCP (or TLS) connection to the gateway where every
byte sent is the test's, every byte received is kept, and responses are
read with the strict parser of ``wire``, so a response the gateway frames
badly fails the test instead of being smoothed over.

Knows nothing of the gateway's config, routes or tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from tests.support.sockets import reset
from tests.support.wire import Incomplete, Response, parse_response

__all__ = ["READ_TIMEOUT", "Closed", "RawClient", "raw_client", "raw_request"]

READ_TIMEOUT = 5.0
_READ_SIZE = 256 * 1024


class Closed(Exception):
    """The gateway closed (or reset) the connection before a complete response."""


class RawClient:
    """One client connection driven byte by byte.

    ``raw`` holds every byte received so far, in order; responses are read
    from it one after another, and whatever they did not use is what
    ``eof`` returns.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.at_eof = False
        self._pos = 0  # where the next response starts in ``raw``

    @classmethod
    async def open(cls, port: int, **kwargs: object) -> RawClient:
        """Connect to 127.0.0.1:``port``; ``kwargs`` go to asyncio.open_connection (``ssl``)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            **kwargs,  # type: ignore[arg-type]
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def half_close(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def _fill(self) -> bool:
        """Read what has arrived into ``raw``; False once the gateway has
        closed the connection (a reset, a broken pipe or a TLS error is a
        close all the same)."""
        if self.at_eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except OSError:
            data = b""
        if not data:
            self.at_eof = True
            return False
        self.raw += data
        return True

    async def response(
        self, *, head: bool = False, timeout: float = READ_TIMEOUT, interim: bool = False
    ) -> Response:
        """The next response; 1xx interim answers are skipped unless ``interim``.
        ``head``: the answer to a HEAD request, which has no body.  Raises
        Closed if the connection ends first, AssertionError if the response
        is malformed, TimeoutError if it does not arrive in time."""
        async with asyncio.timeout(timeout):
            while True:
                resp = await self._next(head)
                if interim or resp.status >= 200:
                    return resp

    async def _next(self, head: bool) -> Response:
        while True:
            eof = self.at_eof
            rest = bytes(self.raw[self._pos :])
            try:
                resp, used = parse_response(rest, head=head, eof=eof)
            except Incomplete:
                if eof:
                    raise Closed(f"connection closed before a response: {rest[:300]!r}") from None
                await self._fill()
                continue
            except ValueError as exc:
                raise AssertionError(f"malformed response ({exc}): {rest[:300]!r}") from None
            self._pos += used
            resp.raw = bytes(self.raw)
            return resp

    async def received(self, needle: bytes, timeout: float = READ_TIMEOUT) -> None:
        """Wait until ``needle`` has arrived (a response may still be incomplete)."""
        async with asyncio.timeout(timeout):
            while needle not in self.raw:
                if not await self._fill():
                    raise AssertionError(f"closed before {needle!r}: {bytes(self.raw)!r}")

    async def _until_closed(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while await self._fill():
                pass

    async def eof(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Every byte not read as a response, up to the gateway's close;
        raises TimeoutError if it does not close."""
        await self._until_closed(timeout)
        rest = bytes(self.raw[self._pos :])
        self._pos = len(self.raw)
        return rest

    async def closed(self, timeout: float = READ_TIMEOUT) -> bool:
        """Whether the gateway closes the connection within ``timeout``
        (what arrived before the close can still be read as responses)."""
        try:
            await self._until_closed(timeout)
        except TimeoutError:
            return False
        return True

    def abort(self) -> None:
        """Reset the connection (RST), as a crashed sender would."""
        reset(self.writer)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


@asynccontextmanager
async def raw_client(port: int, **kwargs: object) -> AsyncIterator[RawClient]:
    """A RawClient closed when the block ends."""
    client = await RawClient.open(port, **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def raw_request(port: int, data: bytes, timeout: float = READ_TIMEOUT) -> Response:
    """Send ``data`` on a new connection and read one response."""
    async with raw_client(port) as client:
        await client.send(data)
        return await client.response(timeout=timeout)
