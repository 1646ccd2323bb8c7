"""A discarding HTTP/1.1 upstream for the 1 GiB streamed-body test.

``python -m bench.sink PORT`` reads each request body to its end (framing
by llhttp, Content-Length or chunked), keeping nothing, then answers 204.
The nginx sink cannot serve this test: echo_read_request_body would spool
1 GiB to a temp file, and ``return 204`` answers before the body arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import httptools
import uvloop

__all__ = ["main"]

_RESPONSE = b"HTTP/1.1 204 No Content\r\nServer: bench-sink\r\n\r\n"


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(_RESPONSE)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Sink, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    port = int(argv[0])
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError),
    ):
        runner.run(_serve(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
