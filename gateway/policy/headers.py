"""Header hygiene for both directions of the proxy.  Pure functions on bytes.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields it knows, and every
field named in ``Connection``.  On top of that the gateway drops what it
re-frames or owns itself (Content-Length, Transfer-Encoding, Host, Expect)
and the client's ``Authorization``: the credential was for the gateway, and
an upstream must never see it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CLIENT_ADDRESS",
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "connection_tokens",
    "drop_listed",
    "h1_safe",
    "strip_listed",
]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request fields not copied upstream as they came (some are rebuilt).
REQUEST_DROP: Final = HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}

# Fields that name the client or the original request as some proxy saw
# it.  A client can write any of them, and a trusted proxy passes its own
# client's copies on, so none is ever copied upstream: the gateway sends
# X-Forwarded-For, X-Forwarded-Proto and X-Real-IP itself, and the
# configured client address header is read, then dropped.  Any name that
# starts with "x-forwarded-" counts too (RequestHead).
CLIENT_ADDRESS: Final = frozenset(
    {
        b"forwarded",
        b"x-forwarded",
        b"x-real-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"fastly-client-ip",
    }
)

# Response fields not copied to the client as they came: framing is ours.
RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """The field names listed in Connection headers, lowercased."""
    out: set[bytes] = set()
    for value in values:
        for raw in value.split(b","):
            token = raw.strip().lower()
            if token:
                out.add(token)
    return frozenset(out)


def drop_listed(
    headers: list[tuple[bytes, bytes]], listed: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Remove the fields a Connection header named (rare: off the fast path)."""
    return [(n, v) for n, v in headers if n.lower() not in listed]


def strip_listed(parts: list[bytes], listed: list[bytes]) -> list[bytes]:
    """``drop_listed`` for fields kept as flat wire pieces
    (name, b": ", value, b"\\r\\n", ...), as both directions hold them."""
    pairs = [(parts[i], parts[i + 2]) for i in range(0, len(parts), 4)]
    kept = drop_listed(pairs, connection_tokens(listed))
    return [piece for name, value in kept for piece in (name, b": ", value, b"\r\n")]


# HTTP/2 forbids only NUL, CR and LF in values and controls, spaces, colons
# and upper case in names (RFC 9113 §8.2.1, checked by h2); an HTTP/1.1
# field is stricter (RFC 9110 §5.1, §5.5): a name is a token, a value has
# no control character but HTAB, a request target is visible ASCII (RFC 3986).
_NOT_TOKEN = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NOT_TARGET = re.compile(rb"[^\x21-\x7e]")


def h1_safe(target: bytes, parts: list[bytes]) -> bool:
    """Whether an HTTP/2 request's target and fields (flat wire pieces,
    name, b": ", value, b"\\r\\n", ...) can be written as HTTP/1.1 as they are."""
    if _NOT_TARGET.search(target):
        return False
    for i in range(0, len(parts), 4):
        if _NOT_TOKEN.search(parts[i]) or _CONTROL.search(parts[i + 2]):
            return False
    return True
