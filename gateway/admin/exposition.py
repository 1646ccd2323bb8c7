"""Prometheus exposition of the gateway's counters (admin listener only).

A custom collector renders a snapshot (local, or merged from workers) and
the config-derived gauges into metric families in a private registry,
beside the standard process and platform collectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.telemetry.counters import DURATION_BUCKETS
from gateway.telemetry.snapshot import Gauges, Snapshot

__all__ = ["GatewayCollector", "build_registry"]

_NB = len(DURATION_BUCKETS)
Collect = Callable[[], Snapshot]


def _buckets(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    cumulative, out = 0.0, []
    for bound, n in zip((*DURATION_BUCKETS, float("inf")), values[: _NB + 1], strict=True):
        cumulative += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return out, values[_NB + 1]


class GatewayCollector(Collector):
    """Renders a snapshot (local, or merged from workers) plus config gauges."""

    def __init__(self, collect: Collect, config_gauges: Callable[[], Gauges]) -> None:
        self._collect = collect
        self._config_gauges = config_gauges

    def collect(self) -> Iterator[Metric]:
        snap = self._collect()
        gauges = self._config_gauges()
        yield from self._requests(snap)
        yield from self._routes(snap)
        yield from self._backends(snap)
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
        for p in snap.pairs:
            for code, n in sorted(p.codes.items()):
                requests.add_metric([p.route, p.credential, str(code)], n)
            req_bytes.add_metric([p.route, p.credential], p.request_bytes)
        failures = CounterMetricFamily(
            "gateway_auth_failures",
            "Requests refused by authentication, by reason; credential and token_id "
            "are set only for revoked, expired and not-yet-valid tokens.",
            labels=["reason", "credential", "token_id"],
        )
        for f in snap.auth_failures:
            failures.add_metric([f.reason, f.credential, f.token_id], f.count)
        rejections = CounterMetricFamily(
            "gateway_limit_rejections",
            "Requests refused by a limit or address rule, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(snap.limit_rejections.items()):
            rejections.add_metric([reason], n)
        dropped = CounterMetricFamily(
            "gateway_request_headers_dropped",
            "Request header fields not forwarded upstream, by reason (underscore: "
            "a name with '_', see [server] underscores_in_headers).",
            labels=["reason"],
        )
        for reason, n in sorted(snap.headers_dropped.items()):
            dropped.add_metric([reason], n)
        overrides = CounterMetricFamily(
            "gateway_client_overrides_dropped",
            "What a client sent that its credential's forward table overrides, removed "
            "before proxying: extra_label arguments, other query arguments, header fields.",
            labels=["credential", "kind"],
        )
        for o in sorted(snap.overrides, key=lambda o: (o.credential, o.kind)):
            overrides.add_metric([o.credential, o.kind], o.count)
        connections = GaugeMetricFamily(
            "gateway_open_connections", "Client connections open on the public listener."
        )
        connections.add_metric([], snap.open_connections)
        yield from (requests, req_bytes, failures, rejections, dropped, overrides, connections)

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
        added = HistogramMetricFamily(
            "gateway_added_latency_seconds",
            "What the gateway adds to a proxied request: the whole exchange minus the "
            "upstream's response time.",
            labels=["route"],
        )
        resp_bytes = CounterMetricFamily(
            "gateway_response_bytes",
            "Response body bytes sent to clients: upstream answers and the gateway's own.",
            labels=["route"],
        )
        in_flight = GaugeMetricFamily(
            "gateway_requests_in_flight", "Requests being proxied now.", labels=["route"]
        )
        errors = CounterMetricFamily(
            "gateway_upstream_errors",
            "Upstream failures by kind: connect, timeout, reset, protocol.",
            labels=["route", "kind"],
        )
        for name, r in sorted(snap.routes.items()):
            buckets, total = _buckets(r.duration)
            duration.add_metric([name], buckets, total)
            buckets, total = _buckets(r.upstream)
            upstream.add_metric([name], buckets, total)
            if r.added:
                buckets, total = _buckets(r.added)
                added.add_metric([name], buckets, total)
            resp_bytes.add_metric([name], r.response_bytes)
            in_flight.add_metric([name], r.in_flight)
            for kind, n in sorted(r.upstream_errors.items()):
                errors.add_metric([name, kind], n)
        yield from (duration, upstream, added, resp_bytes, in_flight, errors)

    @staticmethod
    def _backends(snap: Snapshot) -> Iterator[Metric]:
        labels = ["route", "backend"]
        requests = CounterMetricFamily(
            "gateway_upstream_requests",
            "Attempts sent to each backend (a retried request counts on each).",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "gateway_upstream_failures",
            "Failed attempts per backend: connect, timeout, reset, protocol, status (a 5xx "
            "or a retry status).",
            labels=[*labels, "kind"],
        )
        ejections = CounterMetricFamily(
            "gateway_upstream_ejections",
            "Backends taken out of rotation: after failures in a row, or by the active probe.",
            labels=[*labels, "cause"],
        )
        probes = CounterMetricFamily(
            "gateway_upstream_probes",
            "Active health probes per backend, by result (ok, failed).",
            labels=[*labels, "result"],
        )
        for b in sorted(snap.backends, key=lambda b: (b.route, b.backend)):
            requests.add_metric([b.route, b.backend], b.requests)
            for kind, n in sorted(b.failures.items()):
                failures.add_metric([b.route, b.backend, kind], n)
            for cause, n in sorted(b.ejections.items()):
                ejections.add_metric([b.route, b.backend, cause], n)
            for result, n in sorted(b.probes.items()):
                probes.add_metric([b.route, b.backend, result], n)
        healthy = GaugeMetricFamily(
            "gateway_upstream_healthy",
            "1 if every worker sends the backend new requests (not ejected, probe passing), "
            "else 0; backends of the config in force.",
            labels=labels,
        )
        outstanding = GaugeMetricFamily(
            "gateway_upstream_outstanding", "Attempts in flight per backend.", labels=labels
        )
        for h in sorted(snap.health, key=lambda h: (h.route, h.index)):
            if h.reporting:
                healthy.add_metric([h.route, h.backend], 1 if h.healthy == h.reporting else 0)
                outstanding.add_metric([h.route, h.backend], h.outstanding)
        retries = CounterMetricFamily(
            "gateway_upstream_retries",
            "Requests sent to another backend, by the failure that caused it.",
            labels=["route", "reason"],
        )
        replayed = CounterMetricFamily(
            "gateway_upstream_replayed_bytes",
            "Body bytes sent again to another backend from the replay copy.",
            labels=["route"],
        )
        skipped = CounterMetricFamily(
            "gateway_replay_skipped",
            "Requests of routes with several backends that streamed without a replay "
            "copy: too_large (over replay_buffer_bytes), memory (replay_memory_bytes in use).",
            labels=["route", "reason"],
        )
        for name, r in sorted(snap.routes.items()):
            for reason, n in sorted(r.retries.items()):
                retries.add_metric([name, reason], n)
            replayed.add_metric([name], r.replayed_bytes)
            for reason, n in sorted(r.replay_skipped.items()):
                skipped.add_metric([name, reason], n)
        in_use = GaugeMetricFamily(
            "gateway_replay_buffer_bytes",
            "Bytes reserved by replay copies of request bodies now (each until its answer starts).",
        )
        in_use.add_metric([], snap.replay_bytes)
        yield from (requests, failures, ejections, probes, healthy, outstanding)
        yield from (retries, replayed, skipped, in_use)

    @staticmethod
    def _tokens(snap: Snapshot, gauges: Gauges) -> Iterator[Metric]:
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
        seen = {
            (t.credential, t.token_id): (t.last_used, t.requests, t.request_bytes)
            for t in snap.tokens
        }
        for cred, tid in gauges.tokens:
            last, n, b = seen.get((cred, tid), (0.0, 0, 0))
            last_used.add_metric([cred, tid], last)
            requests.add_metric([cred, tid], n)
            nbytes.add_metric([cred, tid], b)
        expiry = GaugeMetricFamily(
            "gateway_credential_expiry_timestamp_seconds",
            "not_after of each token that has one.",
            labels=["credential", "token_id"],
        )
        for cred, tid, when in gauges.expiry:
            expiry.add_metric([cred, tid], when)
        yield from (last_used, requests, nbytes, expiry)

    @staticmethod
    def _config(gauges: Gauges) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "gateway_config_reloads", "Config reload attempts by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], gauges.reloads.get(result, 0))
        ok = GaugeMetricFamily(
            "gateway_config_last_reload_successful",
            "1 if the last reload attempt succeeded (or none failed since start), else 0.",
        )
        ok.add_metric([], 1 if gauges.last_reload_ok else 0)
        yield ok
        last = GaugeMetricFamily(
            "gateway_config_last_reload_success_timestamp_seconds",
            "When the serving config was loaded.",
        )
        last.add_metric([], gauges.last_reload_success)
        info = GaugeMetricFamily("gateway_build_info", "Build information.", labels=["version"])
        info.add_metric([gauges.version], 1)
        workers = GaugeMetricFamily("gateway_workers", "Worker processes serving traffic.")
        workers.add_metric([], gauges.workers)
        yield from (reloads, last, info, workers)
        processes = gauges.processes
        if processes:
            cpu = CounterMetricFamily(
                "gateway_worker_cpu_seconds",
                "CPU time of each worker process.",
                labels=["worker"],
            )
            rss = GaugeMetricFamily(
                "gateway_worker_resident_memory_bytes",
                "Resident memory of each worker process.",
                labels=["worker"],
            )
            for proc in processes:
                cpu.add_metric([str(proc.index)], proc.cpu)
                rss.add_metric([str(proc.index)], proc.rss)
            yield from (cpu, rss)


def build_registry(collector: GatewayCollector, *, process: bool = True) -> CollectorRegistry:
    """A private registry: ours plus the standard process/platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry
