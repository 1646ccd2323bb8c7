"""Soak: the real CLI (``python -m gateway run``, default workers) under
sustained mixed load for a bounded time, with SIGHUP reloads (good and bad
configs) and upstream restarts.

Load: valid remote-write (Content-Length and chunked) and OTLP writes on
keep-alive connections, bad tokens from a few forwarded addresses (so the
auth-failure throttle engages), authenticated 404s, slowloris heads and
stalled bodies.

Asserts, in order of how much they would hurt:
  * no failed request that was not a deliberate fault: a valid write may
    fail only with a 502 (503 on OTLP) or a dropped connection while its
    upstream is down; every 2xx the client saw reached the upstream with the
    same body;
  * no worker died or was restarted, the process drains and exits 0;
  * memory: no process's VmRSS grows more than ``RSS_GROWTH_BOUND`` between
    the end of warm-up and the end of the load (a leak of even 100 bytes per
    request would show: the run makes well over 100k requests);
  * file descriptors: every process is back to its idle baseline once the
    load stops (client connections closed, pooled upstream sockets expired).

``SOAK_SECONDS`` (default 100) sets the load phase; the whole test takes
about 30 s more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OTHER_TOKEN, TOKEN, sha256, wait_for
from tests.support.client import Closed, RawClient, raw_client
from tests.support.process import GatewayProcess, memory_kib, open_fds
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, request

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "100"))
WARMUP_SECONDS = min(20.0, SOAK_SECONDS / 4)
RELOAD_EVERY = 5.0
RESTART_EVERY = 12.0
DOWNTIME = 0.7
# A down window counts from the stop until the upstream is back, plus this
# much on each side for requests that were already on their way.
WINDOW_SLACK = 1.0
# Bound on VmRSS growth per process from the end of warm-up to the end.
RSS_GROWTH_BOUND_KIB = 16 * 1024
HEADER_TIMEOUT = 1.0
BODY_IDLE = 1.0
TIMING_SLACK = 4.0  # two shared cores, saturated on purpose


# -- the upstream ----------------------------------------------------------------------


class Digests:
    """What a lean soak upstream (tests.support.upstreams, keeping no bytes)
    answered: digests of the bodies, not the bodies."""

    def __init__(self, up: RawUpstream, otlp: bool) -> None:
        self.digests: set[str] = set()
        self.requests = 0
        self.paths: Counter[str] = Counter()
        self.answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 2\r\n\r\nok"
            if otlp
            else b"HTTP/1.1 204 No Content\r\n\r\n"
        )
        up.responder = self.respond

    async def respond(self, conn: UpConn, req: ParsedRequest) -> None:
        self.requests += 1
        self.paths[req.path] += 1
        self.digests.add(hashlib.sha256(req.body).hexdigest())
        await conn.write(self.answer)


def _rss_kib(pid: int) -> int:
    return memory_kib(pid)["VmRSS"]


# -- config -----------------------------------------------------------------------------


def _config(rw_port: int, otlp_port: int, token_file: Path, variant: int) -> str:
    """Reloads cycle through variants that change limits and credentials but
    never invalidate the tokens the load uses."""
    extra_cred = ""
    if variant % 2:
        extra_cred = f"""
[[credentials]]
name = "extra{variant}"
token_sha256 = "{sha256(f"extra-token-{variant}-0123456789".encode())}"
routes = ["otlp_traces"]
"""
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
header_timeout_seconds = {HEADER_TIMEOUT}
body_idle_timeout_seconds = {BODY_IDLE}
keepalive_timeout_seconds = 5.0
drain_timeout_seconds = 5.0

[upstream]
connect_timeout_seconds = 1.0
response_timeout_seconds = 5.0
pool_idle_timeout_seconds = 2.0

[log]
level = "info"

[clients]
trusted_proxies = ["127.0.0.1/32"]

[limits]
max_concurrent_requests = {512 + variant % 3}
queue_size = {64 + variant % 5}
auth_failure_limit = 20
auth_failure_window_seconds = 10

[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:{rw_port}/api/v1/write"
max_body_bytes = {(64 - variant % 2) * 1024 * 1024}

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "http://127.0.0.1:{otlp_port}/v1/traces"

[[credentials]]
name = "ingest"
token_file = "{token_file}"
routes = ["remote_write", "otlp_traces"]

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]
{extra_cred}
"""


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- the load -------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Outcomes of the load, and the windows in which faults were deliberate."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    down: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: {"rw": [], "otlp": []}
    )
    down_since: dict[str, float | None] = field(default_factory=lambda: {"rw": None, "otlp": None})
    sent_2xx: dict[str, set[str]] = field(default_factory=lambda: {"rw": set(), "otlp": set()})

    def deliberate(self, upstream: str, t0: float, t1: float) -> bool:
        spans = list(self.down[upstream])
        since = self.down_since[upstream]
        if since is not None:
            spans.append((since, float("inf")))
        return any(t0 <= b + WINDOW_SLACK and t1 >= a - WINDOW_SLACK for a, b in spans)

    def fail(self, what: str) -> None:
        self.outcomes["FAILED"] += 1
        if len(self.failures) < 50:
            self.failures.append(what)


