"""Raw-socket tools for the hostile tier: a client that speaks bytes, a strict
response reader, and a recording upstream with its own small HTTP/1.1 parser.

The upstream's parser is deliberately independent of llhttp (which the
gateway uses): if the gateway forwarded an ambiguous request, the two
parsers would disagree and the test would see it.  It is strict: a second
Content-Length, Content-Length beside Transfer-Encoding, a bad chunk size
or stray bytes are recorded as framing errors, which every test asserts
never happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = [
    "Incomplete",
    "ParsedRequest",
    "RawConn",
    "RawUpstream",
    "Response",
    "UpConn",
    "parse_request",
    "parse_statuses",
    "request",
]

READ_TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class Closed(Exception):
    """The peer closed before a complete response arrived."""


def request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    chunked: bool = False,
    host: str = "gateway.test",
) -> bytes:
    """A well-formed request as bytes (Content-Length, or chunked in one chunk)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        data = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        data = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class RawConn:
    """One client TCP (or TLS) connection driven byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, **kwargs: object) -> RawConn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            limit=1 << 22,
            **kwargs,  # type: ignore[arg-type]
        )
        return cls(reader, writer)

    async def __aenter__(self) -> RawConn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def half_close(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def response(
        self, *, head: bool = False, timeout: float = READ_TIMEOUT, interim: bool = False
    ) -> Response:
        """The next response; 1xx interim answers are skipped unless ``interim``."""
        async with asyncio.timeout(timeout):
            while True:
                resp = await read_response(self.reader, head=head)
                if interim or resp.status >= 200:
                    return resp

    async def eof(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Everything until the server closes; raises TimeoutError if it does not."""
        data = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except OSError:  # reset, broken pipe, ENOTCONN: closed all the same
                    return bytes(data)
                if not chunk:
                    return bytes(data)
                data += chunk

    async def closed_within(self, timeout: float) -> bool:
        try:
            await self.eof(timeout)
        except TimeoutError:
            return False
        return True

    def abort(self) -> None:
        """Close with a RST, as a crashed client would."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise Closed(exc.partial[:200]) from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise Closed(b"reset") from exc
    lines = raw_head[:-4].decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
    if m is None:
        raise AssertionError(f"not a status line: {lines[0]!r}")
    status = int(m.group(1))
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep, f"bad response header line {line!r}"
        assert name == name.strip(), f"whitespace around a response header name: {line!r}"
        headers.append((name, value.strip()))
    resp = Response(status, m.group(2), headers, b"")
    if head or status in (204, 304) or 100 <= status < 200:
        return resp
    te = resp.header("transfer-encoding")
    cl = resp.header("content-length")
    try:
        if te is not None:
            assert te.lower() == "chunked", te
            assert cl is None, "response with both Content-Length and Transfer-Encoding"
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line[:-2].split(b";")[0], 16)
                if size == 0:
                    # no trailers are expected from the gateway
                    assert await reader.readexactly(2) == b"\r\n"
                    break
                body += await reader.readexactly(size)
                assert await reader.readexactly(2) == b"\r\n"
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = await reader.readexactly(int(cl))
        else:
            resp.body = await reader.read()  # close-delimited
    except asyncio.IncompleteReadError as exc:
        raise Closed(b"truncated body: " + exc.partial[:100]) from None
    return resp


_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


def parse_statuses(stream: bytes) -> list[int]:
    """Status codes of every response line found in a raw byte stream."""
    return [int(m.group(1)) for m in _STATUS.finditer(stream)]


# -- the recording upstream ----------------------------------------------------------


@dataclass
class ParsedRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    trailers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class Incomplete(Exception):
    """More bytes are needed before a request can be parsed."""


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# A strict reference parser, written as the RFC reads (one branch per
# framing rule) so it shares no code and no shortcuts with llhttp.
def parse_request(buf: bytes) -> tuple[ParsedRequest, int]:  # noqa: PLR0912, PLR0915
    """Parse one request from the start of ``buf``: (request, bytes used).
    Raises Incomplete or ValueError (a framing error)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 1 << 20:
            raise ValueError("head over 1 MiB")
        raise Incomplete
    head = buf[:end].decode("latin-1")
    if "\n" in head.replace("\r\n", "") or "\r" in head.replace("\r\n", ""):
        raise ValueError("bare CR or LF in head")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"bad request line {lines[0]!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ValueError(f"bad header line {line!r}")
        if any(c in value for c in "\x00"):
            raise ValueError("NUL in header value")
        headers.append((name, value.strip(" \t")))
    lower = [(k.lower(), v) for k, v in headers]
    cls = [v for k, v in lower if k == "content-length"]
    tes = [v for k, v in lower if k == "transfer-encoding"]
    if len(cls) > 1:
        raise ValueError("duplicate Content-Length")
    if cls and tes:
        raise ValueError("Content-Length with Transfer-Encoding")
    if len([v for k, v in lower if k == "host"]) != 1:
        raise ValueError("not exactly one Host")
    pos = end + 4
    if tes:
        if len(tes) != 1 or tes[0].lower() != "chunked":
            raise ValueError(f"Transfer-Encoding {tes!r}")
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                raise Incomplete
            size_text = buf[pos:eol].split(b";")[0]
            if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                raise ValueError(f"bad chunk size {size_text!r}")
            size = int(size_text, 16)
            pos = eol + 2
            if size == 0:
                trailers: list[tuple[str, str]] = []
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        raise Incomplete
                    field_line = buf[pos:eol]
                    pos = eol + 2
                    if not field_line:
                        break
                    name, _, value = field_line.decode("latin-1").partition(":")
                    trailers.append((name, value.strip()))
                req = ParsedRequest(method, target, version, headers, bytes(body), True, trailers)
                return req, pos
            if len(buf) < pos + size + 2:
                raise Incomplete
            body += buf[pos : pos + size]
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
            pos += size + 2
    if cls:
        if not re.fullmatch(r"[0-9]{1,15}", cls[0]):
            raise ValueError(f"bad Content-Length {cls[0]!r}")
        n = int(cls[0])
        if len(buf) < pos + n:
            raise Incomplete
        return ParsedRequest(method, target, version, headers, buf[pos : pos + n], False), pos + n
    return ParsedRequest(method, target, version, headers, b"", False), pos


