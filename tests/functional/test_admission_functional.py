"""DESIGN §3 row "rate or concurrency limit" over real sockets, for both
route protocols: 429 + Retry-After on remote-write, 503 + Retry-After on
OTLP (never 429: the Python OTLP SDK drops it); and client address rules
(403).  Nothing refused here ever reaches an upstream."""

from __future__ import annotations

import pytest

from tests.conftest import (
    TOKEN,
    RecordingUpstream,
    StartGateway,
    config_text,
    sha256,
    wait_for,
)
from tests.support.client import raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.routes import ROUTE_IDS, ROUTES, RouteCase, assert_error_body
from tests.support.wire import request_bytes


def config_with(upstream: RecordingUpstream, extra: str = "", credential: str = "") -> str:
    credentials = f"""
[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
{credential}
"""
    return config_text(
        upstream.url + "/api/v1/write",
        upstream.url + "/v1/traces",
        extra=extra,
        credentials=credentials,
    )


def assert_overloaded(resp_status: int, retry_after: str | None, case: RouteCase) -> None:
    assert resp_status == case.status(remote_write=429, otlp=503)
    assert retry_after is not None
    assert int(retry_after) >= 0


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_concurrency_limit(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    upstream.hold = True
    gw = await start_gateway(
        config_with(upstream, "[limits]\nmax_concurrent_requests = 1\nqueue_size = 0")
    )
    async with raw_client(gw.port) as first:
        await first.send(request_bytes("POST", case.path, body=b"first"))
        await wait_for(lambda: len(upstream.complete) == 1)
        resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"second"))
        assert_overloaded(resp.status, resp.header("Retry-After"), case)
        assert_error_body(resp, case)
        upstream.release.set()
        assert (await first.response()).status == 204
    assert [r.body for r in upstream.requests] == [b"first"]
    # The slot is free again.
    assert (await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))).status == 204


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_queued_request_runs_when_a_slot_frees(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    upstream.hold = True
    gw = await start_gateway(
        config_with(
            upstream,
            "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 5",
        )
    )
    async with raw_client(gw.port) as first, raw_client(gw.port) as second:
        await first.send(request_bytes("POST", case.path, body=b"first"))
        await wait_for(lambda: len(upstream.complete) == 1)
        await second.send(request_bytes("POST", case.path, body=b"second"))
        # A scrape is a round trip through the same event loop: by its end the
        # gateway has read the second request, which is queued, not upstream.
        await scrape(gw.admin_port)
        assert len(upstream.requests) == 1
        upstream.release.set()
        assert (await first.response()).status == 204
        # With queue_size = 0 this one would have been refused at once.
        assert (await second.response()).status == 204
    assert [r.body for r in upstream.complete] == [b"first", b"second"]
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_limit_rejections_total") == 0


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_queue_timeout(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    upstream.hold = True
    gw = await start_gateway(
        config_with(
            upstream,
            "[limits]\nmax_concurrent_requests = 1\nqueue_size = 1\nqueue_timeout_seconds = 0.3",
        )
    )
    async with raw_client(gw.port) as first:
        await first.send(request_bytes("POST", case.path, body=b"first"))
        await wait_for(lambda: len(upstream.complete) == 1)
        resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"second"))
        assert_overloaded(resp.status, resp.header("Retry-After"), case)
        upstream.release.set()
        assert (await first.response()).status == 204
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_per_credential_request_rate(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(
        config_with(
            upstream, credential="rate_limit_requests_per_second = 0.01\nrate_limit_burst = 2"
        )
    )
    statuses = [
        (await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))).status
        for _ in range(3)
    ]
    assert statuses[:2] == [204, 204]
    resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))
    assert_overloaded(resp.status, resp.header("Retry-After"), case)
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_auth_failure_throttle(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    """After N failures an address's bad tokens get 429/503, not 401; a
    valid token from the same address (another sender behind the same
    proxy) still goes through."""
    gw = await start_gateway(config_with(upstream, "[limits]\nauth_failure_limit = 2"))
    bad = request_bytes("POST", case.path, body=b"x", token="wrong-token-0123456789")
    for _ in range(2):
        assert (await raw_request(gw.port, bad)).status == 401
    resp = await raw_request(gw.port, bad)
    assert_overloaded(resp.status, resp.header("Retry-After"), case)
    assert upstream.requests == []
    resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))
    assert resp.status == 204
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_denied_client_address_is_403(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(config_with(upstream, '[clients]\ndeny = ["127.0.0.0/8"]'))
    resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))
    assert resp.status == 403
    assert_error_body(resp, case)
    assert upstream.requests == []