async def _writer_loop(
    port: int, stop: float, ledger: Ledger, kind: str, rng: random.Random
) -> None:
    """Valid writes on a keep-alive connection, reconnecting when needed."""
    path = "/api/v1/write" if kind == "rw" else "/v1/traces"
    conn: RawClient | None = None
    while time.monotonic() < stop:
        body = rng.randbytes(rng.choice((200, 2000, 20_000)))
        chunked = kind == "rw" and rng.random() < 0.2
        token = TOKEN if kind == "otlp" or rng.random() < 0.8 else OTHER_TOKEN
        data = request("POST", path, body, token=token, chunked=chunked)
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = await RawClient.open(port)
            await conn.send(data)
            resp = await conn.response(timeout=15.0)
        except (OSError, Closed, TimeoutError) as exc:
            t1 = time.monotonic()
            if conn is not None:
                await conn.close()
                conn = None
            if ledger.deliberate(kind, t0, t1):
                ledger.outcomes[f"{kind}:dropped-while-down"] += 1
            else:
                ledger.fail(f"{kind} {type(exc).__name__} at +{t0:.1f}s ({exc})")
            continue
        t1 = time.monotonic()
        expected = 204 if kind == "rw" else 200
        down_status = 502 if kind == "rw" else 503  # OTLP: issue 10 item 13
        if resp.status == expected:
            ledger.outcomes[f"{kind}:{resp.status}"] += 1
            ledger.sent_2xx[kind].add(hashlib.sha256(body).hexdigest())
        elif resp.status == down_status and ledger.deliberate(kind, t0, t1):
            ledger.outcomes[f"{kind}:{down_status}-while-down"] += 1
        else:
            ledger.fail(f"{kind} got {resp.status} {resp.body[:80]!r} at {t0:.1f}")
        if resp.header("Connection") == "close" and conn is not None:
            await conn.close()
            conn = None
    if conn is not None:
        await conn.close()


async def _bad_token_loop(port: int, stop: float, ledger: Ledger, rng: random.Random) -> None:
    while time.monotonic() < stop:
        addr = f"198.51.100.{rng.randrange(1, 6)}"
        data = request(
            "POST",
            rng.choice(["/api/v1/write", "/v1/traces", "/admin"]),
            b"x" * 100,
            token=rng.choice(["stolen-0123456789abcdef", None]),
            headers=[("X-Forwarded-For", addr)],
        )
        try:
            async with raw_client(port) as conn:
                await conn.send(data)
                resp = await conn.response(timeout=10.0)
        except (OSError, Closed, TimeoutError) as exc:
            ledger.fail(f"bad-token request: {exc!r}")
            continue
        if resp.status in (401, 429, 503):  # 429/503: throttled (per route protocol)
            ledger.outcomes[f"bad:{resp.status}"] += 1
        else:
            ledger.fail(f"bad token got {resp.status}")


async def _not_found_loop(port: int, stop: float, ledger: Ledger, rng: random.Random) -> None:
    async with raw_client(port) as conn:
        while time.monotonic() < stop:
            path = rng.choice(["/api/v1/write/", "/nope", "//v1/traces", "/api/v1/%77rite"])
            try:
                await conn.send(request("POST", path, b"y" * 10, token=TOKEN))
                resp = await conn.response(timeout=10.0)
            except (OSError, Closed, TimeoutError) as exc:
                ledger.fail(f"404 probe: {exc!r}")
                return
            if resp.status == 404:
                ledger.outcomes["404"] += 1
            else:
                ledger.fail(f"404 probe got {resp.status}")
            await asyncio.sleep(0.01)


