"""The status-code contract: every answer the gateway makes itself.

Senders decide to retry or drop by status code (DESIGN §3), so the whole
policy lives in this one table, per route protocol:

    Kind               remote-write          otlp-http            plain (no route)
    AUTH_MISSING       401 WWW-Authenticate  401                  401
    AUTH_INVALID       401 error=invalid_token
    SCOPE              403 insufficient_scope
    TENANT             403 (a JWT's tenant claim is missing or not allowed)
    FORBIDDEN          403 (client address or certificate not allowed)
    NOT_FOUND          404                   404                  404
    METHOD             405 + Allow           405 + Allow
    TOO_LARGE          413                   413
    URL_TOO_LONG       414 / HEADERS_TOO_LARGE 431 / BAD_REQUEST 400 (malformed HTTP)
    CLIENT_TIMEOUT     408                   503 + Retry-After    (OTLP drops 408)
    OVERLOADED         429 + Retry-After     503 + Retry-After    (Python OTLP drops 429)
    DRAINING           503 + Retry-After     503 + Retry-After
    UPSTREAM_CONNECT   502                   503, no Retry-After  (Go SDK < 1.20 drops 502/504)
    UPSTREAM_RESET     502                   503, no Retry-After
    UPSTREAM_PROTOCOL  502                   503, no Retry-After
    UPSTREAM_TIMEOUT   504                   503, no Retry-After  (no answer in time)
    INTERNAL           503 + Retry-After     503 + Retry-After    (never 500: OTLP drops it)

No Retry-After when the upstream failed: the gateway cannot know when it
returns, and the Python and JS SDKs obey the header exactly but retry a fixed
five times, so "1" would shrink their window from their own backoff's (12 s
and more) to about 5 s, and a 10 s outage would cost them spans.

Bodies: remote-write and plain get one short ``text/plain`` line; OTLP gets a
``google.rpc.Status`` encoded like the request (protobuf, or JSON when the
request was JSON), as the OTLP/HTTP spec requires; so does a 404 for an
unrouted path whose request has OTLP's Content-Type (an exporter pointed at a
signal with no route; dispatch decides).  No body ever carries a
token, a traceback or an upstream address: messages are constants.
Everything is rendered to bytes once per config; sending is a concatenation.
"""

from __future__ import annotations

import enum

import orjson

from gateway.policy.protowire import varint

__all__ = ["CLIENT_CLOSED", "ErrorRenderer", "Kind", "Protocol", "status_of"]

# nginx's convention for "client closed the connection before the answer";
# only ever a log/metric value, never sent.
CLIENT_CLOSED = 499


class Protocol(enum.IntEnum):
    PLAIN = 0
    REMOTE_WRITE = 1
    OTLP = 2

    @classmethod
    def of(cls, name: str) -> Protocol:
        return cls.OTLP if name == "otlp-http" else cls.REMOTE_WRITE


class Kind(enum.IntEnum):
    AUTH_MISSING = 0
    AUTH_INVALID = 1
    SCOPE = 2
    NOT_FOUND = 3
    METHOD = 4
    TOO_LARGE = 5
    URL_TOO_LONG = 6
    HEADERS_TOO_LARGE = 7
    BAD_REQUEST = 8
    CLIENT_TIMEOUT = 9
    OVERLOADED = 10
    DRAINING = 11
    UPSTREAM_CONNECT = 12
    UPSTREAM_RESET = 13
    UPSTREAM_PROTOCOL = 14
    UPSTREAM_TIMEOUT = 15
    INTERNAL = 16
    FORBIDDEN = 17
    TENANT = 18


