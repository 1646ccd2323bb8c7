"""The gateway's own counters: cheap on the hot path, plain data at scrape.

A request costs a handful of integer additions on plain objects; nothing
on the request path touches prometheus-client (``gateway.admin`` renders
snapshots at scrape time, and worker processes never import it).
``snapshot()`` copies them into typed values (``snapshot.py``) that the
supervisor of several workers sums into one exposition whose counters add
up.

Label values are bounded: route and credential names from config, token
ids from config, status codes, and fixed reason/kind words; never a path,
a header or anything else a client sent.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from gateway.telemetry.snapshot import (
    BackendSnap,
    FailureSnap,
    OverrideSnap,
    PairSnap,
    RouteSnap,
    Snapshot,
    TokenSnap,
)

__all__ = ["DURATION_BUCKETS", "BackendStats", "RouteStats", "Stats"]

# Seconds.  Remote-write round trips on loopback sit near 1 ms; a slow
# VictoriaMetrics or a big batch over the internet reaches tens of seconds.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_NB: Final = len(DURATION_BUCKETS)


class _Hist:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (_NB + 1)  # last slot: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value


class RouteStats:
    """Everything keyed by route alone."""

    __slots__ = (
        "added",
        "duration",
        "in_flight",
        "replay_skipped",
        "replayed_bytes",
        "response_bytes",
        "retries",
        "upstream",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.duration = _Hist()
        self.upstream = _Hist()
        self.added = _Hist()  # the whole exchange minus the upstream's response time
        self.response_bytes = 0
        self.upstream_errors: dict[str, int] = {}
        # Failover: retries by the kind of failure that caused them, body
        # bytes sent again, requests that streamed without a replay copy.
        self.retries: dict[str, int] = {}
        self.replayed_bytes = 0
        self.replay_skipped: dict[str, int] = {}


class BackendStats:
    """Keyed by (route, backend label): one backend's traffic and failures."""

    __slots__ = ("ejections", "failures", "probes", "requests")

    def __init__(self) -> None:
        self.requests = 0  # attempts sent to it
        self.failures: dict[str, int] = {}  # by kind: connect, timeout, reset, protocol, status
        self.ejections: dict[str, int] = {}  # by cause: failures (passive), probe
        self.probes: dict[str, int] = {}  # active probe results: ok, failed

    @staticmethod
    def add(counts: dict[str, int], key: str) -> None:
        counts[key] = counts.get(key, 0) + 1


class PairStats:
    """Keyed by (route, credential)."""

    __slots__ = ("codes", "request_bytes")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.request_bytes = 0


class TokenStats:
    """Keyed by (credential, token id): the rotation signal."""

    __slots__ = ("last_used", "request_bytes", "requests")

    def __init__(self) -> None:
        self.last_used = 0.0
        self.requests = 0
        self.request_bytes = 0


class Stats:
    """One process's counters.  Survives config reloads (counters never reset)."""

    __slots__ = (
        "auth_failures",
        "backends",
        "headers_dropped",
        "limit_rejections",
        "open_connections",
        "overrides",
        "pairs",
        "replay_bytes",
        "routes",
        "tokens",
    )

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.backends: dict[tuple[str, str], BackendStats] = {}
        # Bytes held by replay copies right now (a gauge, and the pool that
        # [upstream] replay_memory_bytes bounds).
        self.replay_bytes = 0
        self.pairs: dict[tuple[str, str], PairStats] = {}
        self.tokens: dict[tuple[str, str], TokenStats] = {}
        self.auth_failures: dict[tuple[str, str, str], int] = {}
        self.limit_rejections: dict[str, int] = {}
        self.headers_dropped: dict[str, int] = {}  # reason → request header fields
        # (credential, kind) → client arguments / fields a forward table overrode.
        self.overrides: dict[tuple[str, str], int] = {}
        self.open_connections = 0

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats

    def backend(self, route: str, label: str) -> BackendStats:
        key = (route, label)
        stats = self.backends.get(key)
        if stats is None:
            stats = self.backends[key] = BackendStats()
        return stats

    def pair(self, route: str, credential: str) -> PairStats:
        key = (route, credential)
        stats = self.pairs.get(key)
        if stats is None:
            stats = self.pairs[key] = PairStats()
        return stats

    def token(self, credential: str, token_id: str) -> TokenStats:
        key = (credential, token_id)
        stats = self.tokens.get(key)
        if stats is None:
            stats = self.tokens[key] = TokenStats()
        return stats

    def auth_failure(self, reason: str, credential: str = "", token_id: str = "") -> None:
        # "none" where the config names nothing (missing, malformed, unknown),
        # as gateway_requests_total labels a request before authentication.
        key = (reason, credential or "none", token_id or "none")
        self.auth_failures[key] = self.auth_failures.get(key, 0) + 1

    def limit_rejection(self, reason: str) -> None:
        self.limit_rejections[reason] = self.limit_rejections.get(reason, 0) + 1

    def header_dropped(self, reason: str, n: int = 1) -> None:
        self.headers_dropped[reason] = self.headers_dropped.get(reason, 0) + n

    def overrides_dropped(self, credential: str, kind: str, n: int) -> None:
        """What a client sent that its credential's forwarding removed:
        ``kind`` is extra_label, query_arg (other arguments) or header."""
        key = (credential, kind)
        self.overrides[key] = self.overrides.get(key, 0) + n

    def upstream_error(self, route: str, kind: str) -> None:
        errors = self.route(route).upstream_errors
        errors[kind] = errors.get(kind, 0) + 1

    def snapshot(self) -> Snapshot:
        """A copy of every counter, for rendering here or merging in a supervisor."""
        return Snapshot(
            {
                name: RouteSnap(
                    r.in_flight,
                    [*r.duration.counts, r.duration.total],
                    [*r.upstream.counts, r.upstream.total],
                    r.response_bytes,
                    dict(r.upstream_errors),
                    [*r.added.counts, r.added.total],
                    dict(r.retries),
                    r.replayed_bytes,
                    dict(r.replay_skipped),
                )
                for name, r in self.routes.items()
            },
            [
                PairSnap(route, cred, dict(p.codes), p.request_bytes)
                for (route, cred), p in self.pairs.items()
            ],
            [
                TokenSnap(cred, tid, t.last_used, t.requests, t.request_bytes)
                for (cred, tid), t in self.tokens.items()
            ],
            [FailureSnap(*key, n) for key, n in self.auth_failures.items()],
            dict(self.limit_rejections),
            self.open_connections,
            headers_dropped=dict(self.headers_dropped),
            overrides=[OverrideSnap(*key, n) for key, n in self.overrides.items()],
            backends=[
                BackendSnap(
                    route, label, b.requests, dict(b.failures), dict(b.ejections), dict(b.probes)
                )
                for (route, label), b in self.backends.items()
            ],
            replay_bytes=self.replay_bytes,
        )
