"""DESIGN §3 row "rate or concurrency limit" over real sockets, for both
route protocols: 429 + Retry-After on remote-write, 503 + Retry-After on
OTLP (never 429: the Python OTLP SDK drops it); and client address rules
(403).  Nothing refused here ever reaches an upstream."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

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


def _errors(events: list[MutableMapping[str, Any]]) -> list[tuple[int, str | None]]:
    return [(e["status"], e["error"]) for e in events if e.get("event") == "request"]


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_auth_failure_throttle(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    case: RouteCase,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    """The default mode, exactly as README § [limits] and the runbook say:
    after N failures an address's further failures get 429/503, not 401,
    still checked, counted and logged under their reason; a valid token
    from the same address (another sender behind the same proxy) still
    goes through."""
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
    throttled = case.status(remote_write=429, otlp=503)
    assert _errors(log_capture) == [
        (401, "auth_unknown"),
        (401, "auth_unknown"),
        (throttled, "auth_unknown"),
        (204, None),
    ]
    assert gw.stats.auth_failures == {("unknown", "none", "none"): 3}
    assert gw.stats.limit_rejections == {"auth_throttle": 1}


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_strict_auth_failure_throttle_refuses_before_checking_the_token(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    case: RouteCase,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    """auth_throttle_mode = "strict": once throttled, every request from the
    address is refused before its token is looked at, valid ones too, and
    the refusals are not auth failures (nothing was checked)."""
    gw = await start_gateway(
        config_with(upstream, '[limits]\nauth_failure_limit = 2\nauth_throttle_mode = "strict"')
    )
    bad = request_bytes("POST", case.path, body=b"x", token="wrong-token-0123456789")
    good = request_bytes("POST", case.path, body=b"x")
    assert (await raw_request(gw.port, good)).status == 204
    for _ in range(2):
        assert (await raw_request(gw.port, bad)).status == 401
    for data in (good, bad):
        resp = await raw_request(gw.port, data)
        assert_overloaded(resp.status, resp.header("Retry-After"), case)
    # Before the route too: an address that is refused learns nothing.
    assert (await raw_request(gw.port, request_bytes("POST", "/nowhere", body=b"x"))).status == 429
    assert len(upstream.requests) == 1
    throttled = case.status(remote_write=429, otlp=503)
    assert _errors(log_capture)[3:5] == [(throttled, "auth_throttled")] * 2
    refused = [e for e in log_capture if e.get("error") == "auth_throttled"]
    assert {(e["credential"], e["token_id"]) for e in refused} == {("none", None)}
    assert gw.stats.auth_failures == {("unknown", "none", "none"): 2}
    assert gw.stats.limit_rejections == {"auth_throttle": 3}


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_denied_client_address_is_403(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(config_with(upstream, '[clients]\ndeny = ["127.0.0.0/8"]'))
    resp = await raw_request(gw.port, request_bytes("POST", case.path, body=b"x"))
    assert resp.status == 403
    assert_error_body(resp, case)
    assert upstream.requests == []
