"""HTTP/1.1 as bytes: request builders, and strict parsers for a request (as
an upstream receives it) and a response (as a client receives it).

The parsers are deliberately independent of llhttp, which the gateway uses:
if the gateway forwarded an ambiguous request or wrote an ambiguous
response, the two parsers would disagree and the test would see it.  They
are written as RFC 9112 reads, one branch per framing rule, and refuse with
ValueError what a strict peer would refuse: a second Content-Length,
Content-Length beside Transfer-Encoding, a bad chunk size, stray bytes.
Both read from the start of a buffer and raise Incomplete while it holds
less than one message, so the socket code decides when to read more.

Knows nothing of sockets, of the gateway's config or of its routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tests.conftest import TOKEN

__all__ = [
    "Incomplete",
    "ParsedRequest",
    "Response",
    "chunked",
    "parse_request",
    "parse_response",
    "parse_statuses",
    "request",
    "request_bytes",
]

# A head this long is an attack or a bug, not something to wait for.
MAX_HEAD = 1 << 20


class Incomplete(Exception):
    """More bytes are needed before a message can be parsed."""


class _Fields:
    """Lookups on header fields, by case-insensitive name."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class ParsedRequest(_Fields):
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    trailers: list[tuple[str, str]] = field(default_factory=list)
    # The request exactly as it was on the wire, head and framed body.
    raw: bytes = b""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass
class Response(_Fields):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    # Set by the raw client: every byte its connection had received when
    # this response was read, earlier answers included, so that a check for
    # leaked secrets covers interim answers too.
    raw: bytes = b""


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
_LENGTH = re.compile(r"[0-9]{1,15}")
# The space after the code is required unless the line ends there: the old
# hostile reader's " ?" read "HTTP/1.1 2000 OK" as a 200.
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")


def _head(buf: bytes) -> tuple[list[str], int]:
    """The head's lines (start line first) and where the body starts."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ValueError("head over 1 MiB")
        raise Incomplete
    head = buf[:end].decode("latin-1")
    if "\n" in head.replace("\r\n", "") or "\r" in head.replace("\r\n", ""):
        raise ValueError("bare CR or LF in head")
    return head.split("\r\n"), end + 4


def _fields(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ValueError(f"bad header line {line!r}")
        if "\x00" in value:
            raise ValueError("NUL in header value")
        headers.append((name, value.strip(" \t")))
    return headers


def _framing(headers: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(Content-Length, Transfer-Encoding), refusing every ambiguous pair."""
    lower = [(k.lower(), v) for k, v in headers]
    cls = [v for k, v in lower if k == "content-length"]
    tes = [v for k, v in lower if k == "transfer-encoding"]
    if len(cls) > 1:
        raise ValueError("duplicate Content-Length")
    if cls and tes:
        raise ValueError("Content-Length with Transfer-Encoding")
    if tes and (len(tes) != 1 or tes[0].lower() != "chunked"):
        raise ValueError(f"Transfer-Encoding {tes!r}")
    if cls and not _LENGTH.fullmatch(cls[0]):
        raise ValueError(f"bad Content-Length {cls[0]!r}")
    return (cls[0] if cls else None), (tes[0] if tes else None)


