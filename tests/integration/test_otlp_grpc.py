"""Issue 14: the real OpenTelemetry Python gRPC exporter
(opentelemetry-exporter-otlp-proto-grpc, on grpcio) through the gateway's
CLI to a grpcio receiver built on opentelemetry-proto's service
definitions, over h2c and TLS, with gzip: every span sent arrives.

A wrong token is UNAUTHENTICATED and not retried; a receiver down for 10 s
costs nothing once it is back, within the SDK's own retry budget, which is
measured directly against a dead receiver (with and without the gateway in
front) so the gateway is seen not to shorten it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import TOKEN
from tests.hostile.pki import Pki
from tests.integration.components import Gateway
from tests.integration.harness import Procs, free_port, timeout, wait_until
from tests.support.grpc_peers import TraceReceiver, grpc_config

pytestmark = [pytest.mark.integration, timeout(120)]

OUTAGE_SECONDS = 10.0
# The SDK's retry budget is its export timeout (10 s by default: backoffs of
# 1, 2, 4 s, then 8 s no longer fits, so it gives up at ~7 s).  An
# application that must ride out a 10 s outage raises it, as this one does.
EXPORT_TIMEOUT = 30.0


@pytest.fixture
def receiver() -> Iterator[TraceReceiver]:
    rec = TraceReceiver().start()
    yield rec
    rec.stop()


def make_spans(n: int, prefix: str) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "grpc-it"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("it")
    for i in range(n):
        with tracer.start_as_current_span(f"{prefix}-{i}"):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def exporter(
    endpoint: str,
    token: str,
    *,
    root: bytes | None = None,
    export_timeout: float = EXPORT_TIMEOUT,
) -> OTLPSpanExporter:
    kwargs: dict[str, Any] = {}
    if root is not None:
        kwargs["credentials"] = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        kwargs["insecure"] = True
    return OTLPSpanExporter(
        endpoint=endpoint,
        headers=(("authorization", f"Bearer {token}"),),
        compression=grpc.Compression.Gzip,
        timeout=export_timeout,
        **kwargs,
    )


def start_gateway(procs: Procs, tmp_path: Path, upstream_port: int, tls: str = "") -> Gateway:
    text = grpc_config(upstream_port)
    if tls:
        text = text.replace("\n[limits]", f"\n{tls}\n[limits]")
    return Gateway(procs, tmp_path / "gateway", text)


def answers(gw: Gateway) -> dict[str, float]:
    return gw.metrics().by("gateway_requests_total", "code", route="grpc_traces")


def host_port(gw: Gateway) -> str:
    return gw.url.removeprefix("http://")


@pytest.mark.parametrize("transport", ["h2c", "tls"])
def test_sdk_spans_arrive_through_the_gateway(
    procs: Procs, tmp_path: Path, receiver: TraceReceiver, transport: str
) -> None:
    root = None
    tls = ""
    if transport == "tls":
        pki = Pki(tmp_path)
        cert = pki.server("localhost")
        tls = f'[server.tls]\ncert_file = "{cert.cert}"\nkey_file = "{cert.key}"\n'
        root = pki.server_ca_file.read_bytes()
    gw = start_gateway(procs, tmp_path, receiver.port, tls)
    port = host_port(gw).rsplit(":", 1)[1]
    exp = exporter(f"localhost:{port}", TOKEN, root=root)
    sent = 0
    for batch in range(5):
        spans = make_spans(100 + batch, f"{transport}-{batch}")
        assert exp.export(spans) is SpanExportResult.SUCCESS
        sent += len(spans)
    exp.shutdown()
    assert receiver.spans == sent == 510
    assert all("authorization" not in m for m in receiver.metadata)
    assert answers(gw) == {"200": 5.0}


def test_wrong_token_is_unauthenticated_and_not_retried(
    procs: Procs, tmp_path: Path, receiver: TraceReceiver
) -> None:
    gw = start_gateway(procs, tmp_path, receiver.port)
    exp = exporter(host_port(gw), "not-the-token")
    t0 = time.monotonic()
    assert exp.export(make_spans(3, "bad")) is SpanExportResult.FAILURE
    elapsed = time.monotonic() - t0
    exp.shutdown()
    assert elapsed < 1.0  # no backoff happened
    assert answers(gw) == {"401": 1.0}  # one attempt, UNAUTHENTICATED
    assert receiver.calls == 0


def test_receiver_down_10s_loses_nothing(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    receiver = TraceReceiver(port=port).start()
    gw = start_gateway(procs, tmp_path, port)
    exp = exporter(host_port(gw), TOKEN)
    results: list[SpanExportResult] = []
    sent = [0]
    stop = threading.Event()

    def load() -> None:
        batch = 0
        while not stop.is_set():
            spans = make_spans(20, f"out-{batch}")
            sent[0] += len(spans)
            results.append(exp.export(spans))
            batch += 1
            time.sleep(0.2)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: receiver.spans > 0, "first spans", 10)
        receiver.stop()
        time.sleep(OUTAGE_SECONDS)
        receiver = TraceReceiver(port=port).start()
        time.sleep(2.0)
    finally:
        stop.set()
        worker.join(EXPORT_TIMEOUT + 5)
        exp.shutdown()
    try:
        wait_until(lambda: receiver.spans >= 20, "spans after the outage", 10)
        assert all(r is SpanExportResult.SUCCESS for r in results), results
        codes = answers(gw)
        assert set(codes) == {"200", "503"}, codes  # UNAVAILABLE during the outage only
        # Each batch arrived once: before the outage at the first receiver,
        # after it at the second; the retried ones only after.
        assert codes["200"] == len(results)
    finally:
        receiver.stop()


@pytest.mark.parametrize("path", ["direct", "through_gateway"])
def test_sdk_retry_budget_against_a_dead_receiver(procs: Procs, tmp_path: Path, path: str) -> None:
    """The budget the outage test relies on, measured: at the SDK's default
    10 s timeout, how long it keeps retrying UNAVAILABLE before dropping."""
    dead = free_port()
    if path == "direct":
        endpoint = f"127.0.0.1:{dead}"
    else:
        endpoint = host_port(start_gateway(procs, tmp_path, dead))
    exp = exporter(endpoint, TOKEN, export_timeout=10.0)
    t0 = time.monotonic()
    assert exp.export(make_spans(1, "dead")) is SpanExportResult.FAILURE
    budget = time.monotonic() - t0
    exp.shutdown()
    print(f"\nSDK retry budget ({path}, timeout 10 s): {budget:.1f} s")
    # 1 + 2 + 4 s of backoff (±20 % jitter), then the 8 s one does not fit.
    assert 5.0 < budget < 10.5
