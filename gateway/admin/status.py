"""The operator's view as data: what ``GET /status`` on the admin listener
returns, and what ``obs-gateway status`` prints (``status_cli.py``).

Names, ids and figures only: credential and route names and token ids from
config, counts, seconds, bytes.  Never a token, a digest, a client address
or an upstream address: a backend is its position in the route's list and,
if the config gives one, its name (the metrics' default label, host:port,
stays out).  Counters are cumulative since start; ``last_minute``
figures come from samples the admin listener keeps every few seconds
(``History``), so the answer to "is this token still used?" needs no second
request.  Rates over a few seconds need two samples: the CLI takes them.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from gateway.telemetry.counters import DURATION_BUCKETS
from gateway.telemetry.snapshot import Gauges, RouteSnap, Snapshot

__all__ = ["SAMPLE_SECONDS", "WINDOW_SECONDS", "History", "quantile", "status_view"]

SAMPLE_SECONDS = 5.0
WINDOW_SECONDS = 60.0
_NB = len(DURATION_BUCKETS)


class History:
    """Snapshots taken every ``SAMPLE_SECONDS``, kept for a little over a minute.

    Made when the admin listener starts, before any worker counts anything."""

    __slots__ = ("_samples", "_started")

    def __init__(self, started: float | None = None) -> None:
        keep = int(WINDOW_SECONDS / SAMPLE_SECONDS) + 2
        self._samples: deque[tuple[float, Snapshot]] = deque(maxlen=keep)
        self._started = time.time() if started is None else started

    def add(self, now: float, snap: Snapshot) -> None:
        self._samples.append((now, snap))

    def window_start(self, now: float) -> tuple[float, Snapshot | None]:
        """When the last minute starts and the counters then (None: zero).

        While the process is younger than a minute, every count happened
        within it: the baseline is zero, not the first sample (which may
        come after the first requests: a sample is skipped while a worker
        is slow to answer)."""
        if now - self._started <= WINDOW_SECONDS:
            return self._started, None
        for when, snap in self._samples:
            if now - when <= WINDOW_SECONDS + SAMPLE_SECONDS / 2:
                return when, snap
        if self._samples:
            return self._samples[-1]
        return self._started, None


def quantile(q: float, buckets: list[float]) -> float | None:
    """``histogram_quantile`` over bucket counts (not cumulative; the last is
    +Inf), interpolating linearly inside the bucket; None without samples."""
    counts = buckets[: _NB + 1]
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, n in enumerate(counts):
        if n and cumulative + n >= rank:
            if i == _NB:
                return DURATION_BUCKETS[-1]  # above the last bound: say the bound
            lower = DURATION_BUCKETS[i - 1] if i else 0.0
            return lower + (DURATION_BUCKETS[i] - lower) * (rank - cumulative) / n
        cumulative += n
    return DURATION_BUCKETS[-1]


def _delta(now: list[float], then: list[float] | None) -> list[float]:
    if not then or len(then) != len(now):
        return list(now)
    return [a - b for a, b in zip(now, then, strict=True)]


def _classes(codes: dict[int, int]) -> dict[str, int]:
    out = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    for code, n in codes.items():
        key = f"{code // 100}xx"
        if key in out:
            out[key] += n
        elif code == 499:  # client closed: never sent, counted apart
            out["4xx"] += n
    return out


def _route_codes(snap: Snapshot) -> dict[str, dict[int, int]]:
    codes: dict[str, dict[int, int]] = {}
    for p in snap.pairs:
        acc = codes.setdefault(p.route, {})
        for code, n in p.codes.items():
            acc[code] = acc.get(code, 0) + n
    return codes


def _route_bytes(snap: Snapshot) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in snap.pairs:
        out[p.route] = out.get(p.route, 0) + p.request_bytes
    return out


def _routes(snap: Snapshot, gauges: Gauges, then: Snapshot | None) -> list[dict[str, Any]]:
    codes, old_codes = _route_codes(snap), _route_codes(then) if then else {}
    req_bytes = _route_bytes(snap)
    names = [(n, proto) for n, proto in gauges.routes]
    names += [(n, "") for n in sorted(set(codes) | set(snap.routes)) if n not in dict(names)]
    empty = RouteSnap(0, [], [], 0, {}, [])
    out = []
    for name, protocol in names:
        r = snap.routes.get(name, empty)
        old = then.routes.get(name) if then else None
        now_codes = codes.get(name, {})
        minute_codes = {
            c: n - old_codes.get(name, {}).get(c, 0)
            for c, n in now_codes.items()
            if n - old_codes.get(name, {}).get(c, 0)
        }
        added = _delta(r.added, old.added if old else None) if r.added else []
        out.append(
            {
                "name": name,
                "protocol": protocol,
                "in_flight": r.in_flight,
                "requests": sum(now_codes.values()),
                "request_bytes": req_bytes.get(name, 0),
                "response_bytes": r.response_bytes,
                "answers": _classes(now_codes),
                "upstream_errors": dict(r.upstream_errors),
                "retries": dict(r.retries),
                "replayed_bytes": r.replayed_bytes,
                "replay_skipped": dict(r.replay_skipped),
                "backends": _backends(snap, then, name),
                "last_minute": {
                    "answers": _classes(minute_codes),
                    "added_p50_seconds": quantile(0.5, added) if added else None,
                    "added_p99_seconds": quantile(0.99, added) if added else None,
                },
            }
        )
    return out


def _backends(snap: Snapshot, then: Snapshot | None, route: str) -> list[dict[str, Any]]:
    """The route's backends of the config in force, in order: health as the
    workers see it (``healthy`` only if every worker would use it), load,
    and counters with their last minute.  Named ``#index`` unless the
    config names them."""
    counters = {b.backend: b for b in snap.backends if b.route == route}
    old = {b.backend: b for b in then.backends if b.route == route} if then else {}
    out = []
    for h in sorted((h for h in snap.health if h.route == route), key=lambda h: h.index):
        b, o = counters.get(h.backend), old.get(h.backend)
        requests = b.requests if b else 0
        failures = sum(b.failures.values()) if b else 0
        out.append(
            {
                "name": h.backend if h.named else f"#{h.index}",
                "index": h.index,
                "healthy": h.reporting > 0 and h.healthy == h.reporting,
                "healthy_workers": h.healthy,
                "workers": h.reporting,
                "ejected_workers": h.ejected,
                "probe_down_workers": h.probe_down,
                "outstanding": h.outstanding,
                "requests": requests,
                "failures": dict(b.failures) if b else {},
                "ejections": dict(b.ejections) if b else {},
                "last_minute": {
                    "requests": requests - (o.requests if o else 0),
                    "failures": failures - (sum(o.failures.values()) if o else 0),
                },
            }
        )
    return out


def _credentials(snap: Snapshot, gauges: Gauges, then: Snapshot | None) -> list[dict[str, Any]]:
    tokens = {(t.credential, t.token_id): t for t in snap.tokens}
    old = {(t.credential, t.token_id): t for t in then.tokens} if then else {}
    expiry = {(c, t): when for c, t, when in gauges.expiry}
    failures: dict[str, dict[str, int]] = {}
    for f in snap.auth_failures:
        per = failures.setdefault(f.credential, {})
        per[f.reason] = per.get(f.reason, 0) + f.count
    by_name: dict[str, dict[str, Any]] = {}
    for cred, tid in gauges.tokens:
        entry = by_name.setdefault(
            cred, {"name": cred, "tokens": [], "auth_failures": failures.get(cred, {})}
        )
        t, o = tokens.get((cred, tid)), old.get((cred, tid))
        entry["tokens"].append(
            {
                "id": tid,
                "last_used": t.last_used if t and t.last_used else None,
                "not_after": expiry.get((cred, tid)),
                "requests": t.requests if t else 0,
                "request_bytes": t.request_bytes if t else 0,
                "last_minute": {
                    "requests": (t.requests if t else 0) - (o.requests if o else 0),
                    "request_bytes": (t.request_bytes if t else 0) - (o.request_bytes if o else 0),
                },
            }
        )
    return list(by_name.values())


def status_view(snap: Snapshot, gauges: Gauges, history: History, now: float) -> dict[str, Any]:
    began, then = history.window_start(now)
    window = now - began
    return {
        "now": now,
        "version": gauges.version,
        "started_at": gauges.started_at,
        "window_seconds": round(window, 3),
        "config": {
            "generation": 1 + gauges.reloads.get("success", 0),
            "last_reload_ok": gauges.last_reload_ok,
            "last_reload_attempt": gauges.last_reload_attempt or None,
            "last_reload_success": gauges.last_reload_success,
            "reloads": dict(gauges.reloads),
            "expiry_warning_days": gauges.expiry_warning_days,
        },
        "credentials": _credentials(snap, gauges, then),
        "unattributed_auth_failures": {
            f.reason: f.count for f in snap.auth_failures if f.credential == "none"
        },
        "routes": _routes(snap, gauges, then),
        "open_connections": snap.open_connections,
        "limit_rejections": dict(snap.limit_rejections),
        "workers": [
            {
                "index": p.index,
                "rss_bytes": p.rss,
                "cpu_seconds": round(p.cpu, 3),
                "restarts": gauges.restarts[p.index] if p.index < len(gauges.restarts) else 0,
            }
            for p in sorted(gauges.processes, key=lambda p: p.index)
        ],
    }
