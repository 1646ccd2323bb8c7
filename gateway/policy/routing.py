"""The route table: raw request-target bytes → route, by exact path match.

No decoding, no normalisation, no regex: ``/api/v1/write/../x``,
``//api/v1/write``, ``%2e%2e`` or a trailing slash are simply other paths,
so they can never reach an upstream.  Everything a request needs from its
route (its backends, allowed methods, limits) is computed here once per
config generation.  A ``Target`` is what one request sends to one backend;
a ``Plan`` is where a request goes: a balancer over backends and a target
for each, the route's own (``Route.plan``) or one a credential's forward
table built (``tenancy.py``).  The backends' health lives in the worker's
``BackendRegistry`` (``balance.py``), which outlives generations.

Must not know: sockets, HTTP framing, credentials' secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from gateway.config.schema import RouteSpec, UpstreamSpec
from gateway.policy.backends import BackendSet, Upstream, route_backends, upstream_of
from gateway.policy.balance import BackendRegistry, Balancer
from gateway.policy.errors import Protocol
from gateway.policy.forward import PinnedHeaders, QueryFilter, arg_names

__all__ = [
    "HEALTH_PATH",
    "Plan",
    "Route",
    "RouteTable",
    "Target",
    "Upstream",
    "make_plan",
    "make_target",
    "split_target",
    "upstream_of",
]

HEALTH_PATH: Final = b"/health"


@dataclass(frozen=True, slots=True)
class Target:
    """What one request of a route sends upstream, before the client's part.

    ``bare`` is the whole request-target when the client's query adds
    nothing: the path, then the upstream URL's query (``lead``), then the
    pinned ``extra_label`` arguments (``tail``, last: VictoriaMetrics keeps
    the last value of a label).  A ``plain`` target only appends the
    client's query; the others filter it and may pin header fields.
    ``tenant`` is what the access line names (values from config).
    """

    upstream: Upstream
    bare: bytes = field(repr=False)
    joiner: bytes = field(repr=False)  # b"?" or b"&": where a plain target's client query goes
    path: bytes = field(repr=False)
    lead: bytes = field(repr=False)
    tail: bytes = field(repr=False)
    query: QueryFilter | None = None
    headers: PinnedHeaders | None = None
    tenant: Mapping[str, Mapping[str, str]] | None = None
    plain: bool = True

    def render(self, query: bytes) -> bytes:
        """A plain target's request-target: the client's query as it came."""
        return self.bare + self.joiner + query if query else self.bare

    def filtered(self, query: bytes) -> tuple[bytes, int, int]:
        """(request-target, client extra_label arguments dropped, other
        arguments dropped): the client's kept arguments go between the
        upstream URL's and the pinned labels."""
        labels = others = 0
        if query and self.query is not None:
            query, labels, others = self.query.apply(query)
        if not query:
            return self.bare, labels, others
        parts = [p for p in (self.lead, query, self.tail) if p]
        return self.path + b"?" + b"&".join(parts), labels, others


def make_target(
    upstream: Upstream,
    keep_query: bool,
    labels: bytes = b"",
    headers: PinnedHeaders | None = None,
    tenant: Mapping[str, Mapping[str, str]] | None = None,
) -> Target:
    """``labels``: the pinned ``extra_label=…`` arguments, joined by ``&``.
    A client argument with a name the gateway sends is never passed on."""
    url_query = upstream.query
    names = arg_names(url_query + b"&" + labels)
    query = None if keep_query and not names else QueryFilter(names, keep_query)
    path = upstream.path
    given = b"&".join(p for p in (url_query, labels) if p)
    return Target(
        upstream,
        path + b"?" + given if given else path,
        b"&" if given else b"?",
        path,
        url_query,
        labels,
        query,
        headers,
        tenant,
        query is None and headers is None,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request goes: a balancer over backends, and for each
    backend (by its position) the target sent to it."""

    balancer: Balancer = field(compare=False, repr=False)
    targets: tuple[Target, ...] = field(repr=False)


def make_plan(
    balancer: Balancer,
    keep_query: bool,
    labels: bytes = b"",
    headers: PinnedHeaders | None = None,
    tenant: Mapping[str, Mapping[str, str]] | None = None,
) -> Plan:
    """The same labels, headers and tenant, on every backend of ``balancer``."""
    return Plan(
        balancer,
        tuple(
            make_target(lane.backend.upstream, keep_query, labels, headers, tenant)
            for lane in balancer.lanes
        ),
    )


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
    # What a credential without a forward table sends to the first backend
    # (None: /health); ``plan`` has one for every backend.
    default: Target | None = None
    keep_query: bool = True  # query = "pass"
    backends: BackendSet | None = None
    # The route's own plan, its balancer bound to this worker's backend states.
    plan: Plan | None = field(default=None, compare=False, repr=False)

    def target(self, query: bytes) -> bytes:
        """The request-target sent upstream for a credential without a
        forward table: its path, then both queries."""
        assert self.default is not None
        return self.default.filtered(query)[0]


def _route(spec: RouteSpec, upstream: UpstreamSpec, registry: BackendRegistry) -> Route:
    methods = frozenset(m.encode() for m in spec.methods)
    allow = b"Allow: " + ", ".join(sorted(spec.methods)).encode() + b"\r\n"
    keep = spec.query == "pass"
    bset = route_backends(spec, upstream)
    plan = make_plan(registry.balancer(spec.name, bset), keep)
    return Route(
        spec.name,
        spec.path.encode(),
        Protocol.of(spec.protocol),
        methods,
        allow,
        bset.backends[0].upstream,
        spec.max_body_bytes,
        plan.targets[0],
        keep,
        bset,
        plan,
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
        """The balancers of the routes' own plans that the HTTP/1.1 data path
        uses (a gRPC route's one backend is the HTTP/2 upstream's:
        datapath/h2upstream.py)."""
        return [
            r.plan.balancer
            for r in self.routes
            if r.plan is not None and r.protocol is not Protocol.GRPC
        ]

    def get(self, path: bytes) -> Route | None:
        return self._by_path.get(path)

    def get_grpc(self, path: bytes) -> Route | None:
        return self._grpc.get(path)
