"""DESIGN §3 rows 3-4 and the exact-match rule over real sockets: an
authenticated unknown path is 404, a wrong method 405 + Allow, and no path
trick (dot segments, double slashes, percent-encoding, trailing junk) ever
reaches an upstream."""

from __future__ import annotations

import json

import pytest
from google.rpc import status_pb2

from gateway.process.gateway import Gateway
from tests.conftest import StartGateway, StartRawUpstream, config_text
from tests.support.client import raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.routes import OTLP as OTLP_CASE
from tests.support.routes import ROUTE_IDS, ROUTES, THREE_CREDENTIALS, RouteCase, assert_error_body
from tests.support.upstreams import RawUpstream, answer_with
from tests.support.wire import request_bytes

OK_204 = b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.fixture
async def setup(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> tuple[Gateway, RawUpstream]:
    up = await raw_upstream(answer_with(OK_204))
    text = config_text(
        up.url + "/api/v1/write", up.url + "/v1/traces", credentials=THREE_CREDENTIALS
    )
    return await start_gateway(text), up


TRICKS = [
    "/api/v1/write/",
    "/api/v1/write/../x",
    "/api/v1/write/..",
    "/x/../api/v1/write",
    "//api/v1/write",
    "/api//v1/write",
    "/./api/v1/write",
    "/api/v1/./write",
    "/api/v1/%2e%2e/v1/write",
    "/api/v1/write/%2e%2e/x",
    "/%61pi/v1/write",
    "/api/v1/write%2F",
    "/api/v1/write%00",
    "/api/v1/write;jsessionid=1",
    "/API/V1/WRITE",
    "/api/v1/writex",
    "/api/v1/wr",
    "/v1/traces/",
    "/v1/traces/../traces",
    "/v1//traces",
    "/v1/%74races",
    "/health/",
    "/healthz",
    "*",
]


@pytest.mark.parametrize("path", TRICKS)
async def test_path_tricks_are_404_and_never_reach_an_upstream(
    setup: tuple[Gateway, RawUpstream], path: str
) -> None:
    gw, up = setup
    resp = await raw_request(gw.port, request_bytes("POST", path, body=b"payload"))
    assert resp.status in (400, 404), resp
    if resp.status == 404:
        assert_error_body(resp, None)
    assert up.connections == 0
    # Positive control: the same gateway does reach this upstream.
    ok = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"payload"))
    assert ok.status == 204
    assert up.connections == 1
    [seen] = up.requests
    assert seen.raw.startswith(b"POST /api/v1/write HTTP/1.1\r\n")


async def test_absolute_form_maps_to_the_path_only(setup: tuple[Gateway, RawUpstream]) -> None:
    # RFC 9112 §3.2.2: servers accept absolute-form; the authority is not a route key.
    gw, up = setup
    resp = await raw_request(
        gw.port, request_bytes("POST", "http://evil.example/api/v1/write?x=1", body=b"p")
    )
    assert resp.status == 204
    [seen] = up.requests
    assert seen.raw.startswith(b"POST /api/v1/write?x=1 HTTP/1.1\r\n")
    assert b"evil.example" not in seen.raw


@pytest.mark.parametrize("path", ["/nope", "/", "/metrics", "/api/v1/query", "/v1/logs"])
async def test_authenticated_unknown_path_is_404(
    setup: tuple[Gateway, RawUpstream], path: str
) -> None:
    gw, up = setup
    for method in ("GET", "POST"):
        resp = await raw_request(gw.port, request_bytes(method, path, body=b"x"))
        assert resp.status == 404
        assert resp.header("WWW-Authenticate") is None
        assert_error_body(resp, None)
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", route="unmatched", code="404") == 2
    assert up.connections == 0


OTLP_ENCODINGS = [
    ("application/x-protobuf", False),
    ("Application/X-Protobuf", False),
    ("application/json", True),
    ("application/json; charset=utf-8", True),
]


@pytest.mark.parametrize("path", ["/v1/metrics", "/v1/logs", "/nope"])
@pytest.mark.parametrize(("ctype", "as_json"), OTLP_ENCODINGS)
async def test_unrouted_otlp_request_gets_a_google_rpc_status_404(
    setup: tuple[Gateway, RawUpstream], path: str, ctype: str, as_json: bool
) -> None:
    """Issue 10 item 14: an OTLP exporter pointed at a signal with no route
    reads the 404 as a google.rpc.Status in its own encoding."""
    gw, up = setup
    headers = [("Content-Type", ctype)]
    resp = await raw_request(gw.port, request_bytes("POST", path, headers, b"\x0a\x00"))
    assert resp.status == 404
    assert_error_body(resp, OTLP_CASE, as_json=as_json)
    if as_json:
        assert json.loads(resp.body) == {"code": 5, "message": "not found"}  # NOT_FOUND
    else:
        status = status_pb2.Status()
        status.ParseFromString(resp.body)
        assert (status.code, status.message) == (5, "not found")
    assert up.connections == 0


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_unrouted_request_of_another_type_gets_text(
    setup: tuple[Gateway, RawUpstream], ctype: str | None
) -> None:
    gw, _ = setup
    headers = [] if ctype is None else [("Content-Type", ctype)]
    resp = await raw_request(gw.port, request_bytes("POST", "/v1/metrics", headers, b"x"))
    assert resp.status == 404
    assert_error_body(resp, None)
    assert resp.body == b"not found\n"


async def test_otlp_encoding_does_not_change_refusals_before_routing(
    setup: tuple[Gateway, RawUpstream],
) -> None:
    # Without a valid token nothing about the path is revealed: the same
    # 401 as any unknown path.
    gw, _ = setup
    headers = [("Content-Type", "application/x-protobuf")]
    resp = await raw_request(
        gw.port, request_bytes("POST", "/v1/metrics", headers, b"x", token="wrong-token-xyz")
    )
    plain = await raw_request(
        gw.port, request_bytes("POST", "/nope", body=b"x", token="wrong-token-xyz")
    )
    assert resp.status == plain.status == 401
    assert resp.body == plain.body


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_wrong_method_is_405_with_allow(
    setup: tuple[Gateway, RawUpstream], case: RouteCase, method: str
) -> None:
    gw, up = setup
    async with raw_client(gw.port) as client:
        await client.send(request_bytes(method, case.path))
        # A HEAD answer has no body: read the head only.
        resp = await client.response(head=method == "HEAD")
    assert resp.status == 405
    assert resp.header("Allow") == "POST"
    if method != "HEAD":
        assert_error_body(resp, case)
    assert up.connections == 0


async def test_405_keeps_the_connection_for_the_next_request(
    setup: tuple[Gateway, RawUpstream],
) -> None:
    gw, up = setup
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("GET", "/api/v1/write"))
        assert (await client.response()).status == 405
        await client.send(request_bytes("POST", "/api/v1/write", body=b"ok"))
        assert (await client.response()).status == 204
    assert len(up.requests) == 1
