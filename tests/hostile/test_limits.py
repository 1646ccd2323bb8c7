"""Admission limits under attack: open connections, global and per-credential
concurrency with a short queue, request and byte rates, and auth-failure
throttling.  Refusals are immediate (no sleep holding a connection) and
protocol-aware: 429 + Retry-After on remote-write, 503 + Retry-After on OTLP."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import OTHER_TOKEN, TOKEN, StartGateway, sha256, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import RawClient, raw_client
from tests.support.metrics import scrape
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, Response, request

# A refusal must not park the connection: it is answered within this.
IMMEDIATE = 0.25


def _credentials(ingest_extra: str = "", other_extra: str = "") -> str:
    return f"""
[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
{ingest_extra}

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
{other_extra}
"""


class Holding:
    """An upstream that holds every request whose body is b"hold" until released."""

    def __init__(self, up: RawUpstream) -> None:
        self.release = asyncio.Event()
        up.responder = self.respond

    async def respond(self, conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"hold":
            await self.release.wait()
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")


async def _send(conn: RawClient, path: str, body: bytes, token: str = TOKEN, **kw: object) -> None:
    await conn.send(request("POST", path, body, token=token, **kw))  # type: ignore[arg-type]


async def _ask(port: int, path: str, body: bytes, token: str = TOKEN, **kw: object) -> Response:
    async with raw_client(port) as conn:
        await _send(conn, path, body, token, **kw)
        return await conn.response()


async def _timed(port: int, path: str, body: bytes, token: str = TOKEN) -> tuple[Response, float]:
    t0 = time.monotonic()
    resp = await _ask(port, path, body, token)
    return resp, time.monotonic() - t0


def _assert_overloaded(resp: Response, path: str) -> None:
    assert resp.status == (503 if path == "/v1/traces" else 429), resp
    assert resp.header("Retry-After") == "1"


async def test_max_connections_refuses_the_extra_connection(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(strict_upstream, extra="[limits]\nmax_connections = 3"),
    )
    held = [await RawClient.open(gw.port) for _ in range(3)]
    try:
        await wait_for(lambda: gw.stats.open_connections == 3)
        async with raw_client(gw.port) as extra:
            await _send(extra, "/api/v1/write", b"refused")
            resp = await extra.response()
            assert await extra.closed(3.0)
        assert resp.status == 503
        assert resp.header("Retry-After") == "1"
        assert gw.stats.limit_rejections == {"connections": 1}
        # The connections already open are untouched.
        await _send(held[0], "/api/v1/write", b"held")
        assert (await held[0].response()).status == 204
        # Once one goes away, a new one is accepted.
        await held.pop().close()
        await wait_for(lambda: gw.stats.open_connections == 2)
        assert (await _ask(gw.port, "/api/v1/write", b"later")).status == 204
    finally:
        for conn in held:
            await conn.close()
    assert [r.body for r in strict_upstream.requests] == [b"held", b"later"]


CONCURRENCY = """
[limits]
max_concurrent_requests = 1
queue_size = 1
queue_timeout_seconds = 0.3
"""


async def test_concurrency_queue_then_refusal(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    holding = Holding(strict_upstream)
    gw = await start_gateway(hostile_config(strict_upstream, extra=CONCURRENCY))
    async with raw_client(gw.port) as first, raw_client(gw.port) as queued:
        await _send(first, "/api/v1/write", b"hold")
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        t_queued = time.monotonic()
        await _send(queued, "/api/v1/write", b"queued")
        assert gw.shared is not None
        await wait_for(lambda: len(gw.shared.admission.slots.waiters) == 1)  # type: ignore[union-attr]
        # Queue full: refused at once, per protocol.
        for path in ("/api/v1/write", "/v1/traces"):
            resp, elapsed = await _timed(gw.port, path, b"full")
            _assert_overloaded(resp, path)
            assert elapsed < IMMEDIATE
        # The queued one gives up after queue_timeout.
        resp = await queued.response()
        _assert_overloaded(resp, "/api/v1/write")
        assert 0.25 <= time.monotonic() - t_queued <= 0.3 + 1.0
        holding.release.set()
        assert (await first.response()).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"hold"]
    assert gw.stats.limit_rejections == {"concurrency": 2, "queue_timeout": 1}


async def test_queued_requests_are_admitted_in_order(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    holding = Holding(strict_upstream)
    extra = "[limits]\nmax_concurrent_requests = 1\nqueue_size = 4\nqueue_timeout_seconds = 5"
    gw = await start_gateway(hostile_config(strict_upstream, extra=extra))
    assert gw.shared is not None
    waiters = gw.shared.admission.slots.waiters
    conns = [await RawClient.open(gw.port) for _ in range(4)]
    try:
        await _send(conns[0], "/api/v1/write", b"hold")
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        for i, conn in enumerate(conns[1:], start=1):
            await _send(conn, "/v1/traces" if i % 2 else "/api/v1/write", b"q%d" % i)
            await wait_for(lambda i=i: len(waiters) == i)  # type: ignore[misc]
        holding.release.set()
        statuses = [(await c.response()).status for c in conns]
    finally:
        for conn in conns:
            await conn.close()
    assert statuses == [204, 204, 204, 204]
    assert [r.body for r in strict_upstream.requests] == [b"hold", b"q1", b"q2", b"q3"]


async def test_admitted_request_is_not_refused_by_its_old_queue_deadline(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A request complete while queued, admitted with little queue time left,
    to an upstream slower than that: its deadline is the upstream's now.  It
    gets the upstream's one answer, not a 429 while the upstream works."""
    release = asyncio.Event()

    async def respond(conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"hold":
            await release.wait()
        else:
            await asyncio.sleep(0.6)  # longer than the queue time left (~0.3 s)
        await conn.write(b"HTTP/1.1 204 No Content\r\nX-Which: %s\r\n\r\n" % req.body)

    strict_upstream.responder = respond
    extra = "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 0.5"
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=extra, upstream="response_timeout_seconds = 3")
    )
    assert gw.shared is not None
    waiters = gw.shared.admission.slots.waiters
    async with raw_client(gw.port) as first, raw_client(gw.port) as queued:
        await _send(first, "/api/v1/write", b"hold")
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        await _send(queued, "/api/v1/write", b"slow")
        await wait_for(lambda: len(waiters) == 1)
        await asyncio.sleep(0.2)  # queue time passes: that is the case under test
        release.set()
        assert (await first.response()).status == 204
        resp = await queued.response(timeout=3.0)
        # Nothing else arrives on the connection: one request, one answer.
        await _send(queued, "/api/v1/write", b"next")
        after = await queued.response(timeout=3.0)
    assert (resp.status, resp.header("X-Which")) == (204, "slow")
    assert (after.status, after.header("X-Which")) == (204, "next")
    assert gw.stats.limit_rejections == {}
    assert [r.body for r in strict_upstream.requests] == [b"hold", b"slow", b"next"]


