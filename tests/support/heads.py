"""Request heads parsed in memory: llhttp feeds a ``RequestHead`` exactly as
the client connection does, without a socket."""

from __future__ import annotations

import httptools

from gateway.policy.request import RequestHead

__all__ = ["ParsedHead", "parse_head"]


class ParsedHead:
    """Feeds one request head from llhttp into a RequestHead, as the server does."""

    def __init__(self) -> None:
        self.head = RequestHead(0.0)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head.header(name, value)

    def on_headers_complete(self) -> None:
        self.done = True


def parse_head(
    raw: bytes, *, request_id: bytes = b"rid-1", client_header: bytes = b"x-forwarded-for"
) -> RequestHead:
    """``raw`` must hold a whole head (a body may follow); llhttp errors propagate."""
    sink = ParsedHead()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(raw)
    assert sink.done, "the head is not complete"
    sink.head.finish(parser, sink.url, request_id, client_header)
    return sink.head
