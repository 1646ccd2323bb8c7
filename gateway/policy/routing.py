"""The route table: raw request-target bytes → route, by exact path match.

No decoding, no normalisation, no regex: ``/api/v1/write/../x``,
``//api/v1/write``, ``%2e%2e`` or a trailing slash are simply other paths,
so they can never reach an upstream.  Everything a request needs from its
route (upstream address, request-target prefix, allowed methods, limits)
is computed here once per config generation.

Must not know: sockets, HTTP framing, credentials' secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from gateway.config.schema import RouteSpec
from gateway.policy.errors import Protocol

__all__ = ["HEALTH_PATH", "Route", "RouteTable", "Upstream", "split_target"]

HEALTH_PATH: Final = b"/health"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route's requests go.  Logged never: addresses stay internal."""

    scheme: str
    host: str
    port: int
    # Bytes sent as the Host header and as the start of the request target.
    host_header: bytes = field(repr=False)
    path: bytes = field(repr=False)
    query: bytes = field(repr=False)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path: bytes
    protocol: Protocol
    methods: frozenset[bytes]
    allow_line: bytes  # "Allow: POST\r\n", for 405 answers
    upstream: Upstream | None
    max_body_bytes: int

    def target(self, query: bytes) -> bytes:
        """The request-target sent upstream: its path, then both queries."""
        up = self.upstream
        assert up is not None
        if not query:
            return up.path + (b"?" + up.query if up.query else b"")
        if up.query:
            return up.path + b"?" + up.query + b"&" + query
        return up.path + b"?" + query


def _upstream(url: str) -> Upstream:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)  # schema.py refuses port 0
    default_port = port == (443 if scheme == "https" else 80)
    # The name alone goes through IDNA (schema.py checked it can); the port
    # is never part of a label.
    name = host.encode("ascii") if host.isascii() else host.encode("idna")
    shown = b"[" + name + b"]" if ":" in host else name
    host_header = shown if default_port else shown + b":%d" % port
    return Upstream(
        scheme,
        host,
        port,
        host_header,
        (parts.path or "/").encode(),
        parts.query.encode(),
    )


def _route(spec: RouteSpec) -> Route:
    methods = frozenset(m.encode() for m in spec.methods)
    allow = b"Allow: " + ", ".join(sorted(spec.methods)).encode() + b"\r\n"
    return Route(
        spec.name,
        spec.path.encode(),
        Protocol.of(spec.protocol),
        methods,
        allow,
        _upstream(spec.upstream),
        spec.max_body_bytes,
    )


HEALTH: Final = Route(
    "health",
    HEALTH_PATH,
    Protocol.PLAIN,
    frozenset({b"GET", b"HEAD"}),
    b"Allow: GET, HEAD\r\n",
    None,
    0,
)


# Where an absolute-form authority ends: RFC 3986 §3.2, and a backslash
# for WHATWG parsers.  The first of these.
_AUTHORITY_ENDS: Final = (b"/", b"?", b"#", b"\\")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """request-target → (path, query) without decoding anything.

    Absolute-form (RFC 9112 §3.2.2, which servers must accept) is routed by
    the path a proxy in front of the gateway sees: its authority ends at the
    first "/", "?" or "#", so ``http://h?/api/v1/write`` is path "/" with a
    query, never the route ``/api/v1/write``.  Anything else that is not
    origin-form yields a path that matches no route.
    """
    if target[:1] != b"/":
        lowered = target[:8].lower()
        if lowered.startswith((b"http://", b"https://")):
            rest = target[target.index(b"//") + 2 :]
            end = len(rest)
            for stop in _AUTHORITY_ENDS:
                found = rest.find(stop, 0, end)
                if found >= 0:
                    end = found
            rest = rest[end:]
            target = rest if rest[:1] == b"/" else b"/" + rest
    path, _, query = target.partition(b"?")
    return path, query


class RouteTable:
    """Two views of one table: gRPC methods exist only for HTTP/2 requests
    (gRPC needs HTTP/2's trailers), the other routes for HTTP/1.1."""

    __slots__ = ("_by_path", "_grpc", "grpc", "routes")

    def __init__(self, specs: tuple[RouteSpec, ...]) -> None:
        self.routes: tuple[Route, ...] = tuple(_route(s) for s in specs)
        self._by_path: dict[bytes, Route] = {
            r.path: r for r in self.routes if r.protocol is not Protocol.GRPC
        }
        self._by_path[HEALTH_PATH] = HEALTH
        self._grpc: dict[bytes, Route] = {
            r.path: r for r in self.routes if r.protocol is Protocol.GRPC
        }
        # Whether HTTP/2 is offered in TLS ALPN at all (see datapath/h2switch.py).
        self.grpc = bool(self._grpc)

    def get(self, path: bytes) -> Route | None:
        return self._by_path.get(path)

    def get_grpc(self, path: bytes) -> Route | None:
        return self._grpc.get(path)
