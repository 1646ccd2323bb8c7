"""HTTP/1.1 routes and /health over HTTP/2, black box: an HTTP/2 client
(h2 on a socket, and curl's nghttp2) on the public port, h2c and TLS with
ALPN h2, in front of a real HTTP/1.1 upstream (aiohttp) or the raw recording
one.  The answers must be the ones an HTTP/1.1 client gets for the same
request, byte for byte where the gateway makes them."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from gateway.datapath.upstream import Pool
from gateway.process.gateway import Gateway
from tests.conftest import (
    OTHER_TOKEN,
    TOKEN,
    RecordingUpstream,
    StartGateway,
    StartRawUpstream,
    config_text,
)
from tests.hostile.pki import Pki
from tests.integration.harness import require_binary
from tests.support.client import raw_request
from tests.support.grpc_peers import TRACE_METHOD, TraceReceiver, spans_request
from tests.support.h2client import H2Client, H2Response
from tests.support.metrics import scrape
from tests.support.routes import THREE_CREDENTIALS, TRACES_TOKEN
from tests.support.upstreams import answer_with
from tests.support.wire import Response, request_bytes

# An otlp-grpc route is what makes the gateway speak HTTP/2 at all.
GRPC_ROUTE = """
[[routes]]
name = "grpc_traces"
path = "{method}"
protocol = "otlp-grpc"
upstream = "http://127.0.0.1:{port}"
"""
PROTOBUF = ("content-type", "application/x-protobuf")


def h2_config(
    url: str, *, grpc_port: int = 9, max_body_bytes: int = 64 * 1024 * 1024, extra: str = ""
) -> str:
    text = config_text(
        url + "/api/v1/write",
        url + "/v1/traces",
        max_body_bytes=max_body_bytes,
        extra=GRPC_ROUTE.format(method=TRACE_METHOD, port=grpc_port) + extra,
        credentials=THREE_CREDENTIALS,
    )
    return text.replace(
        'routes = ["remote_write", "otlp_traces"]',
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]',
        1,
    )


def auth(token: str | None = TOKEN) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


async def h2_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
) -> H2Response:
    client = await H2Client.open(port)
    try:
        return await client.request(method, path, headers, body)
    finally:
        await client.close()


async def test_otlp_over_h2c_reaches_the_http1_upstream_intact(
    start_gateway: StartGateway, upstream: RecordingUpstream, log_capture: list[Any]
) -> None:
    upstream.status = 200
    upstream.response_body = b"\x0a\x00" * 3000
    upstream.response_headers = {"X-Upstream": "yes", "Content-Type": "application/x-protobuf"}
    gw = await start_gateway(h2_config(upstream.url))
    body = spans_request(200).SerializeToString()
    headers = [*auth(), PROTOBUF, ("content-length", str(len(body))), ("x-custom", "kept")]
    headers += [("x-real-ip", "203.0.113.9"), ("x_under", "dropped")]
    resp = await h2_request(gw.port, "POST", "/v1/traces?x=1", headers, body)
    assert resp.status == 200
    assert resp.ended
    assert resp.reset is None
    assert resp.body == upstream.response_body
    assert resp.header("x-upstream") == "yes"
    assert resp.header("content-length") == str(len(upstream.response_body))
    [seen] = upstream.complete
    assert seen.body == body
    assert seen.path_qs == "/v1/traces?x=1"
    assert not seen.chunked
    assert seen.headers["Content-Length"] == str(len(body))
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    # As over HTTP/1.1: the client's address claims and underscore names stop here.
    assert seen.headers.getall("X-Real-IP") == ["127.0.0.1"]
    assert "x_under" not in seen.headers
    assert seen.headers["X-Request-Id"]
    # The credential was the gateway's; HTTP/2's own fields are not HTTP/1.1's.
    assert "Authorization" not in seen.headers
    assert "te" not in seen.headers
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    metrics = await scrape(gw.admin_port)
    assert (
        metrics.sum("gateway_requests_total", route="otlp_traces", credential="ingest", code="200")
        == 1
    )
    assert metrics.sum("gateway_credential_request_bytes_total", credential="ingest") == len(body)
    [line] = [e for e in log_capture if e.get("event") == "request"]
    assert (line["http"], line["route"], line["status"], line["bytes_in"]) == (
        "2",
        "otlp_traces",
        200,
        len(body),
    )
    assert TOKEN not in repr(log_capture)


async def test_a_body_without_content_length_goes_upstream_chunked(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", [*auth(), PROTOBUF])
    parts = [b"a" * 1000, b"b" * 70_000, b"c" * 5]
    for part in parts:
        await client.send(sid, part)
    await client.send(sid, b"", end=True)
    resp = await client.wait(sid)
    await client.close()
    assert resp.status == 204
    [seen] = upstream.complete
    assert seen.chunked
    assert seen.body == b"".join(parts)


async def test_a_large_body_and_answer_stream_through_every_window(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    # Many times every window on the way: 256 KiB per stream, 1 MiB per
    # connection, the client's 64 KiB default for the answer.
    upstream.status = 200
    upstream.response_body = bytes(range(256)) * 12_000  # 3 MB
    upstream.keep_bodies = False
    gw = await start_gateway(h2_config(upstream.url))
    body = hashlib.sha256(b"seed").digest() * 250_000  # 8 MB
    resp = await h2_request(
        gw.port, "POST", "/api/v1/write", [*auth(), ("content-length", str(len(body)))], body
    )
    assert resp.status == 200
    assert resp.body == upstream.response_body
    [seen] = upstream.complete
    assert seen.received == len(body)
    assert seen.sha256 == hashlib.sha256(body).hexdigest()


async def test_streams_of_one_connection_share_pooled_upstream_connections(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    client = await H2Client.open(gw.port)
    for _ in range(3):
        sids = [await client.start("POST", "/api/v1/write", auth()) for _ in range(10)]
        for sid in sids:
            await client.send(sid, b"x" * 100, end=True)
        answers = [await client.wait(sid) for sid in sids]
        assert [r.status for r in answers] == [204] * 10
    await client.close()
    assert len(upstream.complete) == 30
    shared = gw.shared
    assert shared is not None
    route = shared.gen.routes.get(b"/api/v1/write")
    assert route is not None
    assert route.upstream is not None
    # Released to the pool between rounds: at most one round's worth open.
    assert len(cast(Pool, shared.pools.get(route.upstream))._idle) <= 10


# -- the status table ---------------------------------------------------------------
# The same request over HTTP/1.1 and HTTP/2: same status, same body, same
# fields (names lower case over HTTP/2, framing aside).
COMPARED = (
    "content-type",
    "content-length",
    "cache-control",
    "www-authenticate",
    "retry-after",
    "allow",
)


def _h1_fields(resp: Response) -> dict[str, str]:
    return {n.lower(): v for n, v in resp.headers if n.lower() in COMPARED}


def _h2_fields(resp: H2Response) -> dict[str, str]:
    return {n: v for n, v in resp.headers if n in COMPARED}


CASES = [
    # case id, method, path, token, headers, body, expected (remote-write-ish status)
    pytest.param("POST", "/api/v1/write", None, [], b"x", 401, id="rw-no-token"),
    pytest.param("POST", "/v1/traces", "wrong", [PROTOBUF], b"x", 401, id="otlp-bad-token"),
    pytest.param(
        "POST",
        "/v1/traces",
        None,
        [("content-type", "application/json")],
        b"{}",
        401,
        id="otlp-json-no-token",
    ),
    pytest.param("POST", "/api/v1/write", TRACES_TOKEN, [], b"x", 403, id="rw-out-of-scope"),
    pytest.param("POST", "/v1/traces", OTHER_TOKEN, [PROTOBUF], b"x", 403, id="otlp-out-of-scope"),
    pytest.param("POST", "/nowhere", TOKEN, [], b"x", 404, id="unknown-path"),
    pytest.param("POST", "/v1/metrics", TOKEN, [PROTOBUF], b"x", 404, id="otlp-unrouted-signal"),
    pytest.param("GET", "/api/v1/write", TOKEN, [], b"", 405, id="rw-method"),
    pytest.param("PUT", "/v1/traces", TOKEN, [PROTOBUF], b"x", 405, id="otlp-method"),
    pytest.param("POST", "/api/v1/write", TOKEN, [], b"y" * 2048, 413, id="rw-too-large"),
    pytest.param("POST", "/v1/traces", TOKEN, [PROTOBUF], b"y" * 2048, 413, id="otlp-too-large"),
    pytest.param("POST", "/api/v1/write", TOKEN, [], b"x", 502, id="rw-upstream-down"),
    pytest.param("POST", "/v1/traces", TOKEN, [PROTOBUF], b"x", 503, id="otlp-upstream-down"),
]


@pytest.mark.parametrize(("method", "path", "token", "headers", "body", "status"), CASES)
async def test_every_answer_is_the_http1_one(
    start_gateway: StartGateway,
    method: str,
    path: str,
    token: str | None,
    headers: list[tuple[str, str]],
    body: bytes,
    status: int,
) -> None:
    # Port 9 (discard) refuses: the "upstream down" rows; the rest never get there.
    gw = await start_gateway(h2_config("http://127.0.0.1:9", max_body_bytes=1024))
    h1 = await raw_request(
        gw.port,
        request_bytes(method, path, [(n.title(), v) for n, v in headers], body, token=token),
    )
    h2 = await h2_request(
        gw.port, method, path, [*auth(token), *headers, ("content-length", str(len(body)))], body
    )
    assert h1.status == h2.status == status
    assert h2.body == h1.body
    assert _h2_fields(h2) == _h1_fields(h1)
    assert h2.ended
    if status >= 500:
        # OTLP senders retry on their own backoff: no Retry-After for an upstream failure.
        assert h2.header("retry-after") is None
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", code=str(status)) == 2


async def test_rate_limits_answer_with_retry_after_as_on_http1(start_gateway: StartGateway) -> None:
    text = h2_config("http://127.0.0.1:9").replace(
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]',
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]\n'
        "rate_limit_requests_per_second = 0.001\nrate_limit_burst = 1",
    )
    gw = await start_gateway(text)
    one = await h2_request(gw.port, "POST", "/api/v1/write", auth(), b"x")
    rw = await h2_request(gw.port, "POST", "/api/v1/write", auth(), b"x")
    otlp = await h2_request(gw.port, "POST", "/v1/traces", [*auth(), PROTOBUF], b"x")
    assert one.status == 502  # admitted, and port 9 refused it
    assert (rw.status, rw.header("retry-after")) == (429, "1")
    assert (otlp.status, otlp.header("retry-after")) == (503, "1")


async def test_health_over_h2_is_the_http1_answer(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    for query in ("", "?deep=1"):
        h1 = await raw_request(gw.port, request_bytes("GET", "/health" + query, token=TOKEN))
        h2 = await h2_request(gw.port, "GET", "/health" + query, auth())
        assert h2.status == h1.status
        assert h2.body == h1.body
        assert h2.header("content-type") == "application/json"
    # deep: the gRPC route's port 9 is unreachable, the HTTP ones are up.
    assert h2.status == 503
    assert b'"grpc_traces":"unreachable"' in h2.body
    assert b'"otlp_traces":"ok"' in h2.body
    head = await h2_request(gw.port, "HEAD", "/health", auth())
    assert head.status == 200
    assert head.body == b""
    assert int(head.header("content-length") or 0) > 0
    nobody = await h2_request(gw.port, "GET", "/health", [])
    assert nobody.status == 401


async def test_upstream_hop_by_hop_fields_stop_at_the_gateway(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(
            status=201,
            body=b"made",
            headers={
                "Connection": "x-hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-End-To-End": "2",
            },
        )

    upstream.handler = handler
    gw = await start_gateway(h2_config(upstream.url))
    resp = await h2_request(gw.port, "POST", "/api/v1/write", auth(), b"x")
    assert (resp.status, resp.body) == (201, b"made")
    names = {n for n, _ in resp.headers}
    assert "x-end-to-end" in names
    assert not names & {
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-authenticate",
        "transfer-encoding",
    }
    assert all(n == n.lower() for n in names)


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(("x-bad(name", "1"), id="name-not-a-token"),
        pytest.param(("x-ctl", "a\x01b"), id="control-in-value"),
    ],
)
async def test_fields_http1_cannot_carry_are_a_400(
    start_gateway: StartGateway, upstream: RecordingUpstream, field: tuple[str, str]
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    resp = await h2_request(gw.port, "POST", "/api/v1/write", [*auth(), field], b"x")
    assert resp.status == 400
    assert upstream.requests == []


async def test_path_with_a_space_is_a_400(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    resp = await h2_request(gw.port, "POST", "/api/v1/write?a= HTTP/1.1", auth(), b"x")
    assert resp.status == 400
    assert upstream.requests == []


async def test_expect_100_continue_is_answered_interim(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(h2_config(upstream.url))
    client = await H2Client.open(gw.port)
    sid = await client.start("POST", "/api/v1/write", [*auth(), ("expect", "100-continue")])
    await asyncio.sleep(0.2)
    assert client.responses[sid].informational == [100]
    await client.send(sid, b"body", end=True)
    resp = await client.wait(sid)
    await client.close()
    assert resp.status == 204
    [seen] = upstream.complete
    assert "Expect" not in seen.headers


async def test_grpc_and_otlp_http_streams_share_one_connection(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    receiver = TraceReceiver().start()
    try:
        gw = await start_gateway(h2_config(upstream.url, grpc_port=receiver.port))
        client = await H2Client.open(gw.port)
        message = spans_request(5).SerializeToString()
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        grpc_headers = [*auth(), ("content-type", "application/grpc"), ("te", "trailers")]
        grpc_sid = await client.start("POST", TRACE_METHOD, grpc_headers)
        http_sid = await client.start("POST", "/v1/traces", [*auth(), PROTOBUF])
        await client.send(grpc_sid, framed, end=True)
        await client.send(http_sid, message, end=True)
        grpc_resp, http_resp = await client.wait(grpc_sid), await client.wait(http_sid)
        unknown = await client.request("POST", TRACE_METHOD + "Nope", grpc_headers, framed)
        await client.close()
    finally:
        receiver.stop()
    assert dict(grpc_resp.trailers)["grpc-status"] == "0"
    assert receiver.spans == 5
    assert http_resp.status == 204
    assert upstream.complete[0].body == message
    # A gRPC client on an unknown method still reads gRPC, not an HTTP 404.
    assert (unknown.status, dict(unknown.headers).get("grpc-status")) == (200, "12")


# -- curl (nghttp2): a real client that negotiates h2 by itself --------------------------
def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("curl"), "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.mark.parametrize("transport", ["h2c", "tls"])
async def test_curl_negotiates_h2_and_its_otlp_post_arrives(
    start_gateway: StartGateway, upstream: RecordingUpstream, tmp_path: Path, transport: str
) -> None:
    upstream.status = 200
    upstream.response_body = b"ok"
    text = h2_config(upstream.url)
    args = ["--http2-prior-knowledge"]
    scheme = "http"
    if transport == "tls":
        pki = Pki(tmp_path)
        cert = pki.server("localhost")
        tls = f'[server.tls]\ncert_file = "{cert.cert}"\nkey_file = "{cert.key}"\n'
        text = text.replace("\n[upstream]", f"\n{tls}\n[upstream]")
        args = ["--http2", "--cacert", str(pki.server_ca_file)]
        scheme = "https"
    gw: Gateway = await start_gateway(text)
    body = tmp_path / "spans.bin"
    body.write_bytes(spans_request(50).SerializeToString())
    base = f"{scheme}://localhost:{gw.port}"
    args += ["--resolve", f"localhost:{gw.port}:127.0.0.1", "-w", "\n%{http_version} %{http_code}"]
    token = ["-H", f"Authorization: Bearer {TOKEN}"]
    posted = ["-H", "Content-Type: application/x-protobuf", "--data-binary", f"@{body}"]
    done = await asyncio.to_thread(_curl, *args, *token, *posted, f"{base}/v1/traces")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "2 200"
    assert upstream.complete[0].body == body.read_bytes()
    health = await asyncio.to_thread(_curl, *args, *token, f"{base}/health")
    assert health.stdout.splitlines()[-1] == "2 200"
    assert '"credential":"ingest"' in health.stdout
    denied = await asyncio.to_thread(_curl, *args, "-i", *posted, f"{base}/v1/traces")
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.splitlines()[-1] == "2 401"
    assert 'www-authenticate: Bearer realm="obs-gateway"' in denied.stdout
    assert len(upstream.requests) == 1


async def test_a_credentials_forward_table_holds_over_h2(
    start_gateway: StartGateway, raw_upstream: StartRawUpstream
) -> None:
    # As tests/functional/test_tenancy_functional.py over HTTP/1.1: the
    # credential's backend, labels and header, whatever the client sent.
    vm = await raw_upstream(answer_with(b"HTTP/1.1 204 No Content\r\n\r\n"))
    vminsert = await raw_upstream(answer_with(b"HTTP/1.1 204 No Content\r\n\r\n"))
    text = h2_config(vm.url).replace(
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]',
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]\n'
        "[credentials.forward]\n"
        'extra_labels = { tenant = "a" }\n'
        'headers = { "X-Scope-OrgID" = "a" }\n'
        "[credentials.forward.upstreams]\n"
        f'remote_write = "{vminsert.url}/insert/42/prometheus/api/v1/write"\n',
        1,
    )
    gw = await start_gateway(text)
    target = "/api/v1/write?extra_label=tenant=evil&foo=1"
    evil = [("x-scope-orgid", "evil"), ("x_scope_orgid", "evil2")]
    resp = await h2_request(gw.port, "POST", target, [*auth(), *evil], b"body")
    assert resp.status == 204
    assert vm.requests == []
    [seen] = vminsert.requests
    assert seen.target == "/insert/42/prometheus/api/v1/write?foo=1&extra_label=tenant%3Da"
    assert [v for n, v in seen.headers if n.lower() == "x-scope-orgid"] == ["a"]
    assert seen.body == b"body"
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_client_overrides_dropped_total", credential="ingest") >= 2
