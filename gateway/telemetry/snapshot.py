"""Snapshots of the counters, as typed values that cross the process
boundary (msgspec Structs, encoded by the control channel), and their sum
across workers.

A worker's ``Stats.snapshot()`` is one ``Snapshot``; the supervisor sums
its workers' (``merge``), keeping the counters of workers that died, so the
exposition's counters never go backwards.  ``Gauges`` are the values that
come from config rather than traffic.  Plain data, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

__all__ = [
    "BackendSnap",
    "FailureSnap",
    "Gauges",
    "HealthSnap",
    "OverrideSnap",
    "PairSnap",
    "ProcessSample",
    "RouteSnap",
    "Snapshot",
    "TokenSnap",
    "merge",
]


class _Value(msgspec.Struct, array_like=True, omit_defaults=False):
    """Encoded as arrays: a snapshot of a large config stays small."""


class RouteSnap(_Value):
    in_flight: int
    # Histogram bucket counts (the last is +Inf), then the sum.
    duration: list[float]
    upstream: list[float]
    response_bytes: int
    upstream_errors: dict[str, int]
    added: list[float] = msgspec.field(default_factory=list)
    retries: dict[str, int] = msgspec.field(default_factory=dict)
    replayed_bytes: int = 0
    replay_skipped: dict[str, int] = msgspec.field(default_factory=dict)


class BackendSnap(_Value):
    """One backend's counters (keyed by route and backend label)."""

    route: str
    backend: str
    requests: int
    failures: dict[str, int]
    ejections: dict[str, int]
    probes: dict[str, int]


class HealthSnap(_Value):
    """One backend of the config in force as the reporting workers see it:
    the fields count workers (and requests), so they add up across workers."""

    route: str
    backend: str
    index: int
    healthy: int  # workers that would send it new requests
    reporting: int  # workers that reported it
    ejected: int  # workers that ejected it after failures
    probe_down: int  # workers whose active probe says it is down
    outstanding: int  # requests in flight on it
    named: bool = False  # its label is a configured name (else host:port of its URL)


class PairSnap(_Value):
    route: str
    credential: str
    codes: dict[int, int]
    request_bytes: int


class TokenSnap(_Value):
    credential: str
    token_id: str
    last_used: float
    requests: int
    request_bytes: int


class FailureSnap(_Value):
    reason: str
    credential: str
    token_id: str
    count: int


class OverrideSnap(_Value):
    """Client arguments or fields removed because a credential pins them."""

    credential: str
    kind: str  # extra_label, query_arg, header
    count: int


class ProcessSample(_Value):
    """One worker's CPU seconds and resident bytes."""

    index: int
    cpu: float
    rss: int


class Snapshot(_Value):
    routes: dict[str, RouteSnap]
    pairs: list[PairSnap]
    tokens: list[TokenSnap]
    auth_failures: list[FailureSnap]
    limit_rejections: dict[str, int]
    open_connections: int
    processes: list[ProcessSample] = msgspec.field(default_factory=list)
    headers_dropped: dict[str, int] = msgspec.field(default_factory=dict)
    overrides: list[OverrideSnap] = msgspec.field(default_factory=list)
    backends: list[BackendSnap] = msgspec.field(default_factory=list)
    # Per backend of the config in force; a dead worker's is dropped, not kept.
    health: list[HealthSnap] = msgspec.field(default_factory=list)
    replay_bytes: int = 0


class Gauges(_Value):
    """Metric values from config: which tokens exist, when they expire,
    reload results, the version and the workers."""

    tokens: list[tuple[str, str]]
    expiry: list[tuple[str, str, float]]
    reloads: dict[str, int]
    last_reload_success: float
    last_reload_ok: bool
    version: str
    workers: int
    processes: list[ProcessSample] = msgspec.field(default_factory=list)
    # For the operator's view (``obs-gateway status``), not for /metrics.
    routes: list[tuple[str, str]] = msgspec.field(default_factory=list)  # (name, protocol)
    expiry_warning_days: float = 0.0
    last_reload_attempt: float = 0.0  # when the last reload was tried (0: none yet)
    restarts: list[int] = msgspec.field(default_factory=list)  # per worker index
    started_at: float = 0.0


def _add(acc: list[float], more: list[float]) -> list[float]:
    return [a + b for a, b in zip(acc, more, strict=True)]