async def test_per_credential_concurrency_leaves_others_alone(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    holding = Holding(strict_upstream)
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra="[limits]\nqueue_size = 0",
            credentials=_credentials("max_concurrent_requests = 1"),
        )
    )
    async with raw_client(gw.port) as first:
        await _send(first, "/api/v1/write", b"hold")
        await wait_for(lambda: len(strict_upstream.requests) == 1)
        for path in ("/api/v1/write", "/v1/traces"):
            resp, elapsed = await _timed(gw.port, path, b"second")
            _assert_overloaded(resp, path)
            assert elapsed < IMMEDIATE
        assert (await _ask(gw.port, "/api/v1/write", b"other", OTHER_TOKEN)).status == 204
        holding.release.set()
        assert (await first.response()).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"hold", b"other"]


async def test_request_rate_limit_per_credential(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            credentials=_credentials("rate_limit_requests_per_second = 2\nrate_limit_burst = 3"),
        )
    )
    statuses = [(await _ask(gw.port, "/api/v1/write", b"%d" % i)).status for i in range(3)]
    assert statuses == [204, 204, 204]
    for path in ("/api/v1/write", "/v1/traces"):
        resp, elapsed = await _timed(gw.port, path, b"over")
        _assert_overloaded(resp, path)
        assert elapsed < IMMEDIATE
    assert (await _ask(gw.port, "/api/v1/write", b"other", OTHER_TOKEN)).status == 204
    assert gw.stats.limit_rejections == {"rate": 2}
    # The bucket refills at 2/s: within a second a request passes again.
    deadline = time.monotonic() + 2.0
    while (await _ask(gw.port, "/api/v1/write", b"refilled")).status != 204:
        assert time.monotonic() < deadline, "rate bucket never refilled"
        await asyncio.sleep(0.1)
    assert [r.body for r in strict_upstream.requests][:4] == [b"0", b"1", b"2", b"other"]
    assert strict_upstream.requests[-1].body == b"refilled"


async def test_byte_rate_limit_per_credential(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream, credentials=_credentials("rate_limit_bytes_per_second = 1000")
        )
    )
    assert (await _ask(gw.port, "/api/v1/write", b"b" * 5000)).status == 204
    for path in ("/api/v1/write", "/v1/traces"):
        resp, elapsed = await _timed(gw.port, path, b"small")
        _assert_overloaded(resp, path)
        assert elapsed < IMMEDIATE
    assert (await _ask(gw.port, "/api/v1/write", b"other", OTHER_TOKEN)).status == 204
    assert gw.stats.limit_rejections == {"byte_rate": 2}
    assert len(strict_upstream.requests) == 2


