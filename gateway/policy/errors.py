"""The status-code contract: every answer the gateway makes itself.

Senders decide to retry or drop by status code (DESIGN §3), so the whole
policy lives in this one table, per route protocol:

    Kind               remote-write          otlp-http            otlp-grpc (HTTP 200)
    AUTH_MISSING       401 WWW-Authenticate  401                  16 UNAUTHENTICATED
    AUTH_INVALID       401 error=invalid_token                    16 UNAUTHENTICATED
    SCOPE              403 insufficient_scope                     7 PERMISSION_DENIED
    TENANT             403 (a JWT's tenant claim is missing or refused)  7 PERMISSION_DENIED
    FORBIDDEN          403 (client address or certificate not allowed)  7 PERMISSION_DENIED
    NOT_FOUND          404                   404                  12 UNIMPLEMENTED
    METHOD             405 + Allow           405 + Allow          12 UNIMPLEMENTED
    TOO_LARGE          413                   413                  8 RESOURCE_EXHAUSTED
    URL_TOO_LONG       414 / HEADERS_TOO_LARGE 431 / BAD_REQUEST 400 (malformed HTTP)
                                                                  3 INVALID_ARGUMENT
    CLIENT_TIMEOUT     408                   503 + Retry-After    14 UNAVAILABLE + pushback
    OVERLOADED         429 + Retry-After     503 + Retry-After    14 UNAVAILABLE + pushback
    DRAINING           503 + Retry-After     503 + Retry-After    14 UNAVAILABLE + pushback
    UPSTREAM_CONNECT   502                   503, no Retry-After  14 UNAVAILABLE
    UPSTREAM_RESET     502                   503, no Retry-After  14 UNAVAILABLE
    UPSTREAM_PROTOCOL  502                   503, no Retry-After  14 UNAVAILABLE
    UPSTREAM_TIMEOUT   504                   503, no Retry-After  14 UNAVAILABLE
    INTERNAL           503 + Retry-After     503 + Retry-After    14 UNAVAILABLE + pushback

(OTLP drops 408 and the Python SDK drops 429; Go SDKs before 1.20 drop
502/504; 500 is never sent, OTLP drops it; gRPC never gets UNKNOWN or
INTERNAL for a cause on the gateway's side.)

gRPC answers are trailers-only: HTTP 200, ``content-type: application/grpc``,
``grpc-status`` and ``grpc-message`` in the one HEADERS frame that ends the
stream.  "+ pushback" means ``grpc-retry-pushback-ms`` (gRPC's own retry
policy) and ``google.rpc.retryinfo-bin`` (a ``google.rpc.RetryInfo``, which
the OpenTelemetry SDKs read as their next backoff), both one second: the
same cases that get Retry-After over HTTP/1.1, for the same reasons.

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

import base64
import enum
from typing import Final

import orjson

from gateway.policy.protowire import varint

__all__ = [
    "CLIENT_CLOSED",
    "GRPC_OK",
    "ErrorRenderer",
    "Kind",
    "Protocol",
    "grpc_code",
    "grpc_trailers_only",
    "status_of",
]

# nginx's convention for "client closed the connection before the answer";
# only ever a log/metric value, never sent.
CLIENT_CLOSED: Final = 499


class Protocol(enum.IntEnum):
    PLAIN = 0
    REMOTE_WRITE = 1
    OTLP = 2
    GRPC = 3  # OTLP over gRPC (HTTP/2)

    @classmethod
    def of(cls, name: str) -> Protocol:
        if name == "otlp-grpc":
            return cls.GRPC
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


# kind: (remote-write status, otlp status, gRPC code for OTLP/HTTP bodies,
#        gRPC status for otlp-grpc routes, message)
# gRPC codes: 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED, 5 NOT_FOUND,
# 7 PERMISSION_DENIED, 8 RESOURCE_EXHAUSTED, 12 UNIMPLEMENTED, 14 UNAVAILABLE,
# 16 UNAUTHENTICATED.
_TABLE: Final[dict[Kind, tuple[int, int, int, int, str]]] = {
    Kind.AUTH_MISSING: (401, 401, 16, 16, "missing bearer token"),
    Kind.AUTH_INVALID: (401, 401, 16, 16, "invalid bearer token"),
    Kind.SCOPE: (403, 403, 7, 7, "credential is not allowed on this route"),
    Kind.NOT_FOUND: (404, 404, 5, 12, "not found"),
    Kind.METHOD: (405, 405, 12, 12, "method not allowed"),
    Kind.TOO_LARGE: (413, 413, 8, 8, "request body exceeds the route limit"),
    Kind.URL_TOO_LONG: (414, 414, 3, 3, "request target too long"),
    Kind.HEADERS_TOO_LARGE: (431, 431, 3, 3, "request header fields too large"),
    Kind.BAD_REQUEST: (400, 400, 3, 3, "malformed HTTP request"),
    Kind.CLIENT_TIMEOUT: (408, 503, 14, 14, "timed out reading the request body"),
    Kind.OVERLOADED: (429, 503, 14, 14, "too many requests, retry later"),
    Kind.DRAINING: (503, 503, 14, 14, "gateway is shutting down, retry"),
    Kind.UPSTREAM_CONNECT: (502, 503, 14, 14, "upstream unavailable"),
    Kind.UPSTREAM_RESET: (502, 503, 14, 14, "upstream connection failed"),
    Kind.UPSTREAM_PROTOCOL: (502, 503, 14, 14, "upstream sent an invalid response"),
    Kind.UPSTREAM_TIMEOUT: (504, 503, 4, 14, "upstream timed out"),
    Kind.INTERNAL: (503, 503, 14, 14, "internal error, retry"),
    Kind.FORBIDDEN: (403, 403, 7, 7, "client not allowed"),
    Kind.TENANT: (403, 403, 7, 7, "token has no usable tenant claim"),
}

_REASONS: Final = {
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
RETRY_AFTER_SECONDS: Final = 1
# Failures of the upstream: no Retry-After (see the table above).
_UPSTREAM: Final = frozenset(
    (Kind.UPSTREAM_CONNECT, Kind.UPSTREAM_RESET, Kind.UPSTREAM_PROTOCOL, Kind.UPSTREAM_TIMEOUT)
)


def status_of(kind: Kind, protocol: Protocol) -> int:
    """The HTTP status; for gRPC, the one counted in metrics (OTLP/HTTP's),
    while the wire says HTTP 200 and ``grpc_code(kind)``."""
    rw, otlp, _, _, _ = _TABLE[kind]
    return otlp if protocol >= Protocol.OTLP else rw


def grpc_code(kind: Kind) -> int:
    """The ``grpc-status`` of a gRPC answer the gateway makes itself."""
    return _TABLE[kind][3]


# The HTTP status of every gRPC answer: the outcome is in grpc-status.
GRPC_OK: Final = 200
_PUSHBACK_MS: Final = b"1000"
# google.rpc.RetryInfo{retry_delay: Duration{seconds: 1}}, base64 as every
# "-bin" metadata value is on the wire.
_RETRY_INFO: Final = base64.b64encode(b"\x0a\x02\x08\x01").rstrip(b"=")


def grpc_trailers_only(kind: Kind) -> list[tuple[bytes, bytes]]:
    """The one HEADERS frame (END_STREAM) of a gRPC answer made here; built
    once per kind."""
    return _GRPC_ANSWERS[kind]


def _grpc_answer(kind: Kind) -> list[tuple[bytes, bytes]]:
    _, _, _, code, message = _TABLE[kind]
    fields = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", message.encode()),  # constants: nothing to percent-encode
    ]
    if code == 14 and kind not in _UPSTREAM:
        fields += ((b"grpc-retry-pushback-ms", _PUSHBACK_MS),)
        fields += ((b"google.rpc.retryinfo-bin", _RETRY_INFO),)
    return fields


_GRPC_ANSWERS: Final = {kind: _grpc_answer(kind) for kind in Kind}


_Fields = list[tuple[bytes, bytes]]


def rpc_status_protobuf(code: int, message: str) -> bytes:
    """google.rpc.Status{code=1 (int32), message=2 (string)} in wire format."""
    msg = message.encode()
    return b"\x08" + varint(code) + b"\x12" + varint(len(msg)) + msg


class ErrorRenderer:
    """Pre-rendered error responses for one config generation.

    ``render`` returns the complete HTTP/1.1 response; only the Date line,
    the Connection line and an optional extra header (``Allow``) vary.
    ``render_h2`` gives the same answer as HTTP/2 fields and a body: one
    table, two framings.
    """

    __slots__ = ("_cache", "_h2", "_realm")

    def __init__(self, realm: str) -> None:
        self._realm = realm
        # (kind, protocol, json) → (status, head without Date/Connection, body)
        self._cache: dict[tuple[Kind, Protocol, bool], tuple[int, bytes, bytes]] = {}
        # (kind, protocol, json) → (status, fields without date, body); built
        # on first use: a worker that never speaks HTTP/2 keeps none of it.
        self._h2: dict[tuple[Kind, Protocol, bool], tuple[int, _Fields, bytes]] = {}
        for kind in Kind:
            for protocol in Protocol:
                for as_json in (False, True):
                    status, fields, body = self._build(kind, protocol, as_json, realm)
                    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
                    lines += (f"{name}: {value}" for name, value in fields)
                    head = ("\r\n".join(lines) + "\r\n").encode()
                    self._cache[kind, protocol, as_json] = (status, head, body)

    @staticmethod
    def _build(
        kind: Kind, protocol: Protocol, as_json: bool, realm: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        status = status_of(kind, protocol)
        _, _, rpc_code, _, message = _TABLE[kind]
        if protocol >= Protocol.OTLP:
            if as_json:
                body, ctype = (
                    orjson.dumps({"code": rpc_code, "message": message}),
                    "application/json",
                )
            else:
                body, ctype = rpc_status_protobuf(rpc_code, message), "application/x-protobuf"
        else:
            body, ctype = (message + "\n").encode(), "text/plain; charset=utf-8"
        fields = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if kind is Kind.AUTH_MISSING:
            # RFC 6750 §3.1: no error code when no credentials were presented.
            fields.append(("WWW-Authenticate", f'Bearer realm="{realm}"'))
        elif kind is Kind.AUTH_INVALID:
            fields.append(("WWW-Authenticate", f'Bearer realm="{realm}", error="invalid_token"'))
        elif kind is Kind.SCOPE:
            fields.append(
                ("WWW-Authenticate", f'Bearer realm="{realm}", error="insufficient_scope"')
            )
        if status in (429, 503) and kind not in _UPSTREAM:
            fields.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
        return status, fields, body

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

    def render_h2(
        self, kind: Kind, protocol: Protocol, as_json: bool, date: bytes
    ) -> tuple[int, _Fields, bytes]:
        """(status, HTTP/2 fields with ``date``, body): a new list, so the
        caller may append (``allow``)."""
        key = (kind, protocol, as_json)
        entry = self._h2.get(key)
        if entry is None:
            status, named, body = self._build(kind, protocol, as_json, self._realm)
            h2 = [(b":status", b"%d" % status)]
            h2 += ((name.lower().encode(), value.encode()) for name, value in named)
            entry = self._h2[key] = (status, h2, body)
        status, fields, body = entry
        return status, [*fields, (b"date", date)], body