def _sum_into(acc: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        acc[key] = acc.get(key, 0) + n


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum counters and histograms, add gauges, keep the latest last-used;
    ``processes`` is left empty (the caller knows which are alive)."""
    routes: dict[str, RouteSnap] = {}
    backends: dict[tuple[str, str], BackendSnap] = {}
    health: dict[tuple[str, str], HealthSnap] = {}
    replay_bytes = 0
    pairs: dict[tuple[str, str], PairSnap] = {}
    tokens: dict[tuple[str, str], TokenSnap] = {}
    failures: dict[tuple[str, str, str], int] = {}
    rejections: dict[str, int] = {}
    dropped: dict[str, int] = {}
    overrides: dict[tuple[str, str], int] = {}
    open_connections = 0
    for snap in snapshots:
        for name, r in snap.routes.items():
            acc = routes.get(name)
            if acc is None:
                routes[name] = msgspec.structs.replace(
                    r,
                    upstream_errors=dict(r.upstream_errors),
                    retries=dict(r.retries),
                    replay_skipped=dict(r.replay_skipped),
                )
                continue
            acc.in_flight += r.in_flight
            acc.response_bytes += r.response_bytes
            acc.replayed_bytes += r.replayed_bytes
            acc.duration = _add(acc.duration, r.duration)
            acc.upstream = _add(acc.upstream, r.upstream)
            acc.added = _add(acc.added, r.added) if acc.added else list(r.added)
            _sum_into(acc.upstream_errors, r.upstream_errors)
            _sum_into(acc.retries, r.retries)
            _sum_into(acc.replay_skipped, r.replay_skipped)
        _merge_backends(snap, backends, health)
        replay_bytes += snap.replay_bytes
        for p in snap.pairs:
            key = (p.route, p.credential)
            pacc = pairs.get(key)
            if pacc is None:
                pacc = pairs[key] = PairSnap(p.route, p.credential, {}, 0)
            for code, n in p.codes.items():
                pacc.codes[code] = pacc.codes.get(code, 0) + n
            pacc.request_bytes += p.request_bytes
        for t in snap.tokens:
            tkey = (t.credential, t.token_id)
            tacc = tokens.get(tkey)
            if tacc is None:
                tacc = tokens[tkey] = TokenSnap(t.credential, t.token_id, 0.0, 0, 0)
            tacc.last_used = max(tacc.last_used, t.last_used)
            tacc.requests += t.requests
            tacc.request_bytes += t.request_bytes
        for f in snap.auth_failures:
            fkey = (f.reason, f.credential, f.token_id)
            failures[fkey] = failures.get(fkey, 0) + f.count
        _sum_into(rejections, snap.limit_rejections)
        _sum_into(dropped, snap.headers_dropped)
        for o in snap.overrides:
            okey = (o.credential, o.kind)
            overrides[okey] = overrides.get(okey, 0) + o.count
        open_connections += snap.open_connections
    return Snapshot(
        routes,
        list(pairs.values()),
        list(tokens.values()),
        [FailureSnap(*key, n) for key, n in failures.items()],
        rejections,
        open_connections,
        headers_dropped=dropped,
        overrides=[OverrideSnap(*key, n) for key, n in overrides.items()],
        backends=list(backends.values()),
        health=list(health.values()),
        replay_bytes=replay_bytes,
    )


def _merge_backends(
    snap: Snapshot,
    backends: dict[tuple[str, str], BackendSnap],
    health: dict[tuple[str, str], HealthSnap],
) -> None:
    for b in snap.backends:
        bkey = (b.route, b.backend)
        bacc = backends.get(bkey)
        if bacc is None:
            bacc = backends[bkey] = BackendSnap(b.route, b.backend, 0, {}, {}, {})
        bacc.requests += b.requests
        _sum_into(bacc.failures, b.failures)
        _sum_into(bacc.ejections, b.ejections)
        _sum_into(bacc.probes, b.probes)
    for h in snap.health:
        hkey = (h.route, h.backend)
        hacc = health.get(hkey)
        if hacc is None:
            health[hkey] = msgspec.structs.replace(h)
            continue
        hacc.healthy += h.healthy
        hacc.reporting += h.reporting
        hacc.ejected += h.ejected
        hacc.probe_down += h.probe_down
        hacc.outstanding += h.outstanding