def _chunked_body(buf: bytes, pos: int) -> tuple[bytes, list[tuple[str, str]], int]:
    """A chunked body from ``pos``: (data, trailer fields, where it ends)."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise Incomplete
        size_text = buf[pos:eol].split(b";")[0]
        if not _CHUNK_SIZE.fullmatch(size_text):
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
                    return bytes(body), trailers, pos
                name, _, value = field_line.decode("latin-1").partition(":")
                trailers.append((name, value.strip()))
        if len(buf) < pos + size + 2:
            raise Incomplete
        body += buf[pos : pos + size]
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        pos += size + 2


# A strict reference parser, written as the RFC reads, so it shares no code
# and no shortcuts with llhttp.
def parse_request(buf: bytes) -> tuple[ParsedRequest, int]:
    """Parse one request from the start of ``buf``: (request, bytes used).
    Raises Incomplete or ValueError (a framing error)."""
    lines, pos = _head(buf)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"bad request line {lines[0]!r}")
    method, target, version = parts
    headers = _fields(lines[1:])
    length, te = _framing(headers)
    if len([k for k, _ in headers if k.lower() == "host"]) != 1:
        raise ValueError("not exactly one Host")
    if te is not None:
        body, trailers, end = _chunked_body(buf, pos)
        req = ParsedRequest(method, target, version, headers, body, True, trailers, buf[:end])
        return req, end
    end = pos + (int(length) if length is not None else 0)
    if len(buf) < end:
        raise Incomplete
    return ParsedRequest(method, target, version, headers, buf[pos:end], False, raw=buf[:end]), end


def parse_response(buf: bytes, *, head: bool = False, eof: bool = False) -> tuple[Response, int]:
    """Parse one response from the start of ``buf``: (response, bytes used).

    ``head``: the answer to a HEAD request (no body, whatever the framing
    fields say).  ``eof``: the peer has closed, so a body without
    Content-Length or Transfer-Encoding ends with ``buf``.  The gateway
    never sends trailers, so a trailer is a framing error here.  Raises
    Incomplete or ValueError (a framing error)."""
    lines, pos = _head(buf)
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise ValueError(f"not a status line: {lines[0]!r}")
    status = int(m.group(1))
    resp = Response(status, m.group(2) or "", _fields(lines[1:]), b"")
    if head or status in (204, 304) or 100 <= status < 200:
        return resp, pos
    length, te = _framing(resp.headers)
    if te is not None:
        resp.body, trailers, end = _chunked_body(buf, pos)
        if trailers:
            raise ValueError(f"trailers in a response: {trailers!r}")
        return resp, end
    if length is not None:
        end = pos + int(length)
        if len(buf) < end:
            raise Incomplete
        resp.body = buf[pos:end]
        return resp, end
    if not eof:
        raise Incomplete  # close-delimited: the body ends when the connection does
    resp.body = buf[pos:]
    return resp, len(buf)


_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


def parse_statuses(stream: bytes) -> list[int]:
    """Status codes of every response line found in a raw byte stream."""
    return [int(m.group(1)) for m in _STATUS.finditer(stream)]


# -- building requests -----------------------------------------------------------


def chunked(*parts: bytes, end: bool = True) -> bytes:
    """``parts`` as chunks (empty ones skipped), then the last chunk unless ``end`` is False."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + (b"0\r\n\r\n" if end else b"")


_as_chunks = chunked  # ``request`` has a parameter of that name


def request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    chunked: bool = False,
    host: str = "gateway.test",
    content_length: int | None = None,
    encoding: str = "latin-1",
) -> bytes:
    """One HTTP/1.1 request as bytes.

    Framing: ``chunked`` sends the body as one chunk; otherwise
    Content-Length is ``content_length`` if given, else the body's length,
    and is sent when there is a body or the method carries one (POST, PUT).
    When ``headers`` already hold a Transfer-Encoding the body is sent as
    given, unframed by us.  Latin-1 by default, so a test can put any byte
    in a field as a character."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        body = _as_chunks(body)
    elif "transfer-encoding" not in {name.lower() for name, _ in headers or []}:
        length = len(body) if content_length is None else content_length
        if length or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(encoding) + body


def request_bytes(
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    token: str | None = TOKEN,
    content_length: int | None = None,
) -> bytes:
    """``request`` as the functional tier writes it: authenticated with TOKEN
    unless told otherwise, headers before the body, and non-ASCII field
    values in UTF-8, as a careless client would send them."""
    return request(
        method,
        path,
        body,
        token=token,
        headers=headers,
        content_length=content_length,
        encoding="utf-8",
    )