# kind: (remote-write status, otlp status, gRPC code for OTLP bodies, message)
# gRPC codes: 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED, 5 NOT_FOUND,
# 7 PERMISSION_DENIED, 8 RESOURCE_EXHAUSTED, 12 UNIMPLEMENTED, 14 UNAVAILABLE,
# 16 UNAUTHENTICATED.
_TABLE: dict[Kind, tuple[int, int, int, str]] = {
    Kind.AUTH_MISSING: (401, 401, 16, "missing bearer token"),
    Kind.AUTH_INVALID: (401, 401, 16, "invalid bearer token"),
    Kind.SCOPE: (403, 403, 7, "credential is not allowed on this route"),
    Kind.NOT_FOUND: (404, 404, 5, "not found"),
    Kind.METHOD: (405, 405, 12, "method not allowed"),
    Kind.TOO_LARGE: (413, 413, 8, "request body exceeds the route limit"),
    Kind.URL_TOO_LONG: (414, 414, 3, "request target too long"),
    Kind.HEADERS_TOO_LARGE: (431, 431, 3, "request header fields too large"),
    Kind.BAD_REQUEST: (400, 400, 3, "malformed HTTP request"),
    Kind.CLIENT_TIMEOUT: (408, 503, 14, "timed out reading the request body"),
    Kind.OVERLOADED: (429, 503, 14, "too many requests, retry later"),
    Kind.DRAINING: (503, 503, 14, "gateway is shutting down, retry"),
    Kind.UPSTREAM_CONNECT: (502, 503, 14, "upstream unavailable"),
    Kind.UPSTREAM_RESET: (502, 503, 14, "upstream connection failed"),
    Kind.UPSTREAM_PROTOCOL: (502, 503, 14, "upstream sent an invalid response"),
    Kind.UPSTREAM_TIMEOUT: (504, 503, 4, "upstream timed out"),
    Kind.INTERNAL: (503, 503, 14, "internal error, retry"),
    Kind.FORBIDDEN: (403, 403, 7, "client not allowed"),
    Kind.TENANT: (403, 403, 7, "token has no usable tenant claim"),
}

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# Seconds a sender should wait; short, because another replica or the next
# attempt usually succeeds.
RETRY_AFTER_SECONDS = 1
# Failures of the upstream: no Retry-After (see the table above).
_UPSTREAM = frozenset(
    (Kind.UPSTREAM_CONNECT, Kind.UPSTREAM_RESET, Kind.UPSTREAM_PROTOCOL, Kind.UPSTREAM_TIMEOUT)
)


def status_of(kind: Kind, protocol: Protocol) -> int:
    rw, otlp, _, _ = _TABLE[kind]
    return otlp if protocol is Protocol.OTLP else rw


def rpc_status_protobuf(code: int, message: str) -> bytes:
    """google.rpc.Status{code=1 (int32), message=2 (string)} in wire format."""
    msg = message.encode()
    return b"\x08" + varint(code) + b"\x12" + varint(len(msg)) + msg


class ErrorRenderer:
    """Pre-rendered error responses for one config generation.

    ``render`` returns the complete response; only the Date line, the
    Connection line and an optional extra header (``Allow``) vary.
    """

    __slots__ = ("_cache",)

    def __init__(self, realm: str) -> None:
        # (kind, protocol, json) → (status, head without Date/Connection, body)
        self._cache: dict[tuple[Kind, Protocol, bool], tuple[int, bytes, bytes]] = {}
        for kind in Kind:
            for protocol in Protocol:
                for as_json in (False, True):
                    self._cache[kind, protocol, as_json] = self._build(
                        kind, protocol, as_json, realm
                    )

    @staticmethod
    def _build(
        kind: Kind, protocol: Protocol, as_json: bool, realm: str
    ) -> tuple[int, bytes, bytes]:
        status = status_of(kind, protocol)
        _, _, grpc_code, message = _TABLE[kind]
        if protocol is Protocol.OTLP:
            if as_json:
                body, ctype = (
                    orjson.dumps({"code": grpc_code, "message": message}),
                    "application/json",
                )
            else:
                body, ctype = rpc_status_protobuf(grpc_code, message), "application/x-protobuf"
        else:
            body, ctype = (message + "\n").encode(), "text/plain; charset=utf-8"
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
        ]
        if kind is Kind.AUTH_MISSING:
            # RFC 6750 §3.1: no error code when no credentials were presented.
            lines.append(f'WWW-Authenticate: Bearer realm="{realm}"')
        elif kind is Kind.AUTH_INVALID:
            lines.append(f'WWW-Authenticate: Bearer realm="{realm}", error="invalid_token"')
        elif kind is Kind.SCOPE:
            lines.append(f'WWW-Authenticate: Bearer realm="{realm}", error="insufficient_scope"')
        if status in (429, 503) and kind not in _UPSTREAM:
            lines.append(f"Retry-After: {RETRY_AFTER_SECONDS}")
        head = ("\r\n".join(lines) + "\r\n").encode()
        return status, head, body

    def render(
        self,
        kind: Kind,
        protocol: Protocol,
        as_json: bool,
        date_line: bytes,
        close: bool,
        extra: bytes = b"",
        head_only: bool = False,
    ) -> tuple[int, bytes, int]:
        """(status, response bytes, body length).  ``date_line`` is ``b"Date: …\\r\\n"``."""
        status, head, body = self._cache[kind, protocol, as_json]
        conn = b"Connection: close\r\n" if close else b""
        if head_only:
            body = b""
        return status, b"".join((head, date_line, conn, extra, b"\r\n", body)), len(body)