async def _slow_loop(port: int, stop: float, ledger: Ledger, rng: random.Random) -> None:
    """Slowloris heads (closed at the header timeout) and stalled bodies (408)."""
    while time.monotonic() < stop:
        slow_head = rng.random() < 0.5
        t0 = time.monotonic()
        try:
            async with raw_client(port) as conn:
                if slow_head:
                    await conn.send(b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
                    closed = await conn.closed(HEADER_TIMEOUT + TIMING_SLACK)
                    ok = closed
                else:
                    await conn.send(
                        f"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\n"
                        f"Authorization: Bearer {TOKEN}\r\nContent-Length: 5000\r\n\r\n".encode()
                        + b"z" * 100
                    )
                    resp = await conn.response(timeout=BODY_IDLE + TIMING_SLACK)
                    ok = resp.status == 408
        except (OSError, Closed, TimeoutError) as exc:
            if not slow_head and ledger.deliberate("rw", t0, time.monotonic()):
                ledger.outcomes["slow:dropped-while-down"] += 1  # 502 path closes early
                continue
            ledger.fail(f"slow client ({'head' if slow_head else 'body'}): {exc!r}")
            continue
        if ok:
            ledger.outcomes["slow-head-closed" if slow_head else "slow-body-408"] += 1
        elif not slow_head and ledger.deliberate("rw", t0, time.monotonic()):
            ledger.outcomes["slow:502-while-down"] += 1
        else:
            ledger.fail(f"slow client ({'head' if slow_head else 'body'}) not cut off")


async def _reloader(
    gw: GatewayProcess, config: Path, text_for: Any, stop: float, ledger: Ledger
) -> tuple[int, int]:
    """SIGHUP every RELOAD_EVERY s; every fourth config is broken on purpose."""
    good = bad = 0
    variant = 0
    while time.monotonic() + RELOAD_EVERY < stop:
        await asyncio.sleep(RELOAD_EVERY)
        variant += 1
        broken = variant % 4 == 0
        _write_atomically(config, "[server\nbroken" if broken else text_for(variant))
        since = gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        if broken:
            bad += 1
            await gw.wait_event("config_reload_failed", since, timeout=15.0)
            _write_atomically(config, text_for(variant))  # what the next restart would read
        else:
            good += 1
            await gw.wait_event("config_reloaded", since, timeout=15.0)
        ledger.outcomes["reloads"] += 1
    return good, bad


async def _restarter(ups: dict[str, RawUpstream], stop: float, ledger: Ledger) -> int:
    n = 0
    while time.monotonic() + RESTART_EVERY < stop:
        await asyncio.sleep(RESTART_EVERY)
        which = "rw" if n % 2 == 0 else "otlp"
        ledger.down_since[which] = time.monotonic()
        await ups[which].stop()
        await asyncio.sleep(DOWNTIME)
        await ups[which].start()
        since = ledger.down_since[which]
        assert since is not None
        ledger.down[which].append((since, time.monotonic()))
        ledger.down_since[which] = None
        n += 1
    return n


# Start everything, run the loops, then check every ledger: one scenario.
async def test_soak(tmp_path: Path) -> None:  # noqa: PLR0915
    ups = {"rw": RawUpstream(keep=False), "otlp": RawUpstream(keep=False)}
    seen = {kind: Digests(up, otlp=kind == "otlp") for kind, up in ups.items()}
    for up in ups.values():
        await up.start()
    token_file = tmp_path / "ingest.token"
    token_file.write_text(TOKEN)
    config = tmp_path / "gateway.toml"

    def text_for(variant: int) -> str:
        return _config(ups["rw"].port, ups["otlp"].port, token_file, variant)

    _write_atomically(config, text_for(0))
    gw = GatewayProcess(config, lean=True)
    try:
        await gw.start(20.0)
        pids = gw.pids()
        assert len(pids) >= 2, "expected a supervisor and its workers"
        # Idle baseline: started, nothing served yet.
        fd_base = {pid: open_fds(pid) for pid in pids}

        ledger = Ledger()
        t_start = time.monotonic()
        stop = t_start + SOAK_SECONDS
        rng = random.Random(1)
        load = [
            *(_writer_loop(gw.port, stop, ledger, "rw", random.Random(i)) for i in range(8)),
            *(
                _writer_loop(gw.port, stop, ledger, "otlp", random.Random(100 + i))
                for i in range(4)
            ),
            *(_bad_token_loop(gw.port, stop, ledger, random.Random(200 + i)) for i in range(2)),
            _not_found_loop(gw.port, stop, ledger, rng),
            *(_slow_loop(gw.port, stop, ledger, random.Random(300 + i)) for i in range(4)),
        ]
        load_task = asyncio.gather(*load)
        reloads = asyncio.create_task(_reloader(gw, config, text_for, stop, ledger))
        restarts = asyncio.create_task(_restarter(ups, stop, ledger))

        await asyncio.sleep(WARMUP_SECONDS)
        rss_warm = {pid: _rss_kib(pid) for pid in pids}
        samples = [(time.monotonic() - t_start, [_rss_kib(p) for p in pids])]
        while time.monotonic() < stop - 1:
            await asyncio.sleep(min(10.0, max(0.1, stop - 1 - time.monotonic())))
            samples.append((time.monotonic() - t_start, [_rss_kib(p) for p in pids]))
        rss_end = {pid: _rss_kib(pid) for pid in pids}
        await load_task
        good_reloads, bad_reloads = await reloads
        n_restarts = await restarts

        # FDs back to the idle baseline once client connections are gone and
        # pooled upstream sockets expired (pool_idle_timeout 2 s).
        with contextlib.suppress(AssertionError):  # the assert below says what is left
            await wait_for(lambda: all(open_fds(p) <= fd_base[p] for p in pids), 15.0)
        fd_end = {pid: open_fds(pid) for pid in pids}
        pids_end = gw.pids()
        rc = await gw.terminate(30.0)
    finally:
        await gw.stop()
        for up in ups.values():
            await up.stop()

    total = sum(ledger.outcomes.values())
    report = {
        "seconds": SOAK_SECONDS,
        "requests": total,
        "outcomes": dict(sorted(ledger.outcomes.items())),
        "reloads": (good_reloads, bad_reloads),
        "upstream_restarts": n_restarts,
        "rss_kib_warm": rss_warm,
        "rss_kib_end": rss_end,
        "rss_samples": samples,
        "fd_base": fd_base,
        "fd_end": fd_end,
        "gateway_statuses": dict(sorted(gw.statuses.items())),
        "upstream_requests": {k: d.requests for k, d in seen.items()},
    }
    print("soak report:", json.dumps(report, indent=1, default=str))

    assert not ledger.failures, "\n".join(ledger.failures)
    assert ledger.outcomes["rw:204"] > 1000
    assert ledger.outcomes["otlp:200"] > 500
    assert ledger.outcomes["slow-body-408"] > 0
    assert ledger.outcomes["slow-head-closed"] > 0
    assert ledger.outcomes["bad:429"] + ledger.outcomes["bad:503"] > 0, "throttle never engaged"
    # Every reload and restart the schedule allows happened (the loops stop
    # one period before the end).
    assert good_reloads + bad_reloads >= SOAK_SECONDS // RELOAD_EVERY - 1
    assert bad_reloads >= (good_reloads + bad_reloads) // 4
    assert n_restarts >= SOAK_SECONDS // RESTART_EVERY - 1
    # Every 2xx the client saw is a body the upstream received, byte for byte.
    for kind, up in ups.items():
        assert up.errors == []
        missing = ledger.sent_2xx[kind] - seen[kind].digests
        assert not missing, f"{kind}: {len(missing)} acknowledged bodies never reached upstream"
        assert set(seen[kind].paths) <= {"/api/v1/write", "/v1/traces"}
    # No gateway fault: no 500, no internal 503 (OTLP 503s here are throttling
    # and stalled bodies, counted by the load above), no worker died.
    assert 500 not in gw.statuses
    faults = [
        e
        for e in gw.events
        if e.get("event")
        in ("internal_error", "connection_fault", "deadline_fault", "worker_exited", "<not json>")
    ]
    assert not faults, faults[:5]
    assert pids_end == pids, "a worker was restarted"
    assert rc == 0
    # Memory and descriptors.
    for pid in pids:
        growth = rss_end[pid] - rss_warm[pid]
        assert growth <= RSS_GROWTH_BOUND_KIB, f"pid {pid} grew {growth} KiB: {samples}"
        assert fd_end[pid] <= fd_base[pid], f"pid {pid}: {fd_base[pid]} fds idle, {fd_end[pid]} now"
