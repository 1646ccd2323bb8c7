"""The route table: raw request-target bytes → route, by exact path match.

No decoding, no normalisation, no regex: ``/api/v1/write/../x``,
``//api/v1/write``, ``%2e%2e`` or a trailing slash are simply other paths,
so they can never reach an upstream.  Everything a request needs from its
route (its backends and their balancer, allowed methods, limits) is
computed here once per config generation; the backends' health lives in
the worker's ``BackendRegistry`` (``balance.py``), which outlives it.

Must not know: sockets, HTTP framing, credentials' secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config.schema import RouteSpec, UpstreamSpec
from gateway.policy.backends import BackendSet, Upstream, route_backends
from gateway.policy.balance import BackendRegistry, Balancer
from gateway.policy.errors import Protocol

__all__ = ["HEALTH_PATH", "Route", "RouteTable", "Upstream", "split_target"]

HEALTH_PATH = b"/health"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path: bytes
    protocol: Protocol
    methods: frozenset[bytes]
    allow_line: bytes  # "Allow: POST\r\n", for 405 answers
    # The first backend (what a code path that knows one backend uses).
    upstream: Upstream | None
    max_body_bytes: int
    backends: BackendSet | None = None
    # The set bound to this worker's backend states (runtime: not compared).
    balancer: Balancer | None = field(default=None, compare=False, repr=False)

    def target(self, query: bytes) -> bytes:
        """The request-target sent to the first backend."""
        up = self.upstream
        assert up is not None
        return up.target(query)


def _route(spec: RouteSpec, upstream: UpstreamSpec, registry: BackendRegistry) -> Route:
    methods = frozenset(m.encode() for m in spec.methods)
    allow = b"Allow: " + ", ".join(sorted(spec.methods)).encode() + b"\r\n"
    bset = route_backends(spec, upstream)
    return Route(
        spec.name,
        spec.path.encode(),
        Protocol.of(spec.protocol),
        methods,
        allow,
        bset.backends[0].upstream,
        spec.max_body_bytes,
        bset,
        registry.balancer(spec.name, bset),
    )


HEALTH = Route(
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
_AUTHORITY_ENDS = (b"/", b"?", b"#", b"\\")


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

    def __init__(
        self,
        specs: tuple[RouteSpec, ...],
        upstream: UpstreamSpec | None = None,
        registry: BackendRegistry | None = None,
    ) -> None:
        up = upstream if upstream is not None else UpstreamSpec()
        reg = registry if registry is not None else BackendRegistry()
        self.routes: tuple[Route, ...] = tuple(_route(s, up, reg) for s in specs)
        self._by_path: dict[bytes, Route] = {
            r.path: r for r in self.routes if r.protocol is not Protocol.GRPC
        }
        self._by_path[HEALTH_PATH] = HEALTH
        self._grpc: dict[bytes, Route] = {
            r.path: r for r in self.routes if r.protocol is Protocol.GRPC
        }
        # Whether HTTP/2 is offered in TLS ALPN at all (see datapath/h2switch.py).
        self.grpc = bool(self._grpc)

    @property
    def balancers(self) -> list[Balancer]:
        """The balancers the HTTP/1.1 data path uses (a gRPC route's one
        backend is the HTTP/2 upstream's: datapath/h2upstream.py)."""
        return [
            r.balancer
            for r in self.routes
            if r.balancer is not None and r.protocol is not Protocol.GRPC
        ]

    def get(self, path: bytes) -> Route | None:
        return self._by_path.get(path)

    def get_grpc(self, path: bytes) -> Route | None:
        return self._grpc.get(path)
