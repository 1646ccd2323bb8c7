"""The OTLP sender side: the real OpenTelemetry Python SDK, configured as an
application would (BatchSpanProcessor + OTLPSpanExporter over HTTP, gzip),
pointed at the gateway, plus a pass-through exporter that keeps each
export's result for the assertions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from tests.integration.components import Gateway

__all__ = ["RESOURCE", "RecordingExporter", "SpanId", "batch_provider", "emit", "exporter"]

RESOURCE = Resource.create({"service.name": "obs-gateway-itest"})
SpanId = tuple[int, int]  # (trace_id, span_id)


class RecordingExporter(SpanExporter):
    """Delegates to the real exporter and keeps each export's result, which
    BatchSpanProcessor otherwise only logs."""

    def __init__(self, inner: OTLPSpanExporter) -> None:
        self.inner: SpanExporter = inner
        self.results: list[SpanExportResult] = []
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        with self._lock:
            self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def exporter(
    gw: Gateway,
    token: str,
    *,
    gzip: bool = True,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> OTLPSpanExporter:
    return OTLPSpanExporter(
        endpoint=gw.traces_url,
        headers={**(headers or {}), "Authorization": f"Bearer {token}"},
        compression=Compression.Gzip if gzip else Compression.NoCompression,
        timeout=timeout,
    )


@contextmanager
def batch_provider(sender: SpanExporter) -> Iterator[TracerProvider]:
    """A TracerProvider exporting through a BatchSpanProcessor; always shut down."""
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(
        BatchSpanProcessor(
            sender,
            schedule_delay_millis=100,
            max_export_batch_size=128,
            export_timeout_millis=60_000,
        )
    )
    try:
        yield provider
    finally:
        provider.shutdown()


def emit(provider: TracerProvider, count: int, prefix: str) -> list[SpanId]:
    """``count`` spans (a root every 10, the rest its children); their ids."""
    tracer = provider.get_tracer("obs-gateway-itest")
    ids: list[SpanId] = []
    for start in range(0, count, 10):
        with tracer.start_as_current_span(f"{prefix}-{start}") as root:
            ctx = root.get_span_context()
            ids.append((ctx.trace_id, ctx.span_id))
            for i in range(start + 1, min(start + 10, count)):
                with tracer.start_as_current_span(f"{prefix}-{i}", attributes={"i": i}) as child:
                    c = child.get_span_context()
                    ids.append((c.trace_id, c.span_id))
    return ids