THROTTLE = """
[clients]
trusted_proxies = ["127.0.0.1/32"]

[limits]
auth_failure_limit = 3
auth_failure_window_seconds = 60
"""


@pytest.mark.parametrize("bad", ["wrong-token-0123456789abcdef", None])
async def test_auth_failures_throttle_that_address_only(
    bad: str | None, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """After 3 failures from one address its failures are refused at once
    (429 / 503, no delay); its valid requests and other addresses are not
    affected (main's choice: senders sharing a proxy address keep working)."""
    gw = await start_gateway(hostile_config(strict_upstream, extra=THROTTLE))
    attacker = [("X-Forwarded-For", "198.51.100.7")]
    t0 = time.monotonic()
    for _ in range(3):
        async with raw_client(gw.port) as conn:
            await conn.send(request("POST", "/api/v1/write", b"x", token=bad, headers=attacker))
            assert (await conn.response()).status == 401
    # No vmauth-style delay on failures: three 401s take no time.
    assert time.monotonic() - t0 < 3 * IMMEDIATE
    for path in ("/api/v1/write", "/v1/traces"):
        t1 = time.monotonic()
        async with raw_client(gw.port) as conn:
            await conn.send(request("POST", path, b"x", token=bad, headers=attacker))
            resp = await conn.response()
        _assert_overloaded(resp, path)
        assert time.monotonic() - t1 < IMMEDIATE
    # A valid token from that address, and failures from a neighbour, are not throttled.
    assert (await _ask(gw.port, "/api/v1/write", b"valid", headers=attacker)).status == 204
    neighbour = [("X-Forwarded-For", "198.51.100.8")]
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"x", token=bad, headers=neighbour))
        assert (await conn.response()).status == 401
    assert [r.body for r in strict_upstream.requests] == [b"valid"]
    assert gw.stats.limit_rejections == {"auth_throttle": 2}
    reason = "missing" if bad is None else "unknown"
    # Throttled failures are still counted with their reason.
    assert sum(n for k, n in gw.stats.auth_failures.items() if k[0] == reason) == 6