Responder = Callable[["UpConn", ParsedRequest], Awaitable[None]]


@dataclass
class UpConn:
    """One connection the gateway opened to the upstream."""

    writer: asyncio.StreamWriter
    data: bytearray = field(default_factory=bytearray)
    requests: list[ParsedRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once a request head has arrived (the body may still be coming).
    head_seen: asyncio.Event = field(default_factory=asyncio.Event)
    consumed: int = 0

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    @property
    def leftover(self) -> bytes:
        """Bytes received that do not (yet) form a complete request."""
        return bytes(self.data[self.consumed :])


async def respond_204(conn: UpConn, req: ParsedRequest) -> None:
    await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")


class RawUpstream:
    """A TCP server that records every byte and every request reaching it.

    ``responder`` answers each complete request (default: 204); set
    ``on_data`` to act on raw bytes before a request completes (e.g. reset).
    """

    def __init__(self) -> None:
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
    def requests(self) -> list[ParsedRequest]:
        return [r for c in self.conns for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [e for c in self.conns for e in c.errors]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.conns)

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (an upstream restart)."""
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
        conn = UpConn(writer)
        self.conns.append(conn)
        # Responders run beside the reader, so a hanging responder does not
        # stop us from seeing the gateway abort the connection.
        answering: set[asyncio.Task[None]] = set()
        try:
            if self.on_connect is not None:
                await self.on_connect(conn)
            while True:
                try:
                    chunk = await reader.read(65536)
                except (ConnectionError, OSError):
                    break
                if not chunk:
                    break
                conn.data += chunk
                if b"\r\n\r\n" in conn.data[conn.consumed :]:
                    conn.head_seen.set()
                while not conn.errors:
                    try:
                        req, used = parse_request(bytes(conn.data[conn.consumed :]))
                    except Incomplete:
                        break
                    except ValueError as exc:
                        conn.errors.append(str(exc))
                        break
                    conn.consumed += used
                    conn.requests.append(req)
                    answer = asyncio.create_task(self._answer(conn, req))
                    answering.add(answer)
                    answer.add_done_callback(answering.discard)
        except asyncio.CancelledError:
            pass  # stopped by the test: end quietly (no "exception never retrieved")
        finally:
            conn.closed.set()
            for answer in list(answering):
                answer.cancel()
            writer.transport.abort()
            self._tasks.discard(task)

    async def _answer(self, conn: UpConn, req: ParsedRequest) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.responder(conn, req)
