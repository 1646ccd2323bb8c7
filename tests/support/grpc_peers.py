"""gRPC peers for tests: a trace receiver built on grpcio and
opentelemetry-proto's service definitions, a one-call client, and the
config of a gateway with the three OTLP/gRPC routes.

The receiver is a real grpcio server on loopback threads: what it counts
crossed the wire from the gateway as HTTP/2.  It can answer with a chosen
status and trailing metadata (to check trailers pass verbatim), stall, or
be stopped and restarted on the same port (an outage).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import OTHER_TOKEN, TOKEN, sha256

__all__ = [
    "METRICS_METHOD",
    "TRACE_METHOD",
    "CallResult",
    "TraceReceiver",
    "call",
    "grpc_config",
    "spans_request",
]

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
LOGS_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


@dataclass
class TraceReceiver:
    """Counts spans; ``abort`` answers every call with that (code, details,
    trailing metadata); ``delay`` stalls each call first."""

    port: int = 0
    spans: int = 0
    calls: int = 0
    metrics_calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    # Every call's metadata as it came: repeats and order kept.
    fields: list[list[tuple[str, str]]] = field(default_factory=list)
    abort: tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]] | None = None
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def start(self) -> TraceReceiver:
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                return receiver._export(request, context)

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                with receiver.lock:
                    receiver.metrics_calls += 1
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None

    def _export(self, request: Any, context: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls += 1
            self.metadata.append(
                {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            )
            self.fields.append(
                [(k, v) for k, v in context.invocation_metadata() if isinstance(v, str)]
            )
        if self.abort is not None:
            code, details, trailers = self.abort
            context.set_trailing_metadata(trailers)
            context.abort(code, details)
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def spans_request(n: int, name_bytes: int = 8) -> Any:
    req = trace_service_pb2.ExportTraceServiceRequest()
    scope = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        span = scope.spans.add()
        span.name = f"s{i}".ljust(name_bytes, "x")
        span.trace_id = i.to_bytes(16, "big")
        span.span_id = (i + 1).to_bytes(8, "big")
    return req


@dataclass
class CallResult:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, str | bytes]
    seconds: float


def call(
    target: str,
    token: str | None,
    n: int = 3,
    *,
    method: str = TRACE_METHOD,
    compression: grpc.Compression | None = None,
    root_cert: bytes | None = None,
    timeout: float = 10.0,
    request: Any = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> CallResult:
    """One unary call (blocking: run it in a thread), its status and trailers."""
    if root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
        channel = grpc.secure_channel(
            target,
            creds,
            compression=compression,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
    else:
        channel = grpc.insecure_channel(target, compression=compression)
    sent = [("authorization", f"Bearer {token}")] if token else []
    sent += metadata
    body = (request if request is not None else spans_request(n)).SerializeToString()
    rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    t0 = time.monotonic()
    try:
        _, state = rpc.with_call(body, metadata=sent, timeout=timeout)
        code, details, trailers = grpc.StatusCode.OK, "", dict(state.trailing_metadata() or ())
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        trailers = dict(exc.trailing_metadata() or ())
    finally:
        channel.close()
    return CallResult(code, details, trailers, time.monotonic() - t0)


def grpc_config(
    upstream_port: int,
    *,
    scheme: str = "http",
    server: str = "",
    limits: str = "",
    max_body_bytes: int = 4 * 1024 * 1024,
    http_upstream: str = "http://127.0.0.1:9/v1/traces",
    credentials_extra: str = "",
) -> str:
    """The three OTLP/gRPC routes and an OTLP/HTTP one; TOKEN ("ingest") on
    traces, metrics and HTTP traces; OTHER_TOKEN ("other") on metrics only."""
    up = f"{scheme}://127.0.0.1:{upstream_port}"
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[limits]
{limits}

[log]
level = "debug"

[[routes]]
name = "grpc_traces"
path = "{TRACE_METHOD}"
protocol = "otlp-grpc"
upstream = "{up}"
max_body_bytes = {max_body_bytes}

[[routes]]
name = "grpc_metrics"
path = "{METRICS_METHOD}"
protocol = "otlp-grpc"
upstream = "{up}"

[[routes]]
name = "grpc_logs"
path = "{LOGS_METHOD}"
protocol = "otlp-grpc"
upstream = "{up}"

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "{http_upstream}"

[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["grpc_traces", "grpc_metrics", "grpc_logs", "otlp_traces"]
{credentials_extra}

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["grpc_metrics"]
"""
