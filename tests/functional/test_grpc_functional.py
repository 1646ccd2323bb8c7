"""OTLP over gRPC through the gateway, black box: a grpcio client calls the
public port (h2c, and TLS with ALPN h2), a grpcio receiver behind it counts
what arrives.  The status contract is the table in policy/errors.py."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

from tests.conftest import OTHER_TOKEN, TOKEN, RecordingUpstream, StartGateway
from tests.hostile.pki import Pki
from tests.support.grpc_peers import (
    METRICS_METHOD,
    TRACE_METHOD,
    TraceReceiver,
    call,
    grpc_config,
    spans_request,
)
from tests.support.metrics import scrape


@pytest.fixture
def receiver() -> Any:
    rec = TraceReceiver().start()
    yield rec
    rec.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_spans_arrive_over_h2c_with_and_without_gzip(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    gw = await start_gateway(grpc_config(receiver.port))
    target = f"127.0.0.1:{gw.port}"
    sent = 0
    for i in range(10):
        compression = grpc.Compression.Gzip if i % 2 else None
        result = await asyncio.to_thread(call, target, TOKEN, 50 + i, compression=compression)
        assert result.code is grpc.StatusCode.OK, result
        sent += 50 + i
    assert receiver.spans == sent
    seen = receiver.metadata[-1]
    # The credential never reaches the upstream; the forwarding headers do.
    assert "authorization" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"]
    metrics = await scrape(gw.admin_port)
    assert (
        metrics.sum("gateway_requests_total", route="grpc_traces", credential="ingest", code="200")
        == 10
    )


async def test_metrics_service_is_routed_by_its_method(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    gw = await start_gateway(grpc_config(receiver.port))
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    result = await asyncio.to_thread(
        call, f"127.0.0.1:{gw.port}", OTHER_TOKEN, method=METRICS_METHOD, request=request
    )
    assert result.code is grpc.StatusCode.OK
    assert receiver.metrics_calls == 1


def _retry_delay(trailers: dict[str, str | bytes]) -> float | None:
    raw = trailers.get("google.rpc.retryinfo-bin")
    if raw is None:
        return None
    info = error_details_pb2.RetryInfo()
    info.ParseFromString(raw if isinstance(raw, bytes) else base64.b64decode(raw + "=="))
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


@pytest.mark.parametrize(
    ("case", "code", "http_code"),
    [
        ("no_token", grpc.StatusCode.UNAUTHENTICATED, "401"),
        ("bad_token", grpc.StatusCode.UNAUTHENTICATED, "401"),
        ("out_of_scope", grpc.StatusCode.PERMISSION_DENIED, "403"),
        ("unknown_method", grpc.StatusCode.UNIMPLEMENTED, "404"),
        ("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, "413"),
        ("upstream_down", grpc.StatusCode.UNAVAILABLE, "503"),
    ],
)
async def test_status_contract(
    start_gateway: StartGateway,
    receiver: TraceReceiver,
    case: str,
    code: grpc.StatusCode,
    http_code: str,
) -> None:
    port = _free_port() if case == "upstream_down" else receiver.port
    gw = await start_gateway(grpc_config(port, max_body_bytes=64 * 1024))
    target = f"127.0.0.1:{gw.port}"
    token: str | None = {"no_token": None, "bad_token": "wrong", "out_of_scope": OTHER_TOKEN}.get(
        case, TOKEN
    )
    method = (
        "/opentelemetry.proto.collector.trace.v1.TraceService/Nope"
        if case == "unknown_method"
        else TRACE_METHOD
    )
    n = 5000 if case == "too_large" else 3
    result = await asyncio.to_thread(call, target, token, n, method=method)
    assert result.code is code, result
    assert receiver.spans == 0
    # An upstream failure gets no pushback: the SDK's own backoff is longer.
    assert _retry_delay(result.trailers) is None
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_requests_total", code=http_code) == 1


async def test_rate_limited_call_is_unavailable_with_retry_info(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    text = grpc_config(receiver.port).replace(
        'routes = ["grpc_traces", "grpc_metrics", "grpc_logs", "otlp_traces"]',
        'routes = ["grpc_traces", "grpc_metrics", "grpc_logs", "otlp_traces"]\n'
        "rate_limit_requests_per_second = 1\nrate_limit_burst = 1",
    )
    gw = await start_gateway(text)
    target = f"127.0.0.1:{gw.port}"
    first = await asyncio.to_thread(call, target, TOKEN)
    second = await asyncio.to_thread(call, target, TOKEN)
    assert first.code is grpc.StatusCode.OK
    assert second.code is grpc.StatusCode.UNAVAILABLE
    assert _retry_delay(second.trailers) == 1.0
    assert receiver.calls == 1


async def test_upstream_trailers_pass_verbatim(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    receiver.abort = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "span 3 is bad: ünïcode",
        (("x-why", "because"), ("detail-bin", b"\x00\x01\xff")),
    )
    gw = await start_gateway(grpc_config(receiver.port))
    result = await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", TOKEN)
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    assert result.details == "span 3 is bad: ünïcode"
    assert result.trailers["x-why"] == "because"
    assert result.trailers["detail-bin"] == b"\x00\x01\xff"


async def test_large_message_streams_through_the_windows(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    # ~6 MB: many times every window on the way (256 KiB per stream, 1 MiB
    # per connection), so it only arrives if both sides reopen them.
    gw = await start_gateway(grpc_config(receiver.port, max_body_bytes=32 * 1024 * 1024))
    request = spans_request(40_000, name_bytes=100)
    assert request.ByteSize() > 5_000_000
    result = await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", TOKEN, request=request)
    assert result.code is grpc.StatusCode.OK, result
    assert receiver.spans == 40_000


async def test_slow_upstream_is_unavailable_after_the_response_timeout(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    receiver.delay = 3.0
    text = grpc_config(receiver.port).replace(
        "[limits]", "[upstream]\nresponse_timeout_seconds = 0.5\n\n[limits]"
    )
    gw = await start_gateway(text)
    result = await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", TOKEN)
    assert result.code is grpc.StatusCode.UNAVAILABLE
    assert result.seconds < 2.5
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_upstream_errors_total", route="grpc_traces", kind="timeout") == 1


async def test_many_concurrent_calls_share_pooled_upstream_connections(
    start_gateway: StartGateway, receiver: TraceReceiver
) -> None:
    gw = await start_gateway(grpc_config(receiver.port))
    target = f"127.0.0.1:{gw.port}"
    results = await asyncio.gather(*(asyncio.to_thread(call, target, TOKEN, 7) for _ in range(24)))
    assert all(r.code is grpc.StatusCode.OK for r in results)
    assert receiver.spans == 24 * 7
    shared = gw.shared
    assert shared is not None
    assert shared.h2pools is not None
    route = shared.gen.routes.get_grpc(TRACE_METHOD.encode())
    assert route is not None
    assert route.upstream is not None
    pool = shared.h2pools.get(route.upstream)
    assert 1 <= len(pool.conns) <= 2  # multiplexed, not one connection per call


async def test_http1_and_http2_on_one_tls_port_with_one_token(
    start_gateway: StartGateway,
    receiver: TraceReceiver,
    upstream: RecordingUpstream,
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    cert = pki.server("localhost")
    tls = f'[server.tls]\ncert_file = "{cert.cert}"\nkey_file = "{cert.key}"\n'
    text = grpc_config(receiver.port, http_upstream=f"{upstream.url}/v1/traces").replace(
        "\n[limits]", f"\n{tls}\n[limits]"
    )
    gw = await start_gateway(text)
    root = pki.server_ca_file.read_bytes()
    result = await asyncio.to_thread(
        call, f"localhost:{gw.port}", TOKEN, 11, root_cert=root, compression=grpc.Compression.Gzip
    )
    assert result.code is grpc.StatusCode.OK, result
    assert receiver.spans == 11
    ctx = pki.client_context()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://localhost:{gw.port}/v1/traces",
            data=spans_request(2).SerializeToString(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-protobuf"},
            ssl=ctx,
        ) as resp,
    ):
        assert resp.status == upstream.status
        assert resp.version == aiohttp.HttpVersion11
    assert len(upstream.complete) == 1


async def test_http1_and_h2c_on_one_cleartext_port(
    start_gateway: StartGateway, receiver: TraceReceiver, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(grpc_config(receiver.port, http_upstream=f"{upstream.url}/v1/traces"))
    result = await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", TOKEN, 4)
    assert result.code is grpc.StatusCode.OK
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{gw.port}/v1/traces",
            data=b"x",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-protobuf"},
        ) as resp,
    ):
        assert resp.status == upstream.status
    # A gRPC method does not exist over HTTP/1.1 (gRPC needs trailers).
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{gw.port}{TRACE_METHOD}",
            data=b"x",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/grpc"},
        ) as resp,
    ):
        assert resp.status == 404
    assert receiver.spans == 4


async def test_access_line_shows_the_protocol_and_grpc_status(
    start_gateway: StartGateway, receiver: TraceReceiver, log_capture: list[Any]
) -> None:
    gw = await start_gateway(grpc_config(receiver.port))
    await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", TOKEN)
    await asyncio.to_thread(call, f"127.0.0.1:{gw.port}", "wrong")
    lines = [e for e in log_capture if e.get("event") == "request"]
    assert [(e["http"], e["grpc_status"], e["status"]) for e in lines] == [
        ("2", "0", 200),
        ("2", "16", 401),
    ]
    assert all("wrong" not in repr(e) and TOKEN not in repr(e) for e in log_capture)
