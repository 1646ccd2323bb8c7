"""Tenancy over real sockets: what a credential's forward table pins is what
the upstream receives (the raw upstream records every byte), whatever the
client sent; the route decides whether the rest of its query passes; JWT
claims fill values in or the request is refused; what was overridden is
counted, and the access line names the values from config."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import grpc
import jwt
import orjson
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

from gateway.config.loader import loads
from tests.conftest import (
    OTHER_TOKEN,
    TOKEN,
    StartGateway,
    StartRawUpstream,
    config_text,
    sha256,
    wait_for,
)
from tests.support.client import raw_request
from tests.support.grpc_peers import METRICS_METHOD, TraceReceiver, call, grpc_config
from tests.support.metrics import scrape
from tests.support.upstreams import RawUpstream, answer_with
from tests.support.wire import ParsedRequest, request_bytes

NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
SECRET = "hmac-secret-for-the-functional-tenancy-0123456789"
JWT_TOKEN_NAME = "issuer"


def credentials(vminsert: str) -> str:
    return f"""
[[credentials]]
name = "team-a"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
[credentials.forward]
extra_labels = {{ tenant = "a" }}
headers = {{ "X-Scope-OrgID" = "a" }}
[credentials.forward.upstreams]
remote_write = "{vminsert}/insert/42/prometheus/api/v1/write"

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]

[[credentials]]
name = "{JWT_TOKEN_NAME}"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "https://issuer.test"
audience = "obs-gateway"
hmac_secret_env = "TENANCY_JWT_SECRET"
scope_claim = ""
[credentials.forward]
extra_labels = {{ tenant = "{{claim:tenant}}" }}
headers = {{ "X-Scope-OrgID" = "{{claim:tenant}}" }}
"""


def jwt_token(**claims: Any) -> str:
    body = {"iss": "https://issuer.test", "aud": "obs-gateway", "exp": int(time.time()) + 300}
    return jwt.encode({**body, **claims}, SECRET, algorithm="HS256")


async def setup(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream, **kwargs: Any
) -> tuple[int, int, RawUpstream, RawUpstream]:
    vm = await raw_upstream(answer_with(NO_CONTENT))
    vminsert = await raw_upstream(answer_with(NO_CONTENT))
    text = config_text(
        vm.url + "/api/v1/write",
        vm.url + "/v1/traces",
        credentials=credentials(vminsert.url),
        **kwargs,
    )
    gw = await start_gateway(loads(text, environ={"TENANCY_JWT_SECRET": SECRET}))
    return gw.port, gw.admin_port, vm, vminsert


def values(req: ParsedRequest, name: str) -> list[str]:
    return [v for n, v in req.headers if n.lower() == name.lower()]


EVIL_HEADERS = [
    ("X-Scope-OrgID", "evil"),
    ("x-scope-orgid", "evil-lower"),
    ("X-SCOPE-ORGID", "evil-upper"),
]


async def test_the_credential_decides_labels_headers_and_backend(
    start_gateway: StartGateway,
    raw_upstream: StartRawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    port, admin, vm, vminsert = await setup(start_gateway, raw_upstream)
    target = "/api/v1/write?extra_label=tenant=evil&foo=1&extra_label=tenant%3Devil2"
    resp = await raw_request(port, request_bytes("POST", target, EVIL_HEADERS, b"body"))
    assert resp.status == 204, resp
    assert vm.requests == []
    [seen] = vminsert.requests
    assert seen.target == "/insert/42/prometheus/api/v1/write?foo=1&extra_label=tenant%3Da"
    assert values(seen, "X-Scope-OrgID") == ["a"]
    assert values(seen, "Host") == [vminsert.url.removeprefix("http://")]
    assert seen.body == b"body"
    # The OTLP route keeps its upstream, gets the header, not the label.
    resp = await raw_request(port, request_bytes("POST", "/v1/traces?x=1", EVIL_HEADERS, b"span"))
    assert resp.status == 204, resp
    [traces] = vm.requests
    assert traces.target == "/v1/traces?x=1"
    assert values(traces, "X-Scope-OrgID") == ["a"]
    metrics = await scrape(admin)
    dropped = metrics.by("gateway_client_overrides_dropped_total", "kind", credential="team-a")
    assert dropped == {"extra_label": 2.0, "header": 6.0}
    await wait_for(lambda: sum(e.get("event") == "request" for e in log_capture) == 2)
    lines = [e for e in log_capture if e.get("event") == "request"]
    assert lines[0]["tenant"] == {"labels": {"tenant": "a"}, "headers": {"X-Scope-OrgID": "a"}}
    assert lines[1]["tenant"] == {"headers": {"X-Scope-OrgID": "a"}}
    assert "evil" not in orjson.dumps([dict(e) for e in log_capture]).decode()


async def test_a_credential_without_forward_keeps_todays_behaviour(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    port, admin, vm, vminsert = await setup(start_gateway, raw_upstream)
    target = "/api/v1/write?extra_label=tenant=mine&x=%2F"
    headers = [("X-Scope-OrgID", "mine")]
    resp = await raw_request(port, request_bytes("POST", target, headers, b"x", token=OTHER_TOKEN))
    assert resp.status == 204, resp
    [seen] = vm.requests
    assert seen.target == target
    assert values(seen, "X-Scope-OrgID") == ["mine"]
    assert vminsert.requests == []
    metrics = await scrape(admin)
    assert metrics.select("gateway_client_overrides_dropped_total") == []


async def test_a_route_that_drops_client_queries(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    drop = await raw_upstream(answer_with(NO_CONTENT))
    text = config_text(drop.url + "/api/v1/write").replace(
        'protocol = "prometheus-remote-write"',
        'protocol = "prometheus-remote-write"\nquery = "drop"',
    )
    gw = await start_gateway(text)
    target = "/api/v1/write?extra_label=tenant=evil&timeout=1s&x"
    resp = await raw_request(gw.port, request_bytes("POST", target, body=b"x", token=OTHER_TOKEN))
    assert resp.status == 204, resp
    [seen] = drop.requests
    assert seen.target == "/api/v1/write"
    dropped = (await scrape(gw.admin_port)).by(
        "gateway_client_overrides_dropped_total", "kind", credential="other"
    )
    assert dropped == {"extra_label": 1.0, "query_arg": 2.0}


async def test_jwt_claims_fill_in_the_tenant_or_are_refused(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    port, admin, vm, _ = await setup(start_gateway, raw_upstream)
    target = "/api/v1/write?extra_label=tenant=evil"
    token = jwt_token(tenant="c")
    resp = await raw_request(port, request_bytes("POST", target, EVIL_HEADERS, b"x", token=token))
    assert resp.status == 204, resp
    [seen] = vm.requests
    assert seen.target == "/api/v1/write?extra_label=tenant%3Dc"
    assert values(seen, "X-Scope-OrgID") == ["c"]
    for claims, error in [({}, "claim_missing"), ({"tenant": "c&extra_label=x"}, "claim_invalid")]:
        bad = request_bytes("POST", target, body=b"x", token=jwt_token(**claims))
        resp = await raw_request(port, bad)
        assert resp.status == 403, resp
        assert resp.body == b"token has no usable tenant claim\n"
        failures = (await scrape(admin)).by(
            "gateway_auth_failures_total", "reason", credential=JWT_TOKEN_NAME
        )
        assert failures.get(error) == 1.0, failures
    assert len(vm.requests) == 1  # nothing refused reached the upstream
    # /health needs no tenant: the token still authenticates.
    resp = await raw_request(port, request_bytes("GET", "/health", token=jwt_token()))
    assert resp.status == 200, resp


async def test_deep_health_probes_the_credentials_own_backend(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    port, _, _, vminsert = await setup(start_gateway, raw_upstream)
    await vminsert.stop()
    resp = await raw_request(port, request_bytes("GET", "/health?deep=1"))
    assert resp.status == 503, resp
    body = orjson.loads(resp.body)
    assert body["upstreams"] == {"remote_write": "unreachable", "otlp_traces": "ok"}
    resp = await raw_request(port, request_bytes("GET", "/health?deep=1", token=OTHER_TOKEN))
    assert resp.status == 200, resp
    assert orjson.loads(resp.body)["upstreams"] == {"remote_write": "ok", "otlp_traces": "ok"}
    assert vminsert.url.removeprefix("http://") not in resp.raw.decode("latin-1")


async def test_grpc_calls_go_to_the_credentials_backend_with_its_fields(
    start_gateway: StartGateway,
) -> None:
    shared, own = TraceReceiver().start(), TraceReceiver().start()
    try:
        extra = f"""