async def test_throttle_window_expires(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    extra = THROTTLE.replace(
        "auth_failure_window_seconds = 60", "auth_failure_window_seconds = 0.5"
    )
    gw = await start_gateway(hostile_config(strict_upstream, extra=extra))
    wrong = "bad-token-0123456789"
    for _ in range(3):
        assert (await _ask(gw.port, "/api/v1/write", b"x", wrong)).status == 401
    _assert_overloaded(await _ask(gw.port, "/api/v1/write", b"x", wrong), "/api/v1/write")
    deadline = time.monotonic() + 3.0
    while (await _ask(gw.port, "/api/v1/write", b"x", wrong)).status != 401:
        assert time.monotonic() < deadline, "throttle never expired"
        await asyncio.sleep(0.1)
    assert strict_upstream.requests == []


async def test_every_ending_returns_its_concurrency_slot(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """With one slot and no queue, a leaked slot would refuse the probe."""
    release = asyncio.Event()

    async def respond(conn: UpConn, req: ParsedRequest) -> None:
        if req.body == b"hang":
            await release.wait()
        elif req.body == b"reset":
            conn.reset()
            return
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    strict_upstream.responder = respond
    extra = "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 5"
    gw = await start_gateway(hostile_config(strict_upstream, extra=extra))
    assert gw.shared is not None
    slots = gw.shared.admission.slots

    async def probe() -> None:
        await wait_for(lambda: slots.in_use == 0 and not slots.waiters)
        assert (await _ask(gw.port, "/api/v1/write", b"probe")).status == 204

    # 1. upstream timeout (504)
    assert (await _ask(gw.port, "/api/v1/write", b"hang")).status == 504
    await probe()
    # 2. upstream reset (502; 503 on an OTLP route)
    assert (await _ask(gw.port, "/v1/traces", b"reset")).status == 503
    await probe()
    # 3. client vanishes while its request is upstream
    gone = await RawClient.open(gw.port)
    await _send(gone, "/api/v1/write", b"hang")
    await wait_for(lambda: slots.in_use == 1)
    gone.abort()
    await probe()
    # 4. client vanishes mid-body
    partial = await RawClient.open(gw.port)
    await partial.send(
        f"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 1000\r\n\r\nabc".encode()
    )
    await wait_for(lambda: slots.in_use == 1)
    partial.abort()
    await probe()
    release.set()
    assert gw.stats.pairs["remote_write", "ingest"].codes == {504: 1, 204: 4, 499: 2}


async def test_client_leaving_while_queued_gives_up_its_place(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A queued request whose client has gone must leave the queue and never
    be forwarded when a slot frees (the upstream would do work for nobody)."""
    holding = Holding(strict_upstream)
    extra = "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 5"
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=extra, upstream="response_timeout_seconds = 30")
    )
    assert gw.shared is not None
    slots = gw.shared.admission.slots
    async with raw_client(gw.port) as holder:
        await _send(holder, "/api/v1/write", b"hold")
        await wait_for(lambda: slots.in_use == 1)
        queued = await RawClient.open(gw.port)
        await _send(queued, "/api/v1/write", b"queued")
        await wait_for(lambda: len(slots.waiters) == 1)
        queued.abort()
        try:
            await wait_for(lambda: not slots.waiters, 2.0)
        finally:
            holding.release.set()
            assert (await holder.response()).status == 204
    await wait_for(lambda: slots.in_use == 0)
    assert b"queued" not in strict_upstream.received


async def test_refusals_are_counted_by_reason_on_the_admin_listener(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """What operators alert on: gateway_limit_rejections_total{reason} and
    gateway_open_connections, as scraped from /metrics."""
    extra = (
        '[clients]\ntrusted_proxies = ["127.0.0.1/32"]\ndeny = ["203.0.113.0/24"]\n'
        "[limits]\nmax_connections = 2\nauth_failure_limit = 1"
    )
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra=extra,
            credentials=_credentials("rate_limit_requests_per_second = 1"),
        )
    )
    denied = [("X-Forwarded-For", "203.0.113.5")]
    assert (await _ask(gw.port, "/api/v1/write", b"x", headers=denied)).status == 403
    bad = [("X-Forwarded-For", "198.51.100.5")]
    wrong = "bad-0123456789abcdef"
    assert (await _ask(gw.port, "/api/v1/write", b"x", wrong, headers=bad)).status == 401
    _assert_overloaded(await _ask(gw.port, "/v1/traces", b"x", wrong, headers=bad), "/v1/traces")
    assert (await _ask(gw.port, "/api/v1/write", b"x")).status == 204
    _assert_overloaded(await _ask(gw.port, "/api/v1/write", b"x"), "/api/v1/write")
    async with raw_client(gw.port) as one, raw_client(gw.port) as two:
        await wait_for(lambda: gw.stats.open_connections == 2)
        async with raw_client(gw.port) as three:
            assert (await three.response()).status == 503
        metrics = await scrape(gw.admin_port)
        assert metrics.sum("gateway_open_connections") == 2
        del one, two
    for reason, n in {"client_denied": 1, "auth_throttle": 1, "rate": 1, "connections": 1}.items():
        assert metrics.sum("gateway_limit_rejections_total", reason=reason) == n, reason
    assert metrics.sum("gateway_limit_rejections_total", reason="concurrency") == 0


# /health?deep=1 results are shared by concurrent callers and reused for
# this long (README, /health): the upstreams' connects are bounded by it.
PROBE_REUSE = 1.0


async def _deep(port: int, requests: int = 1) -> list[int]:
    """``requests`` pipelined deep checks on one connection; their statuses."""
    async with raw_client(port) as conn:
        await conn.send(request("GET", "/health?deep=1", token=TOKEN) * requests)
        return [(await conn.response()).status for _ in range(requests)]


async def test_deep_health_checks_cost_the_upstreams_a_bounded_number_of_connects(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A credential asking for deep checks as fast as it can (60 callers at
    once, then 200 pipelined on one connection, then 30 in a row) makes the
    gateway connect to each upstream at most once per PROBE_REUSE (plus one
    probe in flight), not once per check; and the answer is fresh enough to
    see an upstream go away."""
    gw = await start_gateway(hostile_config(strict_upstream))
    routes = 2  # both routes point at strict_upstream
    loop = asyncio.get_running_loop()
    started = loop.time()
    concurrent = await asyncio.gather(*(_deep(gw.port) for _ in range(60)))
    pipelined = await _deep(gw.port, 200)
    in_a_row = [status for _ in range(30) for status in await _deep(gw.port)]
    elapsed = loop.time() - started
    connects = len(strict_upstream.conns)
    print(f"290 deep checks in {elapsed:.2f} s: {connects} upstream connects")
    assert [s for batch in concurrent for s in batch] == [200] * 60
    assert pipelined == [200] * 200
    assert in_a_row == [200] * 30
    assert connects <= routes * (elapsed / PROBE_REUSE + 2), connects
    assert strict_upstream.requests == []  # a probe connects, it never sends
    # The upstream goes away: a deep check soon says so.
    await strict_upstream.stop()
    await asyncio.sleep(PROBE_REUSE + 0.1)
    assert await _deep(gw.port) == [503]
