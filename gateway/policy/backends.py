"""Backends as values: where one backend is (``Upstream``), one backend of
a set (``Backend``: its label and weight), and ``BackendSet``: a set of
backends with a balancing policy, failover limits and health-check
settings.

A route has one ``BackendSet``; a credential's override of a route's
backends (issue 13) is another, built by the same function.  Computed once
per config generation from validated specs; the per-worker state that
goes with a set (health, load, choice) is ``balance.py``'s.

Must not know: sockets, clocks, metrics.  Addresses never leave the
gateway: ``label`` is what logs and metrics name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.config.routes import BackendSpec, HealthCheckSpec, RouteSpec
from gateway.config.schema import UpstreamSpec

__all__ = [
    "FIRST_AVAILABLE",
    "LEAST_OUTSTANDING",
    "ROUND_ROBIN",
    "Backend",
    "BackendSet",
    "Ejection",
    "Probe",
    "Upstream",
    "backend_set",
    "route_backends",
    "upstream_of",
]

# Balancing policies as plain ints: compared when a multi-backend request picks.
LEAST_OUTSTANDING, ROUND_ROBIN, FIRST_AVAILABLE = 0, 1, 2
_POLICIES = {
    "least_outstanding": LEAST_OUTSTANDING,
    "round_robin": ROUND_ROBIN,
    "first_available": FIRST_AVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a backend's requests go.  Logged never: addresses stay internal."""

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


def upstream_of(url: str) -> Upstream:
    """Where an upstream URL points (the config checked it: config/urls.py)."""
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)  # check_url refuses port 0
    default_port = port == (443 if scheme == "https" else 80)
    # The name alone goes through IDNA (check_url checked it can); the port
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


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of a set: its position, label, address and weight."""

    index: int
    label: str  # from config: a name, or host:port of the URL
    url: str = field(repr=False)  # with the set's owner: the key of its per-worker state
    upstream: Upstream = field(repr=False)
    weight: int = 1
    named: bool = False  # the label is a configured name, not the URL's host:port


@dataclass(frozen=True, slots=True)
class Probe:
    """The active health check of a set's backends."""

    path: bytes
    interval: float
    timeout: float
    healthy: int  # passes in a row that bring a backend back
    unhealthy: int  # failures in a row that take it out


@dataclass(frozen=True, slots=True)
class Ejection:
    """Passive health: failures in a row that eject, and for how long."""

    after_failures: int = 1
    base: float = 1.0
    max: float = 10.0

    def duration(self, previous: int) -> float:
        """Seconds of an ejection that follows ``previous`` ones in a row."""
        return min(self.max, self.base * 2.0 ** min(previous, 30))


@dataclass(frozen=True, slots=True)
class BackendSet:
    """Backends with a balancing policy, per-backend health and failover."""

    backends: tuple[Backend, ...]
    policy: int = LEAST_OUTSTANDING  # one of the constants above
    # Distinct backends one request may be tried on.
    attempts: int = 1
    retry_statuses: frozenset[int] = frozenset()
    replay_bytes: int = 0  # body bytes copied for a replay; 0: no copy
    probe: Probe | None = None
    ejection: Ejection = Ejection()

    @property
    def balance(self) -> str:
        return next(name for name, value in _POLICIES.items() if value == self.policy)


def _probe(spec: HealthCheckSpec | None) -> Probe | None:
    if spec is None:
        return None
    return Probe(
        spec.path.encode("ascii"),
        spec.interval_seconds,
        spec.timeout_seconds,
        spec.healthy_threshold,
        spec.unhealthy_threshold,
    )


def backend_set(
    entries: tuple[tuple[str, BackendSpec], ...], route: RouteSpec, upstream: UpstreamSpec
) -> BackendSet:
    """A set of these (label, backend) entries under the route's policy,
    failover and health settings (a route's own, or an override's)."""
    backends = tuple(
        Backend(i, label, spec.url, upstream_of(spec.url), spec.weight, spec.name is not None)
        for i, (label, spec) in enumerate(entries)
    )
    attempts = min(route.attempts, len(backends))
    return BackendSet(
        backends,
        _POLICIES[route.balance],
        attempts,
        frozenset(route.retry_statuses) if attempts > 1 else frozenset(),
        route.replay_buffer_bytes if attempts > 1 else 0,
        _probe(route.health_check),
        Ejection(
            upstream.eject_after_failures, upstream.eject_base_seconds, upstream.eject_max_seconds
        ),
    )


def route_backends(route: RouteSpec, upstream: UpstreamSpec) -> BackendSet:
    return backend_set(route.backends(), route, upstream)
