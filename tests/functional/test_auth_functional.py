"""DESIGN §3 rows 1-2 over real sockets, for both route protocols: every path
needs a valid credential (401 + WWW-Authenticate: Bearer otherwise, never a
route-table leak), a valid credential out of scope gets 403, and /health
answers a valid credential without ever being proxied."""

from __future__ import annotations

import json

import pytest

from gateway.process.gateway import Gateway
from tests.conftest import (
    OTHER_TOKEN,
    TOKEN,
    StartGateway,
    StartRawUpstream,
    config_text,
    sha256,
)
from tests.support.client import raw_request
from tests.support.metrics import scrape
from tests.support.routes import (
    ROUTE_IDS,
    ROUTES,
    THREE_CREDENTIALS,
    TRACES_TOKEN,
    RouteCase,
    assert_error_body,
)
from tests.support.upstreams import RawUpstream, answer_with
from tests.support.wire import request_bytes

EXPIRED = "test-token-0123456789abcdef-expired"
FUTURE = "test-token-0123456789abcdef-future"
REVOKED = "test-token-0123456789abcdef-revoked"
WINDOWED = f"""
[[credentials]]
name = "windowed"
routes = ["remote_write", "otlp_traces"]
[[credentials.tokens]]
id = "expired"
sha256 = "{sha256(EXPIRED.encode())}"
not_after = 2020-01-01T00:00:00Z
[[credentials.tokens]]
id = "future"
sha256 = "{sha256(FUTURE.encode())}"
not_before = 2999-01-01T00:00:00Z
[[credentials.revoked]]
id = "revoked"
sha256 = "{sha256(REVOKED.encode())}"
"""
OK_204 = b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.fixture
async def setup(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> tuple[Gateway, RawUpstream]:
    up = await raw_upstream(answer_with(OK_204))
    text = config_text(
        up.url + "/api/v1/write",
        up.url + "/v1/traces",
        credentials=THREE_CREDENTIALS + WINDOWED,
    )
    return await start_gateway(text), up


# (Authorization header values or None for absent, auth_failures reason)
BAD_CREDENTIALS = [
    pytest.param(None, "missing", id="missing"),
    pytest.param(["Basic dXNlcjpwYXNz"], "malformed", id="basic-scheme"),
    pytest.param(["Bearer"], "malformed", id="scheme-only"),
    pytest.param(["Bearer "], "malformed", id="empty-token"),
    pytest.param([f"Bearer {TOKEN} extra"], "malformed", id="two-words"),
    pytest.param(["Bearer " + "a" * 5000], "malformed", id="oversized"),
    pytest.param([f"Bearer {TOKEN}", f"Bearer {TOKEN}"], "malformed", id="duplicate-header"),
    pytest.param(["Bearer not-a-configured-token-000000"], "unknown", id="unknown"),
    pytest.param([f"Bearer {TOKEN[:-1]}"], "unknown", id="prefix-of-valid"),
    pytest.param(["Bearer tök€n-ünïcode"], "unknown", id="non-ascii-utf8"),
    pytest.param([f"Bearer {EXPIRED}"], "expired", id="expired"),
    pytest.param([f"Bearer {FUTURE}"], "not_yet_valid", id="not-yet-valid"),
    pytest.param([f"Bearer {REVOKED}"], "revoked", id="revoked"),
]


def with_auth(values: list[str] | None) -> list[tuple[str, str]]:
    return [("Authorization", v) for v in values or []]


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(("auth", "reason"), BAD_CREDENTIALS)
async def test_bad_credentials_get_401_on_routes(
    setup: tuple[Gateway, RawUpstream], case: RouteCase, auth: list[str] | None, reason: str
) -> None:
    gw, up = setup
    head = request_bytes("POST", case.path, with_auth(auth), token=None, content_length=5)
    resp = await raw_request(gw.port, head + b"hello")
    assert resp.status == 401
    challenge = resp.header("WWW-Authenticate") or ""
    assert challenge.startswith("Bearer "), resp.headers
    if auth is None:
        assert "error=" not in challenge  # RFC 6750 §3.1
    else:
        assert 'error="invalid_token"' in challenge
    assert_error_body(resp, case)
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_auth_failures_total", reason=reason) == 1
    assert metrics.sum("gateway_requests_total", route=case.name, credential="none", code="401")
    assert up.connections == 0


@pytest.mark.parametrize(
    "path",
    ["/nope", "/", "/health", "/api/v1/write/", "/metrics", "/api/v1/write/../../etc/passwd"],
)
@pytest.mark.parametrize(
    ("auth", "reason"),
    [p for p in BAD_CREDENTIALS if p.id in {"missing", "basic-scheme", "unknown", "expired"}],
)
async def test_bad_credentials_get_401_on_every_path(
    setup: tuple[Gateway, RawUpstream], path: str, auth: list[str] | None, reason: str
) -> None:
    # Unauthenticated callers learn nothing about the route table (DESIGN §2).
    gw, up = setup
    for method in ("GET", "POST", "DELETE"):
        resp = await raw_request(gw.port, request_bytes(method, path, with_auth(auth), token=None))
        assert resp.status == 401, (method, path)
        assert (resp.header("WWW-Authenticate") or "").startswith("Bearer ")
        assert resp.header("Allow") is None
    assert up.connections == 0


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_otlp_json_request_gets_json_401(
    setup: tuple[Gateway, RawUpstream], case: RouteCase
) -> None:
    gw, _ = setup
    head = request_bytes(
        "POST", case.path, [("Content-Type", "application/json")], b"{}", token=None
    )
    resp = await raw_request(gw.port, head)
    assert resp.status == 401
    assert_error_body(resp, case, as_json=True)


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_credential_out_of_scope_gets_403(
    setup: tuple[Gateway, RawUpstream], case: RouteCase
) -> None:
    gw, up = setup
    resp = await raw_request(
        gw.port, request_bytes("POST", case.path, body=b"data", token=case.out_of_scope_token)
    )
    assert resp.status == 403
    assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or "")
    assert_error_body(resp, case)
    assert up.connections == 0
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_auth_failures_total", reason="scope") == 1
    # The in-scope credentials do pass (the 403 is about scope, nothing else).
    for token in (TOKEN, OTHER_TOKEN if not case.otlp else TRACES_TOKEN):
        ok = await raw_request(gw.port, request_bytes("POST", case.path, body=b"x", token=token))
        assert ok.status == 204
    assert up.connections >= 1
    assert len(up.requests) == 2


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_valid_token_any_scheme_case_passes(
    setup: tuple[Gateway, RawUpstream], scheme: str
) -> None:
    gw, up = setup
    head = request_bytes(
        "POST", "/api/v1/write", [("Authorization", f"{scheme}  {TOKEN}")], b"x", token=None
    )
    resp = await raw_request(gw.port, head)
    assert resp.status == 204
    assert len(up.requests) == 1


