"""Path tricks: routes match exact request-target bytes, so no spelling of a
path other than the configured one can reach an upstream, and callers
without a valid token learn nothing about which paths exist (401 always)."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN, StartGateway
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.upstreams import RawUpstream
from tests.support.wire import parse_statuses

TRICKS = [
    "/api/v1/write/",
    "/api/v1/write/.",
    "/api/v1/write/..",
    "/api/v1/./write",
    "/./api/v1/write",
    "/api/v1/write/../../v1/traces",
    "/v1/traces/../../api/v1/write",
    "/api/v1/%2e%2e/v1/traces",
    "/api/v1/%2E%2E/%2E%2E/v1/traces",
    "/api%2Fv1%2Fwrite",
    "/api/v1%2fwrite",
    "//api/v1/write",
    "/api//v1/write",
    "/api/v1/write%00",
    "/api/v1/write%20",
    "/api/v1/write;jsessionid=1",
    "/api/v1/write#fragment",
    "/API/V1/WRITE",
    "/Api/v1/write",
    "/V1/TRACES",
    "/api/v1/writ",
    "/api/v1/write\\",
    "/api\\v1\\write",
    "/%61pi/v1/write",
    "/api/v1/write%2F",
    "/health/",
    "/HEALTH",
    "/health/../api/v1/write",
    "*",
    "http://gw/api/v1/write/..",
    "http://gw//api/v1/write",
    # Authority, then a query: a proxy in front sees path "/" (70f0a08 routed these).
    "http://gw?/api/v1/write",
    "http://gw:8080?/api/v1/write",
    "https://gw?/v1/traces",
    "http://gw?x=/api/v1/write",
]


async def _status(port: int, method: str, target: bytes, token: str | None) -> list[int]:
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    data = (
        method.encode()
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: gw\r\n"
        + auth
        + b"Content-Length: 4\r\n\r\nabcd"
    )
    async with raw_client(port) as conn:
        await conn.send(data)
        conn.half_close()
        return parse_statuses(await conn.eof())


@pytest.mark.parametrize("target", TRICKS)
async def test_path_trick_is_404_with_token_and_401_without(
    target: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    raw = target.encode()
    assert await _status(gw.port, "POST", raw, TOKEN) == [404]
    assert await _status(gw.port, "POST", raw, None) == [401]
    assert await _status(gw.port, "POST", raw, "wrong-token-0123456789") == [401]
    assert strict_upstream.conns == []


@pytest.mark.parametrize(
    "target",
    [
        b"/api/v1/write\x00",
        b"/api/v1/\x00/write",
        b"/api/v1/write\x7f",
        b"/api/v1/ write",
        b"api/v1/write",
        b"%2Fapi%2Fv1%2Fwrite",
        b"http://gw#/api/v1/write",
        b"http://gw\\/api/v1/write",
    ],
    ids=[
        "nul_end",
        "nul_mid",
        "del",
        "space",
        "relative",
        "encoded_first_slash",
        "absolute_fragment",
        "absolute_backslash",
    ],
)
async def test_unparseable_target_is_400(
    target: bytes, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    assert await _status(gw.port, "POST", target, TOKEN) == [400]
    assert strict_upstream.conns == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD"])
async def test_wrong_method_on_a_route_is_405_with_allow(
    method: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    head = method == "HEAD"
    data = f"{method} /api/v1/write HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    async with raw_client(gw.port) as conn:
        await conn.send(data.encode())
        resp = await conn.response(head=head)
    assert resp.status == 405
    assert resp.header("Allow") == "POST"
    assert strict_upstream.conns == []


async def test_lowercase_method_is_400(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    assert await _status(gw.port, "post", b"/api/v1/write", TOKEN) == [400]
    assert strict_upstream.conns == []


async def test_query_cannot_change_the_path(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Everything after "?" is query: forwarded as query, after the route's path."""
    gw = await start_gateway(hostile_config(strict_upstream))
    target = b"/api/v1/write?x=/../../v1/traces&y=%2F..%2F#frag"
    assert await _status(gw.port, "POST", target, TOKEN) == [204]
    [req] = strict_upstream.requests
    assert req.path == "/api/v1/write"
    assert req.target == "/api/v1/write?x=/../../v1/traces&y=%2F..%2F#frag"


async def test_absolute_form_goes_to_the_configured_upstream(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """RFC 9112 §3.2.2: absolute-form is accepted, but its authority never
    chooses where the request goes or what Host the upstream sees."""
    gw = await start_gateway(hostile_config(strict_upstream))
    target = b"http://169.254.169.254:80/api/v1/write?a=1"
    assert await _status(gw.port, "POST", target, TOKEN) == [204]
    [req] = strict_upstream.requests
    assert req.target == "/api/v1/write?a=1"
    assert req.all("Host") == [f"127.0.0.1:{strict_upstream.port}"]


@pytest.mark.parametrize("method", ["CONNECT", "OPTIONS"])
async def test_proxy_style_targets_are_not_routes(
    method: str, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    target = b"127.0.0.1:22" if method == "CONNECT" else b"*"
    data = (
        method.encode()
        + b" "
        + target
        + f" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    async with raw_client(gw.port) as conn:
        await conn.send(data)
        conn.half_close()
        stream = await conn.eof()
    assert parse_statuses(stream) in ([404], [400])
    assert strict_upstream.conns == []
