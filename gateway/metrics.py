"""The gateway's own counters: cheap on the hot path, plain data at scrape.

A request costs a handful of integer additions on plain objects; nothing
on the request path touches prometheus-client (``exposition.py`` renders
snapshots at scrape time, and worker processes never import it).
Snapshots are plain JSON-able data, so the supervisor of several workers
sums theirs (``merge``) into one exposition whose counters add up.

Label values are bounded: route and credential names from config, token
ids from config, status codes, and fixed reason/kind words; never a path,
a header or anything else a client sent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

__all__ = ["DURATION_BUCKETS", "Snapshot", "Stats", "merge"]

# Seconds.  Remote-write round trips on loopback sit near 1 ms; a slow
# VictoriaMetrics or a big batch over the internet reaches tens of seconds.
DURATION_BUCKETS: tuple[float, ...] = (
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
_NB = len(DURATION_BUCKETS)

Snapshot = dict[str, Any]


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

    __slots__ = ("duration", "in_flight", "response_bytes", "upstream", "upstream_errors")

    def __init__(self) -> None:
        self.in_flight = 0
        self.duration = _Hist()
        self.upstream = _Hist()
        self.response_bytes = 0
        self.upstream_errors: dict[str, int] = {}


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
        "limit_rejections",
        "open_connections",
        "pairs",
        "routes",
        "tokens",
    )

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.pairs: dict[tuple[str, str], PairStats] = {}
        self.tokens: dict[tuple[str, str], TokenStats] = {}
        self.auth_failures: dict[tuple[str, str, str], int] = {}
        self.limit_rejections: dict[str, int] = {}
        self.open_connections = 0

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
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

    def upstream_error(self, route: str, kind: str) -> None:
        errors = self.route(route).upstream_errors
        errors[kind] = errors.get(kind, 0) + 1

    def snapshot(self) -> Snapshot:
        """Plain data (JSON-able) for rendering here or merging in a supervisor."""
        return {
            "routes": {
                name: {
                    "in_flight": r.in_flight,
                    "duration": [*r.duration.counts, r.duration.total],
                    "upstream": [*r.upstream.counts, r.upstream.total],
                    "response_bytes": r.response_bytes,
                    "upstream_errors": dict(r.upstream_errors),
                }
                for name, r in self.routes.items()
            },
            "pairs": [
                [route, cred, {str(c): n for c, n in p.codes.items()}, p.request_bytes]
                for (route, cred), p in self.pairs.items()
            ],
            "tokens": [
                [cred, tid, t.last_used, t.requests, t.request_bytes]
                for (cred, tid), t in self.tokens.items()
            ],
            "auth_failures": [[*key, n] for key, n in self.auth_failures.items()],
            "limit_rejections": dict(self.limit_rejections),
            "open_connections": self.open_connections,
        }


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum counters and histograms, add gauges, keep the latest last-used."""
    routes: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[str, str], list[Any]] = {}
    tokens: dict[tuple[str, str], list[Any]] = {}
    failures: dict[tuple[str, str, str], int] = {}
    rejections: dict[str, int] = {}
    open_connections = 0
    for snap in snapshots:
        for name, r in snap["routes"].items():
            acc = routes.get(name)
            if acc is None:
                routes[name] = {**r, "upstream_errors": dict(r["upstream_errors"])}
                continue
            acc["in_flight"] += r["in_flight"]
            acc["response_bytes"] += r["response_bytes"]
            acc["duration"] = [a + b for a, b in zip(acc["duration"], r["duration"], strict=True)]
            acc["upstream"] = [a + b for a, b in zip(acc["upstream"], r["upstream"], strict=True)]
            for kind, n in r["upstream_errors"].items():
                acc["upstream_errors"][kind] = acc["upstream_errors"].get(kind, 0) + n
        for route, cred, codes, nbytes in snap["pairs"]:
            p = pairs.setdefault((route, cred), [route, cred, {}, 0])
            for code, n in codes.items():
                p[2][code] = p[2].get(code, 0) + n
            p[3] += nbytes
        for cred, tid, last, nreq, nbytes in snap["tokens"]:
            t = tokens.setdefault((cred, tid), [cred, tid, 0.0, 0, 0])
            t[2] = max(t[2], last)
            t[3] += nreq
            t[4] += nbytes
        for reason, cred, tid, n in snap["auth_failures"]:
            failures[reason, cred, tid] = failures.get((reason, cred, tid), 0) + n
        for reason, n in snap.get("limit_rejections", {}).items():
            rejections[reason] = rejections.get(reason, 0) + n
        open_connections += snap.get("open_connections", 0)
    return {
        "routes": routes,
        "pairs": list(pairs.values()),
        "tokens": list(tokens.values()),
        "auth_failures": [[*k, n] for k, n in failures.items()],
        "limit_rejections": rejections,
        "open_connections": open_connections,
    }