@pytest.mark.parametrize("ows", [" ", "\t", "  \t "])
async def test_whitespace_around_the_header_value_is_not_part_of_the_token(
    setup: tuple[Gateway, RawUpstream], ows: str
) -> None:
    # RFC 9110 §5.5: leading and trailing whitespace is not part of a field
    # value; recipients exclude it before evaluating the value.
    gw, _up = setup
    for value in (f"Bearer {TOKEN}{ows}", f"{ows}Bearer {TOKEN}"):
        head = request_bytes("POST", "/api/v1/write", [("Authorization", value)], b"x", token=None)
        resp = await raw_request(gw.port, head)
        assert resp.status == 204, repr(value)


async def test_health_names_the_credential_and_is_never_proxied(
    setup: tuple[Gateway, RawUpstream],
) -> None:
    gw, up = setup
    for token, name, routes in (
        (TOKEN, "ingest", ["otlp_traces", "remote_write"]),
        (OTHER_TOKEN, "other", ["remote_write"]),
        (TRACES_TOKEN, "traces", ["otlp_traces"]),
    ):
        resp = await raw_request(gw.port, request_bytes("GET", "/health", token=token))
        assert resp.status == 200
        assert resp.header("Cache-Control") == "no-store"
        assert resp.header("Content-Type") == "application/json"
        body = json.loads(resp.body)
        assert body["credential"] == name
        assert body["routes"] == routes
        assert token not in resp.raw.decode("latin-1")
        assert sha256(token.encode()) not in resp.raw.decode("latin-1")
    resp = await raw_request(gw.port, request_bytes("POST", "/health", body=b"x"))
    assert resp.status == 405
    assert resp.header("Allow") == "GET, HEAD"
    assert up.connections == 0