[credentials.forward]
headers = {{ "x-tenant" = "a", "X-Scope-OrgID" = "a" }}
[credentials.forward.upstreams]
grpc_traces = "http://127.0.0.1:{own.port}"
"""
        gw = await start_gateway(grpc_config(shared.port, credentials_extra=extra))
        evil = (("x-tenant", "evil"), ("x_tenant", "evil"), ("x-scope-orgid", "evil"))
        result = await asyncio.to_thread(
            call, f"127.0.0.1:{gw.port}", TOKEN, 5, metadata=evil + evil
        )
        assert result.code is grpc.StatusCode.OK, result
        # The traces method goes to the credential's own receiver; metrics
        # (no override) to the route's, both with the pinned fields only.
        assert (own.spans, shared.spans) == (5, 0)
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        result = await asyncio.to_thread(
            call,
            f"127.0.0.1:{gw.port}",
            TOKEN,
            method=METRICS_METHOD,
            request=request,
            metadata=evil,
        )
        assert result.code is grpc.StatusCode.OK, result
        assert shared.metrics_calls == 1
        [fields] = own.fields
        tenant = [(k, v) for k, v in fields if k.replace("_", "-") in ("x-tenant", "x-scope-orgid")]
        assert sorted(tenant) == [("x-scope-orgid", "a"), ("x-tenant", "a")]
        dropped = (await scrape(gw.admin_port)).by(
            "gateway_client_overrides_dropped_total", "kind", credential="ingest"
        )
        # 9 copies sent; the 3 "x_tenant" ones went with the "_" rule first.
        assert dropped == {"header": 6.0}
    finally:
        shared.stop()
        own.stop()
