"""The gateway's own metrics: cheap counters on the hot path, Prometheus at scrape.

A request costs a handful of integer additions on plain objects; nothing
on the request path touches prometheus-client's locks.  At scrape time a
custom collector turns a snapshot of those counters into metric families
in a private ``CollectorRegistry``.  Snapshots are plain JSON-able data, so
the supervisor of several workers sums theirs (``merge``) and renders one
exposition whose counters add up.

Label values are bounded: route and credential names from config, token
ids from config, status codes, and fixed reason/kind words; never a path,
a header or anything else a client sent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["DURATION_BUCKETS", "Collect", "GatewayCollector", "Stats", "build_registry", "merge"]

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
Collect = Callable[[], Snapshot]


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

    __slots__ = ("auth_failures", "pairs", "routes", "tokens")

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.pairs: dict[tuple[str, str], PairStats] = {}
        self.tokens: dict[tuple[str, str], TokenStats] = {}
        self.auth_failures: dict[tuple[str, str, str], int] = {}

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
        key = (reason, credential, token_id)
        self.auth_failures[key] = self.auth_failures.get(key, 0) + 1

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
        }


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum counters and histograms, add gauges, keep the latest last-used."""
    routes: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[str, str], list[Any]] = {}
    tokens: dict[tuple[str, str], list[Any]] = {}
    failures: dict[tuple[str, str, str], int] = {}
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
    return {
        "routes": routes,
        "pairs": list(pairs.values()),
        "tokens": list(tokens.values()),
        "auth_failures": [[*k, n] for k, n in failures.items()],
    }


def _buckets(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    cumulative, out = 0.0, []
    for bound, n in zip((*DURATION_BUCKETS, float("inf")), values[: _NB + 1], strict=True):
        cumulative += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return out, values[_NB + 1]


class GatewayCollector(Collector):
    """Renders a snapshot (local, or merged from workers) plus config gauges."""

    def __init__(self, collect: Collect, config_gauges: Callable[[], Snapshot]) -> None:
        self._collect = collect
        self._config_gauges = config_gauges

    def collect(self) -> Iterator[Metric]:
        snap = self._collect()
        gauges = self._config_gauges()
        yield from self._requests(snap)
        yield from self._routes(snap)
        yield from self._tokens(snap, gauges)
        yield from self._config(gauges)

    @staticmethod
    def _requests(snap: Snapshot) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests",
            "Requests answered, by route, credential and status code.",
            labels=["route", "credential", "code"],
        )
        req_bytes = CounterMetricFamily(
            "gateway_request_bytes",
            "Request body bytes received from clients.",
            labels=["route", "credential"],
        )
        for route, cred, codes, nbytes in snap["pairs"]:
            for code, n in sorted(codes.items()):
                requests.add_metric([route, cred, code], n)
            req_bytes.add_metric([route, cred], nbytes)
        failures = CounterMetricFamily(
            "gateway_auth_failures",
            "Requests refused by authentication, by reason; credential and token_id "
            "are set only for revoked, expired and not-yet-valid tokens.",
            labels=["reason", "credential", "token_id"],
        )
        for reason, cred, tid, n in snap["auth_failures"]:
            failures.add_metric([reason, cred, tid], n)
        yield from (requests, req_bytes, failures)

    @staticmethod
    def _routes(snap: Snapshot) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Whole exchange, from the request head to the last response byte.",
            labels=["route"],
        )
        upstream = HistogramMetricFamily(
            "gateway_upstream_response_seconds",
            "From the request head sent upstream to the upstream's response head.",
            labels=["route"],
        )
        resp_bytes = CounterMetricFamily(
            "gateway_response_bytes", "Response body bytes sent to clients.", labels=["route"]
        )
        in_flight = GaugeMetricFamily(
            "gateway_requests_in_flight", "Requests being proxied now.", labels=["route"]
        )
        errors = CounterMetricFamily(
            "gateway_upstream_errors",
            "Upstream failures by kind: connect, timeout, reset, protocol.",
            labels=["route", "kind"],
        )
        for name, r in sorted(snap["routes"].items()):
            buckets, total = _buckets(r["duration"])
            duration.add_metric([name], buckets, total)
            buckets, total = _buckets(r["upstream"])
            upstream.add_metric([name], buckets, total)
            resp_bytes.add_metric([name], r["response_bytes"])
            in_flight.add_metric([name], r["in_flight"])
            for kind, n in sorted(r["upstream_errors"].items()):
                errors.add_metric([name, kind], n)
        yield from (duration, upstream, resp_bytes, in_flight, errors)

    @staticmethod
    def _tokens(snap: Snapshot, gauges: Snapshot) -> Iterator[Metric]:
        last_used = GaugeMetricFamily(
            "gateway_credential_last_used_timestamp_seconds",
            "When a token last authenticated a request (0: not since start).",
            labels=["credential", "token_id"],
        )
        requests = CounterMetricFamily(
            "gateway_credential_requests",
            "Requests authenticated by each token.",
            labels=["credential", "token_id"],
        )
        nbytes = CounterMetricFamily(
            "gateway_credential_request_bytes",
            "Request body bytes sent with each token.",
            labels=["credential", "token_id"],
        )
        seen = {(c, t): (last, n, b) for c, t, last, n, b in snap["tokens"]}
        for cred, tid in gauges.get("tokens", []):
            last, n, b = seen.get((cred, tid), (0.0, 0, 0))
            last_used.add_metric([cred, tid], last)
            requests.add_metric([cred, tid], n)
            nbytes.add_metric([cred, tid], b)
        expiry = GaugeMetricFamily(
            "gateway_credential_expiry_timestamp_seconds",
            "not_after of each token that has one.",
            labels=["credential", "token_id"],
        )
        for cred, tid, when in gauges.get("expiry", []):
            expiry.add_metric([cred, tid], when)
        yield from (last_used, requests, nbytes, expiry)

    @staticmethod
    def _config(gauges: Snapshot) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "gateway_config_reloads", "Config reload attempts by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], gauges.get("reloads", {}).get(result, 0))
        last = GaugeMetricFamily(
            "gateway_config_last_reload_success_timestamp_seconds",
            "When the serving config was loaded.",
        )
        last.add_metric([], gauges.get("last_reload_success", 0.0))
        info = GaugeMetricFamily("gateway_build_info", "Build information.", labels=["version"])
        info.add_metric([gauges.get("version", "")], 1)
        workers = GaugeMetricFamily("gateway_workers", "Worker processes serving traffic.")
        workers.add_metric([], gauges.get("workers", 1))
        yield from (reloads, last, info, workers)


def build_registry(collector: GatewayCollector, *, process: bool = True) -> CollectorRegistry:
    """A private registry: ours plus the standard process/platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry
